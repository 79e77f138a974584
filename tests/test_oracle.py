"""Tests of the oracles in oracle.py, on small trees built from the tables below.

GNU tar packs and extracts a layer. In place of lcow's image, ``mke2fs -d`` makes a real
ext4 from a folder that contains the converted form, written out by hand. The tests check
that the reference tree is exact, that the whiteout rules apply, that every kind of
difference is reported, and that loop mounts and e2fsck behave as the corpus tests expect.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import pytest

from oracle import (
    OPAQUE_XATTR,
    ROOT,
    VHD_FOOTER_SIZE_BYTES,
    EntryRecord,
    Snapshot,
    compare_trees,
    e2fsck_clean,
    expected_from_tar_extraction,
    extract_with_gnu_tar,
    format_differences,
    list_tar_members,
    loop_mount,
    require_root,
    run_tool,
    skip_or_fail,
    snapshot_tree,
    split_lost_found,
)

pytestmark = pytest.mark.root

BASE_MTIME_NS: Final = 1_600_000_000_123_456_789  # 2020-09-13T12:26:40.123456789Z
IMPLICIT_MTIME_NS: Final = 86_400_000_000_007  # 1970-01-02T00:00:00.000000007Z
PASSWD: Final = b"root:x:0:0:root:/root:/bin/sh\n"
SHADOW: Final = b"root:*:19000:0:99999:7:::\n"
MOTD: Final = b"hello\n"
CHANGED_MOTD: Final = b"jello\n"  # the same size, so only the digest can tell


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a tree table; ``path`` is relative and ``.`` is the tree's root."""

    path: str
    kind: str  # "directory", "regular", "symlink", "hardlink", "character device" or "fifo"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = BASE_MTIME_NS
    content: bytes = b""
    target: str = ""  # the symlink's target, or the path a hard link shares its inode with
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    member: bool = True  # False for a directory that the tar names only as a parent


# Archive order on purpose: members of etc/ and bin/ alternate and etc/motd comes last, so a
# directory gets members after GNU tar has left it.
LAYER_TREE: Final = (
    Entry("etc", "directory", 0o755, mtime_ns=BASE_MTIME_NS + 1),
    Entry("bin", "directory", 0o755, mtime_ns=BASE_MTIME_NS + 2),
    Entry("etc/passwd", "regular", 0o644, content=PASSWD),
    Entry("bin/sh", "symlink", target="dash", mtime_ns=BASE_MTIME_NS + 3),
    Entry("etc/shadow", "regular", 0o640, gid=42, content=SHADOW, xattrs=(("user.origin", b"t"),)),
    Entry("etc/link", "hardlink", target="etc/passwd"),
    Entry("bin/sudo", "regular", 0o4755, content=b"\x7fELF"),
    Entry("dev", "directory", 0o755),
    Entry("dev/null", "character device", 0o666, rdev=(1, 3)),
    Entry("tmp", "directory", 0o1777, mtime_ns=BASE_MTIME_NS + 4),
    Entry("run", "directory", 0o755),
    Entry("run/fifo", "fifo", 0o600),
    Entry("secret", "directory", 0o700, uid=1000, gid=1000, xattrs=(("trusted.lcow", b"1"),)),
    Entry("secret/key", "regular", 0o400, uid=1000, gid=1000, content=b"k" * 5000),
    Entry("app", "directory", 0o755, mtime_ns=BASE_MTIME_NS + 5),
    Entry("app/.wh.removed", "regular", 0o600, uid=7, gid=8, mtime_ns=BASE_MTIME_NS + 6),
    Entry("cache", "directory", 0o750, mtime_ns=BASE_MTIME_NS + 7),
    Entry("cache/.wh..wh..opq", "regular", 0o600),
    Entry("cache/new", "regular", 0o644, content=b"new\n"),
    Entry("deep", "directory", 0o700, mtime_ns=BASE_MTIME_NS + 8, member=False),
    Entry("deep/er", "directory", 0o700, mtime_ns=BASE_MTIME_NS + 9, member=False),
    Entry("deep/er/file", "regular", 0o644, content=b"deep\n"),
    Entry("etc/motd", "regular", 0o644, content=MOTD, mtime_ns=BASE_MTIME_NS + 10),
)

# The same layer as lcow's image contains it, written out by hand: the whiteout is a device, the
# opaque marker is an xattr, and directories that are not members have fixed metadata.
REPLACED_IN_IMAGE: Final = {
    ".",
    "app/.wh.removed",
    "cache",
    "cache/.wh..wh..opq",
    "deep",
    "deep/er",
}
IMAGE_TREE: Final = (
    *(entry for entry in LAYER_TREE if entry.path not in REPLACED_IN_IMAGE),
    Entry(".", "directory", 0o755, mtime_ns=IMPLICIT_MTIME_NS),
    Entry("app/removed", "character device", 0o600, uid=7, gid=8, mtime_ns=BASE_MTIME_NS + 6),
    Entry("cache", "directory", 0o750, mtime_ns=BASE_MTIME_NS + 7, xattrs=((OPAQUE_XATTR, b"y"),)),
    Entry("deep", "directory", 0o755, mtime_ns=IMPLICIT_MTIME_NS),
    Entry("deep/er", "directory", 0o755, mtime_ns=IMPLICIT_MTIME_NS),
)

STANDIN_FOOTER: Final = b"conectix".ljust(VHD_FOOTER_SIZE_BYTES, b"\0")


# --- building trees, tars and images -------------------------------------------------------


def build_tree(root: Path, entries: Iterable[Entry]) -> None:
    """Create the entries under ``root``, then set their metadata, children before parents."""
    entries = sorted(entries, key=lambda entry: entry.path.count("/"))
    root.mkdir(exist_ok=True)
    for entry in entries:
        path = root / entry.path
        if entry.kind == "directory":
            path.mkdir(exist_ok=True)
        elif entry.kind == "regular":
            path.write_bytes(entry.content)
        elif entry.kind == "symlink":
            path.symlink_to(entry.target)
        elif entry.kind == "hardlink":
            path.hardlink_to(root / entry.target)
        elif entry.kind == "character device":
            os.mknod(path, stat.S_IFCHR | entry.mode, os.makedev(*entry.rdev))
        elif entry.kind == "fifo":
            os.mkfifo(path, entry.mode)
        else:
            raise ValueError(f"{entry.path}: unknown kind {entry.kind!r} in the tree table")

    # Deepest first, because creating an entry changes its parent's mtime. Owners before
    # modes, because chown clears the setuid bit. A hard link shares its source's metadata.
    for entry in sorted(entries, key=lambda entry: entry.path.count("/"), reverse=True):
        if entry.kind == "hardlink":
            continue
        path = root / entry.path
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        if entry.kind != "symlink":
            path.chmod(entry.mode)
        for name, value in entry.xattrs:
            os.setxattr(path, name, value, follow_symlinks=False)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def create_tar(source: Path, members: Iterable[str], tar_path: Path) -> None:
    """Pack ``members`` of ``source`` in the given order with GNU tar, as Docker layers are."""
    member_list = tar_path.with_suffix(".members")
    member_list.write_bytes(b"".join(os.fsencode(member) + b"\0" for member in members))
    run_tool(
        [
            "tar",
            "--create",
            f"--file={tar_path}",
            f"--directory={source}",
            "--format=pax",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--no-recursion",
            "--null",
            "--verbatim-files-from",
            f"--files-from={member_list}",
        ]
    )


def make_standin_image(folder: Path, image: Path) -> None:
    """Format ``image`` as ext4 holding ``folder``, then append a 512-byte stand-in footer.

    mke2fs -d (e2fsprogs 1.47.0) stores whole seconds only and gives the root directory its
    own mode, owner and time, so debugfs then writes every mtime with its nanoseconds and
    the root's metadata from the folder.
    """
    run_tool(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-O",
            "^has_journal",
            "-d",
            str(folder),
            str(image),
            "16M",
        ]
    )

    commands: list[str] = []
    for path, record in snapshot_tree(folder).items():
        target = "/" if path == ROOT else "/" + path.decode()
        seconds, nanoseconds = divmod(record.mtime_ns, 1_000_000_000)
        # ext4 keeps the low 32 bits of the seconds as a signed number. The two epoch bits
        # below the nanoseconds in the *_extra field carry what does not fit.
        epoch_bits = ((seconds - _signed32(seconds)) >> 32) & 0b11
        commands.append(f'sif "{target}" mtime @{seconds}')
        commands.append(f'sif "{target}" mtime_extra {nanoseconds << 2 | epoch_bits}')
        if path == ROOT:
            commands.append(f'sif "/" mode 0{stat.S_IFDIR | record.mode:o}')
            commands.append(f'sif "/" uid {record.uid}')
            commands.append(f'sif "/" gid {record.gid}')
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    result = run_tool(["debugfs", "-w", "-f", str(script), str(image)])

    # debugfs exits 0 even when a command fails, and prints only its banner otherwise.
    errors = [line for line in result.stderr.splitlines() if not line.startswith("debugfs ")]
    assert errors == [], "\n".join(errors)

    with image.open("ab") as output:
        output.write(STANDIN_FOOTER)


def _signed32(value: int) -> int:
    low = value & 0xFFFF_FFFF
    return low - (1 << 32) if low & 0x8000_0000 else low


def layer_members() -> list[str]:
    return [entry.path for entry in LAYER_TREE if entry.member]


@pytest.fixture
def layer_tar(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    build_tree(source, LAYER_TREE)
    tar_path = tmp_path / "layer.tar"
    create_tar(source, layer_members(), tar_path)
    return tar_path


@pytest.fixture
def extracted(layer_tar: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "extracted"
    extract_with_gnu_tar(layer_tar, dest)
    return dest


def expected_image_tree(extraction: Path, tar_path: Path) -> Snapshot:
    members = [member.name for member in list_tar_members(tar_path)]
    return expected_from_tar_extraction(
        snapshot_tree(extraction), members=members, implicit_mtime_ns=IMPLICIT_MTIME_NS
    )


# --- GNU tar as the reference --------------------------------------------------------------


def test_extraction_matches_source(layer_tar: Path, extracted: Path) -> None:
    source = snapshot_tree(layer_tar.parent / "source")
    extraction = snapshot_tree(extracted)

    # GNU tar creates the root and the non-member directories with the current time.
    not_members = [ROOT, b"deep", b"deep/er"]
    for path in not_members:
        del source[path]
        del extraction[path]

    differences = compare_trees(source, extraction)
    assert differences == [], format_differences(differences)


def test_extraction_directory_mtimes(extracted: Path) -> None:
    # etc/ gets members before and after bin/, and cache/ gets the opaque marker: with the
    # delayed restore both keep the mtime of their own tar header, to the nanosecond.
    assert (extracted / "etc").stat().st_mtime_ns == BASE_MTIME_NS + 1
    assert (extracted / "bin").stat().st_mtime_ns == BASE_MTIME_NS + 2
    assert (extracted / "cache").stat().st_mtime_ns == BASE_MTIME_NS + 7


@pytest.mark.parametrize(
    ("compressor", "suffix"), [("gzip", ".gz"), ("zstd", ".zst")], ids=["gzip", "zstd"]
)
def test_extraction_compressed(
    layer_tar: Path, extracted: Path, tmp_path: Path, compressor: str, suffix: str
) -> None:
    run_tool([compressor, "-q", "-k", str(layer_tar)])
    compressed = layer_tar.with_name(layer_tar.name + suffix)
    dest = tmp_path / f"extracted-{compressor}"
    extract_with_gnu_tar(compressed, dest)

    differences = compare_trees(
        expected_image_tree(extracted, layer_tar), expected_image_tree(dest, compressed)
    )

    assert differences == [], format_differences(differences)
    assert list_tar_members(compressed) == list_tar_members(layer_tar)


def test_members_names_and_sizes(layer_tar: Path) -> None:
    members = list_tar_members(layer_tar)
    expected_sizes = [
        len(entry.content) if entry.kind == "regular" else 0 for entry in LAYER_TREE if entry.member
    ]

    assert [member.name for member in members] == [name.encode() for name in layer_members()]
    assert [member.size for member in members] == expected_sizes


def test_gnu_tar_is_gnu() -> None:
    # The extraction options are GNU tar's; bsdtar reads some of them differently.
    first_line = run_tool(["tar", "--version"]).stdout.splitlines()[0]

    assert first_line.startswith("tar (GNU tar)")


# --- the converted form --------------------------------------------------------------------


def test_whiteout_becomes_device(layer_tar: Path, extracted: Path) -> None:
    expected = expected_image_tree(extracted, layer_tar)
    device = expected[b"app/removed"]

    assert b"app/.wh.removed" not in expected
    assert device.kind == "character device"
    assert device.rdev == (0, 0)
    assert device.mode == 0o600
    assert (device.uid, device.gid) == (7, 8)
    assert device.mtime_ns == BASE_MTIME_NS + 6
    assert device.hardlinks == (b"app/removed",)


def test_opaque_marker_becomes_xattr(layer_tar: Path, extracted: Path) -> None:
    expected = expected_image_tree(extracted, layer_tar)
    directory = expected[b"cache"]

    assert b"cache/.wh..wh..opq" not in expected
    assert dict(directory.xattrs) == {OPAQUE_XATTR: b"y"}
    assert directory.mode == 0o750
    assert directory.mtime_ns == BASE_MTIME_NS + 7
    assert b"cache/new" in expected


@pytest.mark.parametrize("path", [ROOT, b"deep", b"deep/er"], ids=["root", "deep", "deep-er"])
def test_implicit_directory_metadata(layer_tar: Path, extracted: Path, path: bytes) -> None:
    record = expected_image_tree(extracted, layer_tar)[path]

    assert record.kind == "directory"
    assert record.mode == 0o755
    assert (record.uid, record.gid) == (0, 0)
    assert record.mtime_ns == IMPLICIT_MTIME_NS
    assert record.xattrs == ()


def regular_record(path: bytes) -> EntryRecord:
    return EntryRecord(
        kind="regular",
        mode=0o644,
        uid=0,
        gid=0,
        size=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        mtime_ns=0,
        xattrs=(),
        symlink_target=None,
        rdev=None,
        hardlinks=(path,),
    )


@pytest.mark.parametrize(
    "paths",
    [
        pytest.param([b"a/.wh..wh.plnk"], id="aufs-metadata"),
        pytest.param([b"a/.wh.b", b"a/b"], id="whiteout-beside-path"),
    ],
)
def test_transform_rejects(paths: list[bytes]) -> None:
    snapshot = {path: regular_record(path) for path in paths}

    with pytest.raises(ValueError, match="whiteout"):
        expected_from_tar_extraction(snapshot, implicit_mtime_ns=0)


# --- the comparison ------------------------------------------------------------------------


def _restoring_parent_mtime(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Wrap a change that adds or removes a name, so that its directory keeps its mtime."""

    def apply(path: Path) -> None:
        parent_mtime_ns = path.parent.stat().st_mtime_ns
        change(path)
        os.utime(path.parent, ns=(parent_mtime_ns, parent_mtime_ns))

    return apply


@_restoring_parent_mtime
def _break_hardlink(path: Path) -> None:
    status = path.stat()
    path.unlink()
    path.write_bytes(PASSWD)
    path.chmod(stat.S_IMODE(status.st_mode))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


@_restoring_parent_mtime
def _retarget_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to("bash")
    os.utime(path, ns=(BASE_MTIME_NS + 3, BASE_MTIME_NS + 3), follow_symlinks=False)


@_restoring_parent_mtime
def _renumber_device(path: Path) -> None:
    path.unlink()
    os.mknod(path, stat.S_IFCHR, os.makedev(1, 5))
    path.chmod(0o666)
    os.utime(path, ns=(BASE_MTIME_NS, BASE_MTIME_NS))


def _rewrite_same_size(path: Path) -> None:
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(CHANGED_MOTD)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# Each case changes one thing in an extracted tree and lists every line compare_trees must
# print for it.
CHANGES: Final = [
    pytest.param("etc/passwd", lambda path: None, [], id="unchanged"),
    pytest.param(
        "bin/sudo",
        lambda path: path.chmod(0o755),
        ["bin/sudo: mode: expected 0o4755, actual 0o755"],
        id="mode",
    ),
    pytest.param(
        "etc/motd",
        lambda path: os.utime(path, ns=(BASE_MTIME_NS, BASE_MTIME_NS + 11)),
        [
            "etc/motd: mtime_ns: expected 1600000000123456799 (2020-09-13T12:26:40.123456799Z),"
            " actual 1600000000123456800 (2020-09-13T12:26:40.123456800Z)"
        ],
        id="mtime-nanosecond",
    ),
    pytest.param(
        "secret",
        lambda path: os.chown(path, 1001, 1000),
        ["secret: uid: expected 1000, actual 1001"],
        id="owner",
    ),
    pytest.param(
        "etc/shadow",
        lambda path: os.removexattr(path, "user.origin"),
        ["etc/shadow: xattr user.origin: expected b't', actual missing"],
        id="missing-xattr",
    ),
    pytest.param(
        "etc/link",
        _break_hardlink,
        [
            "etc/link: hardlinks: expected (etc/link, etc/passwd), actual (etc/link)",
            "etc/passwd: hardlinks: expected (etc/link, etc/passwd), actual (etc/passwd)",
        ],
        id="broken-hardlink",
    ),
    pytest.param(
        "etc/motd",
        _rewrite_same_size,
        [f"etc/motd: sha256: expected {_sha256(MOTD)!r}, actual {_sha256(CHANGED_MOTD)!r}"],
        id="content",
    ),
    pytest.param(
        "bin/sh",
        _retarget_symlink,
        ["bin/sh: symlink_target: expected b'dash', actual b'bash'"],
        id="symlink-target",
    ),
    pytest.param(
        "dev/null",
        _renumber_device,
        ["dev/null: rdev: expected (1, 3), actual (1, 5)"],
        id="device-number",
    ),
    pytest.param(
        "etc/motd",
        _restoring_parent_mtime(lambda path: path.unlink()),
        ["etc/motd: missing (expected a regular)"],
        id="missing-path",
    ),
    pytest.param(
        "run/extra",
        _restoring_parent_mtime(lambda path: path.touch()),
        ["run/extra: unexpected regular"],
        id="unexpected-path",
    ),
]


@pytest.mark.parametrize(("path", "change", "expected_lines"), CHANGES)
def test_compare_reports(
    extracted: Path, path: str, change: Callable[[Path], None], expected_lines: list[str]
) -> None:
    before = snapshot_tree(extracted)
    change(extracted / path)
    after = snapshot_tree(extracted)

    assert compare_trees(before, after) == expected_lines


def test_format_differences_limit() -> None:
    lines = [f"path{index}: mode: expected 0o644, actual 0o600" for index in range(60)]
    message = format_differences(lines)

    assert message.startswith("60 differences:\npath0: ")
    assert "path49: " in message
    assert "path50: " not in message
    assert message.endswith("... and 10 more")


# --- images: e2fsck, loop mounts, lost+found -----------------------------------------------


@pytest.fixture
def standin_image(tmp_path: Path) -> Path:
    folder = tmp_path / "image-tree"
    build_tree(folder, IMAGE_TREE)
    image = tmp_path / "standin.vhd"
    make_standin_image(folder, image)
    return image


def test_standin_image_matches(layer_tar: Path, extracted: Path, standin_image: Path) -> None:
    expected = expected_image_tree(extracted, layer_tar)

    e2fsck_clean(standin_image)
    with loop_mount(standin_image) as mountpoint:
        mounted = snapshot_tree(mountpoint)
    actual, lost_found_problems = split_lost_found(mounted)

    assert lost_found_problems == [], format_differences(lost_found_problems)
    differences = compare_trees(expected, actual)
    assert differences == [], format_differences(differences)


def test_e2fsck_reports_bad_link_count(standin_image: Path) -> None:
    run_tool(["debugfs", "-w", "-R", "sif /etc/passwd links_count 5", str(standin_image)])

    with pytest.raises(AssertionError, match="ref count is 5, should be 2"):
        e2fsck_clean(standin_image)


def _loop_devices_of(image: Path) -> str:
    return run_tool(["losetup", "--associated", str(image)]).stdout


def _is_mounted(mountpoint: Path) -> bool:
    mount_points = [
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    return str(mountpoint) in mount_points


def test_loop_mount_cleans_up_on_error(standin_image: Path) -> None:
    mountpoints: list[Path] = []
    devices_while_mounted: list[str] = []

    def mount_and_fail() -> None:
        with loop_mount(standin_image) as mountpoint:
            mountpoints.append(mountpoint)
            devices_while_mounted.append(_loop_devices_of(standin_image))
            raise RuntimeError("body failed")

    with pytest.raises(RuntimeError, match="body failed"):
        mount_and_fail()

    assert devices_while_mounted[0] != ""
    assert not _is_mounted(mountpoints[0])
    assert not mountpoints[0].exists()
    assert _loop_devices_of(standin_image) == ""


def test_loop_mount_read_only(standin_image: Path) -> None:
    with (
        loop_mount(standin_image) as mountpoint,
        pytest.raises(OSError, match="Read-only file system") as raised,
    ):
        (mountpoint / "new-file").write_bytes(b"")

    assert raised.value.errno == errno.EROFS


def test_loop_mount_writable(standin_image: Path) -> None:
    with loop_mount(standin_image, read_only=False) as mountpoint:
        (mountpoint / "new-file").write_bytes(b"written")

    with loop_mount(standin_image) as mountpoint:
        assert (mountpoint / "new-file").read_bytes() == b"written"
    assert _loop_devices_of(standin_image) == ""


def directory_record(mode: int) -> EntryRecord:
    return dataclasses.replace(
        regular_record(b""), kind="directory", mode=mode, size=None, sha256=None, hardlinks=()
    )


def test_lost_found_missing() -> None:
    remaining, problems = split_lost_found({ROOT: directory_record(0o755)})

    assert problems == ["lost+found: missing"]
    assert list(remaining) == [ROOT]


def test_lost_found_wrong_mode_and_entry() -> None:
    snapshot = {
        ROOT: directory_record(0o755),
        b"lost+found": directory_record(0o755),
        b"lost+found/#12": regular_record(b"lost+found/#12"),
    }
    remaining, problems = split_lost_found(snapshot)

    assert problems == [
        "lost+found: mode: expected 0o700, actual 0o755",
        "lost+found/#12: unexpected entry in lost+found",
    ]
    assert list(remaining) == [ROOT]


# --- skipping ------------------------------------------------------------------------------


def test_skip_or_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="tool missing"):
        skip_or_fail("tool missing")


def test_skip_or_fail_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="tool missing"):
        skip_or_fail("tool missing")


def test_require_root_as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="need root"):
        require_root()
