"""Edge cases of tar layers that real producers write and that other converters got wrong.

Each test builds its input in place (tarfile members with explicit fields, raw header bytes,
or GNU tar on a folder) and states the expected result itself, following the rules in
docs/layer-format.md. Every image is checked by ``e2fsck -fn`` and read back through the
kernel's ext4 driver on a read-only loop mount. The whiteout cases stack the images with the
kernel's overlayfs and read the merged view. A rejected layer must leave no image and no
temporary file beside the destination.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import gzip
import hashlib
import os
import pwd
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest
import zstandard

import tarbuild
from lcow.errors import CorruptInputError, LcowError
from lcow.layer.tar2ext4 import convert_tar
from oracle import (
    OPAQUE_XATTR,
    e2fsck_clean,
    find_tool,
    loop_mount,
    run_tool,
    skip_or_fail,
    snapshot_tree,
)
from tarbuild import (
    END_OF_ARCHIVE,
    GNU_MAGIC,
    Member,
    device,
    directory,
    fifo,
    hard_link,
    regular,
    symlink,
    tar_bytes,
)
from treegen import seeded_bytes

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB
BLOCK_SIZE_BYTES: Final = 4096  # the block size of every lcow image
HASH_CHUNK_BYTES: Final = 8 * MIB

ROOT: Final = b"."
LOST_AND_FOUND: Final = b"lost+found"
LOST_AND_FOUND_INODE: Final = 11  # mke2fs gives it the first inode after the reserved ones

# ext4 keeps 32 bits of seconds and 2 epoch bits, so the earliest time it stores is
# -2**31 s, 1901-12-13T20:45:52Z.
EXT4_MIN_TIME_S: Final = -(2**31)
EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

# security.capability as struct vfs_cap_data revision 2, little-endian: magic 0x02000000
# with the effective flag, permitted bit 13 (CAP_NET_RAW), then zero inheritable and high
# masks.
CAP_NET_RAW_XATTR: Final = bytes([0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00]) + bytes(12)


# --- helpers -------------------------------------------------------------------------------


def convert_layer(archive: bytes, folder: Path, name: str = "layer") -> Path:
    """Write ``archive`` to FOLDER/NAME.tar, convert it to FOLDER/NAME.vhd and e2fsck it."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{name}.tar"
    source.write_bytes(archive)
    image = folder / f"{name}.vhd"

    convert_tar(source, image)

    e2fsck_clean(image)
    return image


def convert_rejected(
    archive: bytes, folder: Path, expected_error: type[LcowError] = LcowError
) -> LcowError:
    """Convert ``archive``, expect ``expected_error``, and check that no output file is left.

    The destination is the only file in a folder of its own, so any file there afterwards
    (the image or the converter's temporary file) is a leftover.
    """
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "layer.tar"
    source.write_bytes(archive)
    output = folder / "output"
    output.mkdir()

    with pytest.raises(expected_error) as caught:
        convert_tar(source, output / "layer.vhd")

    assert sorted(output.iterdir()) == []
    return caught.value


@contextlib.contextmanager
def overlay_mount(layers: Sequence[Path], merged: Path) -> Iterator[Path]:
    """Mount the layer images, top layer first, as one read-only overlayfs at ``merged``.

    Each image gets a read-only loop mount. On exit, also when the body raises, the overlay
    is unmounted before the loop mounts below it, and every loop device is detached.
    """
    with contextlib.ExitStack() as cleanup:
        lower_dirs = [str(cleanup.enter_context(loop_mount(image))) for image in layers]
        merged.mkdir()
        cleanup.callback(merged.rmdir)
        # overlayfs lists lowerdir from the top layer down. With two or more lower layers
        # and no upperdir, the merged view is read-only.
        options = "lowerdir=" + ":".join(lower_dirs)
        run_tool(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
        cleanup.callback(run_tool, ["umount", str(merged)])
        yield merged


def tree_paths(root: Path) -> set[bytes]:
    """Return every path under ``root`` (``.`` for ``root`` itself), relative, as bytes."""
    return set(snapshot_tree(root))


def sha256_of_file(path: Path) -> str:
    """Return the SHA-256 of a file's content, read in chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as content:
        while count := content.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def permissions(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def unix_time_s(year: int, month: int, day: int) -> int:
    moment = datetime.datetime(year, month, day, tzinfo=datetime.UTC)
    return (moment - EPOCH) // datetime.timedelta(seconds=1)


# --- parent directories and repeated entries -----------------------------------------------


@pytest.mark.root
def test_parents_after_children(tmp_path: Path) -> None:
    """Directory entries that come after their content still set the directory metadata."""
    archive = tar_bytes(
        [
            regular("dir1/sub/a.txt", b"hello\n", mode=0o640),
            directory("dir1/", mode=0o750, mtime=1_600_000_001),
            directory("dir1/sub/", mode=0o700, mtime=1_600_000_002),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert permissions(mountpoint / "dir1") == 0o750
        assert permissions(mountpoint / "dir1/sub") == 0o700
        assert permissions(mountpoint / "dir1/sub/a.txt") == 0o640
        assert (mountpoint / "dir1/sub/a.txt").read_bytes() == b"hello\n"
        assert os.lstat(mountpoint / "dir1").st_mtime_ns == 1_600_000_001 * 10**9
        assert os.lstat(mountpoint / "dir1/sub").st_mtime_ns == 1_600_000_002 * 10**9


@pytest.mark.root
def test_parents_never_listed(tmp_path: Path) -> None:
    """Parents that no entry names are created with mode 0755, owner 0:0 and mtime 0."""
    archive = tar_bytes([regular("other/deep/b.txt", b"b\n", uid=1000, gid=1000)])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        for implicit in ("other", "other/deep"):
            status = os.lstat(mountpoint / implicit)
            assert stat.S_ISDIR(status.st_mode), implicit
            assert stat.S_IMODE(status.st_mode) == 0o755, implicit
            assert status.st_uid == 0, implicit
            assert status.st_gid == 0, implicit
            assert status.st_mtime_ns == 0, implicit
        assert (mountpoint / "other/deep/b.txt").read_bytes() == b"b\n"
        assert os.lstat(mountpoint / "other/deep/b.txt").st_uid == 1000


@pytest.mark.root
def test_repeated_entries_merge(tmp_path: Path) -> None:
    """A second entry for a file replaces the first, and a second directory entry merges."""
    archive = tar_bytes(
        [
            directory("./", mode=0o700),
            regular("f.txt", b"one"),
            directory("d/", mode=0o755),
            regular("f.txt", b"two", mode=0o600),
            directory("d/", mode=0o700),
            directory("lost+found/", mode=0o700),
            regular("lost+found/x", b"x"),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        file_status = os.lstat(mountpoint / "f.txt")
        assert (mountpoint / "f.txt").read_bytes() == b"two"
        assert stat.S_IMODE(file_status.st_mode) == 0o600
        assert file_status.st_nlink == 1
        assert permissions(mountpoint / "d") == 0o700
        assert permissions(mountpoint) == 0o700
        assert sorted(path.name for path in mountpoint.iterdir()) == ["d", "f.txt", "lost+found"]
        assert os.lstat(mountpoint / "lost+found").st_ino == LOST_AND_FOUND_INODE
        assert [path.name for path in (mountpoint / "lost+found").iterdir()] == ["x"]
        assert (mountpoint / "lost+found/x").read_bytes() == b"x"


@pytest.mark.root
def test_read_only_modes_kept(tmp_path: Path) -> None:
    """Directories without write or search permission keep their modes and their content."""
    expected_modes = {
        "ro": 0o555,
        "ro/b.txt": 0o444,
        "ro/sub": 0o500,
        "ro/sub/a.txt": 0o444,
        "noexec": 0o644,
        "noexec/c.txt": 0o644,
    }
    archive = tar_bytes(
        [
            directory("ro/", mode=0o555),
            regular("ro/b.txt", b"b", mode=0o444),
            directory("ro/sub/", mode=0o500),
            regular("ro/sub/a.txt", b"a", mode=0o444),
            directory("noexec/", mode=0o644),
            regular("noexec/c.txt", b"c", mode=0o644),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        for path, mode in expected_modes.items():
            assert permissions(mountpoint / path) == mode, path
        assert (mountpoint / "ro/sub/a.txt").read_bytes() == b"a"
        assert (mountpoint / "noexec/c.txt").read_bytes() == b"c"


@pytest.mark.root
def test_root_entry_metadata(tmp_path: Path) -> None:
    """An entry for ``./`` sets the root directory's mode, owner and mtime."""
    archive = tar_bytes(
        [
            directory("./", mode=0o750, uid=1000, gid=1001, mtime=1_500_000_000),
            regular("f", b"f"),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        status = os.lstat(mountpoint)
        assert stat.S_IMODE(status.st_mode) == 0o750
        assert status.st_uid == 1000
        assert status.st_gid == 1001
        assert status.st_mtime_ns == 1_500_000_000 * 10**9


# --- whiteouts through overlayfs -----------------------------------------------------------


@pytest.mark.root
def test_opaque_dir_hides_lower(tmp_path: Path) -> None:
    """An opaque marker after the directory's own entries hides only the lower content."""
    lower = convert_layer(
        tar_bytes(
            [
                regular("d1/old.txt", b"old"),
                regular("d1/olddir/x.txt", b"x"),
                regular("gone/y.txt", b"y"),
                regular("keep.txt", b"keep"),
            ]
        ),
        tmp_path,
        "lower",
    )
    upper = convert_layer(
        tar_bytes(
            [
                directory("d1/"),
                regular("d1/foo.txt", b"foo"),
                directory("d1/sub/"),
                regular("d1/sub/bar.txt", b"bar"),
                regular("d1/.wh..wh..opq"),
                regular(".wh.gone"),
            ]
        ),
        tmp_path,
        "upper",
    )

    with loop_mount(upper) as mountpoint:
        whiteout = os.lstat(mountpoint / "gone")
        assert os.getxattr(mountpoint / "d1", OPAQUE_XATTR) == b"y"
        assert sorted(path.name for path in (mountpoint / "d1").iterdir()) == ["foo.txt", "sub"]
        assert [path.name for path in (mountpoint / "d1/sub").iterdir()] == ["bar.txt"]
        assert stat.S_ISCHR(whiteout.st_mode)
        assert os.major(whiteout.st_rdev) == 0
        assert os.minor(whiteout.st_rdev) == 0
        assert not any(b".wh." in path for path in tree_paths(mountpoint))

    with overlay_mount([upper, lower], tmp_path / "merged") as merged:
        assert tree_paths(merged) == {
            ROOT,
            LOST_AND_FOUND,
            b"keep.txt",
            b"d1",
            b"d1/foo.txt",
            b"d1/sub",
            b"d1/sub/bar.txt",
        }
        assert (merged / "d1/foo.txt").read_bytes() == b"foo"
        assert (merged / "d1/sub/bar.txt").read_bytes() == b"bar"


@pytest.mark.root
def test_opaque_dir_name_prefix(tmp_path: Path) -> None:
    """A lower ``foobar`` is hidden by an opaque directory holding ``foo``."""
    lower = convert_layer(tar_bytes([regular("d1/foobar", b"lower")]), tmp_path, "lower")
    upper = convert_layer(
        tar_bytes(
            [
                directory("d1/"),
                regular("d1/.wh..wh..opq"),
                regular("d1/foo", b"upper"),
            ]
        ),
        tmp_path,
        "upper",
    )

    with overlay_mount([upper, lower], tmp_path / "merged") as merged:
        assert tree_paths(merged) == {ROOT, LOST_AND_FOUND, b"d1", b"d1/foo"}
        assert (merged / "d1/foo").read_bytes() == b"upper"


@pytest.mark.root
def test_dir_recreated_above_whiteout(tmp_path: Path) -> None:
    """A directory removed by one layer and created again by the next shows only new files."""
    bottom = convert_layer(tar_bytes([regular("d/a.txt", b"a")]), tmp_path, "bottom")
    middle = convert_layer(tar_bytes([regular(".wh.d")]), tmp_path, "middle")
    top = convert_layer(tar_bytes([directory("d/"), regular("d/b.txt", b"b")]), tmp_path, "top")

    with overlay_mount([top, middle, bottom], tmp_path / "merged") as merged:
        assert tree_paths(merged) == {ROOT, LOST_AND_FOUND, b"d", b"d/b.txt"}
        assert (merged / "d/b.txt").read_bytes() == b"b"


@pytest.mark.root
def test_dir_recreated_same_layer(tmp_path: Path) -> None:
    """A whiteout and a new directory of the same name in one layer make it opaque."""
    lower = convert_layer(tar_bytes([regular("d/a.txt", b"a")]), tmp_path, "lower")
    upper = convert_layer(
        tar_bytes([regular(".wh.d"), regular("d/b.txt", b"b")]), tmp_path, "upper"
    )

    with loop_mount(upper) as mountpoint:
        assert stat.S_ISDIR(os.lstat(mountpoint / "d").st_mode)
        assert os.getxattr(mountpoint / "d", OPAQUE_XATTR) == b"y"

    with overlay_mount([upper, lower], tmp_path / "merged") as merged:
        assert tree_paths(merged) == {ROOT, LOST_AND_FOUND, b"d", b"d/b.txt"}
        assert (merged / "d/b.txt").read_bytes() == b"b"


@pytest.mark.root
def test_whiteout_one_hard_link(tmp_path: Path) -> None:
    """Whiting out one name of a hard-linked file keeps the other name and the data."""
    lower = convert_layer(
        tar_bytes([regular("LINK-A", b"payload\n"), hard_link("LINK-Z", "LINK-A")]),
        tmp_path,
        "lower",
    )
    upper = convert_layer(tar_bytes([regular(".wh.LINK-A")]), tmp_path, "upper")

    with loop_mount(lower) as mountpoint:
        first = os.lstat(mountpoint / "LINK-A")
        second = os.lstat(mountpoint / "LINK-Z")
        assert first.st_ino == second.st_ino
        assert first.st_nlink == 2

    with overlay_mount([upper, lower], tmp_path / "merged") as merged:
        assert tree_paths(merged) == {ROOT, LOST_AND_FOUND, b"LINK-Z"}
        assert (merged / "LINK-Z").read_bytes() == b"payload\n"


# --- hard links ----------------------------------------------------------------------------


def test_hard_link_before_target(tmp_path: Path) -> None:
    archive = tar_bytes([hard_link("b.txt", "a.txt"), regular("a.txt", b"a")])

    error = convert_rejected(archive, tmp_path)

    assert "b.txt" in str(error)
    assert "a.txt" in str(error)


@pytest.mark.root
def test_hard_link_absolute_target(tmp_path: Path) -> None:
    """A hard link target with a leading ``/`` is a path inside the layer."""
    archive = tar_bytes(
        [
            regular("usr/bin/perlbug", b"#!/usr/bin/perl\n", mode=0o755),
            hard_link("usr/bin/perlthanks", "/usr/bin/perlbug"),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        original = os.lstat(mountpoint / "usr/bin/perlbug")
        link = os.lstat(mountpoint / "usr/bin/perlthanks")
        assert link.st_ino == original.st_ino
        assert original.st_nlink == 2
        assert (mountpoint / "usr/bin/perlthanks").read_bytes() == b"#!/usr/bin/perl\n"


@pytest.mark.parametrize("target", ["/../victim", "../../x"])
def test_hard_link_target_escapes(target: str, tmp_path: Path) -> None:
    """A target that leaves the root is rejected, not clamped to a file at the root."""
    archive = tar_bytes(
        [
            regular("victim", b"victim\n"),
            regular("x", b"x\n"),
            regular("usr/bin/perlbug", b"#!/usr/bin/perl\n", mode=0o755),
            hard_link("usr/bin/perlthanks", target),
        ]
    )

    error = convert_rejected(archive, tmp_path)

    assert "usr/bin/perlthanks" in str(error)
    assert target in str(error)
    assert "leaves the layer root" in str(error)


@pytest.mark.root
def test_hard_link_dot_slash(tmp_path: Path) -> None:
    archive = tar_bytes([regular("./bar", b"foo\n"), hard_link("./foo", "./bar")])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        bar = os.lstat(mountpoint / "bar")
        foo = os.lstat(mountpoint / "foo")
        assert foo.st_ino == bar.st_ino
        assert bar.st_nlink == 2
        assert (mountpoint / "foo").read_bytes() == b"foo\n"


def test_hard_link_to_directory(tmp_path: Path) -> None:
    archive = tar_bytes([directory("dir-target/"), hard_link("dir-link", "dir-target")])

    error = convert_rejected(archive, tmp_path)

    assert "dir-link" in str(error)
    assert "dir-target" in str(error)


# --- paths that leave the layer ------------------------------------------------------------


def host_fingerprint(path: Path) -> tuple[int, int, int, int, str | None] | None:
    """Return (inode, size, mtime, ctime, SHA-256 of a regular file) of a host path, or None."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    digest = sha256_of_file(path) if stat.S_ISREG(status.st_mode) else None
    return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns, digest)


@pytest.mark.parametrize(
    ("link_target", "entry", "host_paths"),
    [
        pytest.param(
            "/tmp/outside",
            "evil/pwned.txt",
            ("/tmp/outside", "/tmp/outside/pwned.txt"),
            id="tmp-outside",
        ),
        pytest.param("/etc", "x/passwd", ("/etc/passwd",), id="etc-passwd"),
    ],
)
def test_write_through_symlink(
    link_target: str, entry: str, host_paths: tuple[str, ...], tmp_path: Path
) -> None:
    """An entry below a symlink of the same layer is rejected and writes nothing outside."""
    link_name = entry.split("/", maxsplit=1)[0]
    before = {path: host_fingerprint(Path(path)) for path in host_paths}
    archive = tar_bytes([symlink(link_name, link_target), regular(entry, b"pwned\n")])

    error = convert_rejected(archive, tmp_path)

    assert entry in str(error)
    assert "is a symlink" in str(error)
    for path in host_paths:
        assert host_fingerprint(Path(path)) == before[path], f"{path} changed"


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([symlink("../../escape-link", "/etc/passwd")], id="symlink"),
        pytest.param(
            [regular("a/f", b"f"), hard_link("a/../../../escape-hl", "a/f")], id="hard-link"
        ),
    ],
)
def test_escaping_names_rejected(members: list[Member], tmp_path: Path) -> None:
    error = convert_rejected(tar_bytes(members), tmp_path / "work")

    assert "escape-" in str(error)
    assert "leaves the layer root" in str(error)
    assert sorted(path.name for path in tmp_path.rglob("escape-*")) == []


@pytest.mark.root
def test_absolute_name_kept(tmp_path: Path) -> None:
    archive = tar_bytes([regular("/abs.txt", b"abs\n")])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert sorted(path.name for path in mountpoint.iterdir()) == ["abs.txt", "lost+found"]
        assert (mountpoint / "abs.txt").read_bytes() == b"abs\n"


# --- metadata: xattrs, special modes, owners, devices, times --------------------------------


@pytest.mark.root
def test_capabilities_and_special_modes(tmp_path: Path) -> None:
    getcap = find_tool("getcap")
    if getcap is None:
        skip_or_fail("getcap not found on PATH; install the Debian package libcap2-bin")
    unknown_user = "lcow-test-no-such-user"
    unknown_group = "lcow-test-no-such-group"
    with pytest.raises(KeyError):
        pwd.getpwnam(unknown_user)
    with pytest.raises(KeyError):
        grp.getgrnam(unknown_group)
    archive = tar_bytes(
        [
            regular(
                "bin/pinger",
                b"\x7fELF",
                mode=0o755,
                pax_headers={
                    "SCHILY.xattr.security.capability": CAP_NET_RAW_XATTR.decode("ascii"),
                    "SCHILY.xattr.user.note": "ping needs raw sockets",
                },
            ),
            regular("bin/setuid", b"u", mode=0o4755),
            regular("bin/setgid", b"g", mode=0o2755),
            directory("tmp/", mode=0o1777),
            regular(
                "home/owned",
                b"o",
                uid=1234,
                gid=5678,
                uname=unknown_user,
                gname=unknown_group,
            ),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        pinger = mountpoint / "bin/pinger"
        assert permissions(pinger) == 0o755
        assert os.getxattr(pinger, "security.capability") == CAP_NET_RAW_XATTR
        assert os.getxattr(pinger, "user.note") == b"ping needs raw sockets"
        assert permissions(mountpoint / "bin/setuid") == 0o4755
        assert permissions(mountpoint / "bin/setgid") == 0o2755
        assert permissions(mountpoint / "tmp") == 0o1777
        assert os.lstat(mountpoint / "home/owned").st_uid == 1234
        assert os.lstat(mountpoint / "home/owned").st_gid == 5678

        output = run_tool([getcap, str(pinger)]).stdout
        assert "cap_net_raw" in output


@pytest.mark.root
def test_device_nodes(tmp_path: Path) -> None:
    expected = {
        "dev/console": (stat.S_IFCHR, 0o600, 5, 1),
        "dev/null": (stat.S_IFCHR, 0o666, 1, 3),
        "dev/loop0": (stat.S_IFBLK, 0o660, 7, 0),
        "dev/bigminor": (stat.S_IFCHR, 0o600, 259, 65536),
    }
    kinds = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}
    members = [
        device(path, kinds[kind], major, minor, mode=mode)
        for path, (kind, mode, major, minor) in expected.items()
    ]
    archive = tar_bytes([*members, fifo("run/pipe", mode=0o600)])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        for path, (kind, mode, major, minor) in expected.items():
            status = os.lstat(mountpoint / path)
            assert stat.S_IFMT(status.st_mode) == kind, path
            assert stat.S_IMODE(status.st_mode) == mode, path
            assert os.major(status.st_rdev) == major, path
            assert os.minor(status.st_rdev) == minor, path
        pipe = os.lstat(mountpoint / "run/pipe")
        assert stat.S_ISFIFO(pipe.st_mode)
        assert stat.S_IMODE(pipe.st_mode) == 0o600


@pytest.mark.root
def test_pax_negative_mtime(tmp_path: Path) -> None:
    """A PAX mtime before 1970 but within ext4's range is kept exactly."""
    mtime_s = -2146608000  # 1901-12-22T00:00:00Z
    archive = tar_bytes([regular("old.txt", b"old", mtime=mtime_s)])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert os.lstat(mountpoint / "old.txt").st_mtime_ns == mtime_s * 10**9


@pytest.mark.root
def test_base256_mtime_clamped(tmp_path: Path) -> None:
    """A base-256 mtime before 1901-12-13T20:45:52Z clamps to that time."""
    mtime_s = unix_time_s(1754, 8, 30)
    data = b"older than ext4\n"
    header = tarbuild.ustar_header(
        b"ancient.txt",
        typeflag=tarfile.REGTYPE,
        size=len(data),
        mtime_field=tarbuild.base256_field(mtime_s, 12),
        magic=GNU_MAGIC,
    )
    archive = header + tarbuild.padded(data) + END_OF_ARCHIVE
    source = tmp_path / "input.tar"
    source.write_bytes(archive)
    with tarfile.open(source) as reference:
        assert reference.getmember("ancient.txt").mtime == mtime_s

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert os.lstat(mountpoint / "ancient.txt").st_mtime_ns == EXT4_MIN_TIME_S * 10**9
        assert (mountpoint / "ancient.txt").read_bytes() == data


# --- names ---------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(
    ("tar_format", "header_markers"),
    [
        pytest.param(tarfile.USTAR_FORMAT, (b"ustar\x0000",), id="ustar"),
        pytest.param(tarfile.GNU_FORMAT, (b"ustar  \x00",), id="gnu"),
        pytest.param(tarfile.PAX_FORMAT, (b"hdrcharset=BINARY",), id="pax-binary"),
    ],
)
def test_non_utf8_names(
    tar_format: tarbuild.TarFormat, header_markers: tuple[bytes, ...], tmp_path: Path
) -> None:
    """Latin-1 bytes in names and link targets are stored byte for byte."""
    archive = tar_bytes(
        [
            regular(b"caf\xe9", b"latin-1\n"),
            directory(b"r\xe9pertoire/"),
            regular(b"r\xe9pertoire/na\xefve", b"inside\n"),
            symlink(b"lien", b"caf\xe9"),
            hard_link(b"m\xeame", b"caf\xe9"),
        ],
        tar_format=tar_format,
    )
    for marker in header_markers:
        assert marker in archive

    image = convert_layer(archive, tmp_path)

    # The bytes forms of listdir, readlink and open pass the names to the kernel unchanged.
    with loop_mount(image) as mountpoint:
        root = os.fsencode(mountpoint)
        root_names = os.listdir(root)  # noqa: PTH208
        directory_names = os.listdir(root + b"/r\xe9pertoire")  # noqa: PTH208
        assert sorted(root_names) == sorted(
            [b"caf\xe9", b"r\xe9pertoire", b"lien", b"m\xeame", LOST_AND_FOUND]
        )
        assert directory_names == [b"na\xefve"]
        assert os.readlink(root + b"/lien") == b"caf\xe9"  # noqa: PTH115
        with open(root + b"/caf\xe9", "rb") as content:
            assert content.read() == b"latin-1\n"
        assert os.lstat(root + b"/m\xeame").st_ino == os.lstat(root + b"/caf\xe9").st_ino


@pytest.mark.root
@pytest.mark.parametrize(
    ("tar_format", "extension_typeflags"),
    [
        # GNU long name ('L') and long link target ('K') headers, or PAX headers ('x').
        pytest.param(tarfile.GNU_FORMAT, {b"L", b"K"}, id="gnu"),
        pytest.param(tarfile.PAX_FORMAT, {b"x"}, id="pax"),
    ],
)
def test_long_names_and_targets(
    tar_format: tarbuild.TarFormat, extension_typeflags: set[bytes], tmp_path: Path
) -> None:
    """Names and link targets over the 100 bytes of the ustar fields are kept whole."""
    long_name = "long-" + "d" * 70 + "/" + "f" * 90 + ".txt"
    long_link_name = "link-" + "l" * 120
    long_hard_link_name = "hard-" + "h" * 120
    long_target = "/" + "/".join(["t" * 50] * 4)
    archive = tar_bytes(
        [
            regular(long_name, b"long\n"),
            symlink(long_link_name, long_target),
            hard_link(long_hard_link_name, long_name),
        ],
        tar_format=tar_format,
    )
    assert len(long_name) > 100
    assert len(long_target) > 100
    assert extension_typeflags <= set(tarbuild.header_typeflags(archive))

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert (mountpoint / long_name).read_bytes() == b"long\n"
        assert str((mountpoint / long_link_name).readlink()) == long_target
        original = os.lstat(mountpoint / long_name)
        assert os.lstat(mountpoint / long_hard_link_name).st_ino == original.st_ino
        assert original.st_nlink == 2


@pytest.mark.root
def test_component_255_bytes(tmp_path: Path) -> None:
    name = "n" * 255
    archive = tar_bytes([directory("d/"), regular(f"d/{name}", b"max\n")])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert [path.name for path in (mountpoint / "d").iterdir()] == [name]
        assert (mountpoint / "d" / name).read_bytes() == b"max\n"


def test_component_256_bytes(tmp_path: Path) -> None:
    archive = tar_bytes([regular("d/" + "n" * 256, b"too long\n")])

    error = convert_rejected(archive, tmp_path)

    assert "256 bytes" in str(error)
    assert "255" in str(error)


# --- headers that are not files ------------------------------------------------------------


@pytest.mark.root
def test_pax_global_header_skipped(tmp_path: Path) -> None:
    """PAX global headers, first (as git archive writes) and between members, add no file."""
    records = tarbuild.pax_records({b"comment": b"3c5d7e1f0a9b8c2d4e6f"})
    global_header = tarbuild.ustar_header(
        b"pax_global_header", typeflag=tarfile.XGLTYPE, size=len(records)
    )
    archive = (
        global_header
        + tarbuild.padded(records)
        + tarbuild.member_bytes(regular("first.txt", b"1"))
        + global_header
        + tarbuild.padded(records)
        + tarbuild.member_bytes(regular("second.txt", b"2"))
        + END_OF_ARCHIVE
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND, b"first.txt", b"second.txt"}


@pytest.mark.root
def test_gnu_volume_label_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "file.txt").write_bytes(b"labelled\n")
    source = tarbuild.gnu_tar_create(
        folder, tmp_path / "labelled.tar", "--format=gnu", "--label=layer-volume"
    )
    first_header = source.read_bytes()[: tarbuild.BLOCK_BYTES]
    assert first_header[tarbuild.TYPEFLAG_OFFSET : tarbuild.TYPEFLAG_OFFSET + 1] == b"V"

    image = convert_layer(source.read_bytes(), tmp_path)

    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND, b"file.txt"}


def test_gnu_multi_volume_continuation(tmp_path: Path) -> None:
    """A volume that starts inside a file ('M' header) never yields a partial file.

    The converter may reject the volume, and then the error names the member. Or it may skip
    the continuation, and then the image contains no file at all.
    """
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "part.bin").write_bytes(seeded_bytes(1, 30_000))
    first_volume = tmp_path / "volume-1.tar"
    second_volume = tmp_path / "volume-2.tar"
    # --tape-length is in units of 1024 bytes: 20 KiB volumes split the 30000-byte file.
    arguments = [
        "tar",
        "--create",
        "--format=gnu",
        "--multi-volume",
        "--tape-length=20",
        f"--file={first_volume}",
        f"--file={second_volume}",
        f"--directory={folder}",
        "part.bin",
    ]
    run_tool(arguments)
    archive = second_volume.read_bytes()
    assert archive[tarbuild.TYPEFLAG_OFFSET : tarbuild.TYPEFLAG_OFFSET + 1] == b"M"
    output = tmp_path / "output"
    output.mkdir()
    image = output / "layer.vhd"

    rejection: LcowError | None = None
    try:
        convert_tar(second_volume, image)
    except LcowError as error:
        rejection = error

    if rejection is not None:
        assert "part.bin" in str(rejection)
        assert sorted(output.iterdir()) == []
        return
    e2fsck_clean(image)
    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND}


# --- sparse and large files ----------------------------------------------------------------


def write_sparse_file(path: Path, size: int, regions: Sequence[tuple[int, bytes]]) -> None:
    """Create ``path`` as a sparse host file of ``size`` bytes with data at the given offsets."""
    with path.open("wb") as output:
        os.truncate(output.fileno(), size)
        for offset, data in regions:
            os.pwrite(output.fileno(), data, offset)


def sparse_content_sha256(size: int, regions: Sequence[tuple[int, bytes]]) -> str:
    """Return the SHA-256 of a ``size``-byte file that is zero outside ``regions``.

    The regions must not overlap. Hashing the model avoids reading gigabytes of holes back
    from the host file.
    """
    digest = hashlib.sha256()
    zeros = memoryview(bytes(HASH_CHUNK_BYTES))

    def add_zeros(count: int) -> None:
        while count > 0:
            step = min(count, len(zeros))
            digest.update(zeros[:step])
            count -= step

    position = 0
    for offset, data in sorted(regions):
        add_zeros(offset - position)
        digest.update(data)
        position = offset + len(data)
    add_zeros(size - position)
    return digest.hexdigest()


SPARSE_FILE_SIZE_BYTES: Final = 64 * MIB
SPARSE_REGIONS: Final = (
    (0, seeded_bytes(2, 4096)),
    (10 * MIB + 100, seeded_bytes(3, 5000)),
    (SPARSE_FILE_SIZE_BYTES - 1000, seeded_bytes(4, 1000)),
)
# Upper bound for the blocks of SPARSE_REGIONS in an image that keeps the holes: each
# region touches at most three 4 KiB blocks.
SPARSE_ALLOCATED_MAX_BYTES: Final = 9 * BLOCK_SIZE_BYTES


@pytest.mark.root
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--format=gnu",), id="gnu"),
        pytest.param(("--format=pax", "--sparse-version=0.0"), id="pax-0.0"),
        pytest.param(("--format=pax", "--sparse-version=0.1"), id="pax-0.1"),
        pytest.param(("--format=pax", "--sparse-version=1.0"), id="pax-1.0"),
    ],
)
def test_sparse_formats(options: tuple[str, ...], tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    host_file = folder / "sparse.bin"
    write_sparse_file(host_file, SPARSE_FILE_SIZE_BYTES, SPARSE_REGIONS)
    expected_digest = sparse_content_sha256(SPARSE_FILE_SIZE_BYTES, SPARSE_REGIONS)
    assert sha256_of_file(host_file) == expected_digest
    source = tarbuild.gnu_tar_create(folder, tmp_path / "sparse.tar", "--sparse", *options)
    assert source.stat().st_size < MIB

    image = convert_layer(source.read_bytes(), tmp_path)

    with loop_mount(image) as mountpoint:
        status = os.lstat(mountpoint / "sparse.bin")
        assert status.st_size == SPARSE_FILE_SIZE_BYTES
        assert sha256_of_file(mountpoint / "sparse.bin") == expected_digest
        assert status.st_blocks * 512 <= SPARSE_ALLOCATED_MAX_BYTES


@pytest.mark.root
def test_file_over_3_gib(tmp_path: Path) -> None:
    """A 3 GiB file, given as an old GNU sparse member, is stored with its size and content."""
    size = 3 * GIB + 4321
    folder = tmp_path / "tree"
    folder.mkdir()
    host_file = folder / "huge.bin"
    regions = (
        (0, seeded_bytes(5, 8192)),
        (GIB + 123, seeded_bytes(6, 4096)),
        (2 * GIB - 2048, seeded_bytes(7, 4096)),
        (size - 4321, seeded_bytes(8, 4321)),
    )
    write_sparse_file(host_file, size, regions)
    expected_digest = sparse_content_sha256(size, regions)
    source = tarbuild.gnu_tar_create(folder, tmp_path / "huge.tar", "--format=gnu", "--sparse")
    assert source.stat().st_size < MIB
    image = tmp_path / "layer.vhd"

    convert_tar(source, image)

    e2fsck_clean(image)
    with loop_mount(image) as mountpoint:
        assert os.lstat(mountpoint / "huge.bin").st_size == size
        assert sha256_of_file(mountpoint / "huge.bin") == expected_digest


# --- replacing entries ---------------------------------------------------------------------


def superblock_fields(image: Path) -> dict[str, str]:
    """Return the superblock fields that ``dumpe2fs -h`` prints, by their printed names."""
    fields: dict[str, str] = {}
    for line in run_tool(["dumpe2fs", "-h", str(image)]).stdout.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields[key.strip()] = value.strip()
    return fields


def used_blocks(image: Path) -> int:
    fields = superblock_fields(image)
    return int(fields["Block count"]) - int(fields["Free blocks"])


@pytest.mark.root
def test_replaced_file_space_freed(tmp_path: Path) -> None:
    """The blocks of a file that a later entry replaces are free in the image."""
    replaced_blocks = MIB // BLOCK_SIZE_BYTES
    replaced = convert_layer(
        tar_bytes(
            [
                regular("data.bin", seeded_bytes(9, MIB)),
                regular("data.bin", b"small\n"),
            ]
        ),
        tmp_path,
        "replaced",
    )
    baseline = convert_layer(tar_bytes([regular("data.bin", b"small\n")]), tmp_path, "baseline")

    replaced_fields = superblock_fields(replaced)

    assert used_blocks(replaced) == used_blocks(baseline)
    assert int(replaced_fields["Free blocks"]) >= replaced_blocks
    with loop_mount(replaced) as mountpoint:
        assert (mountpoint / "data.bin").read_bytes() == b"small\n"


TYPE_CHANGES: Final = {
    "file-to-directory": (
        [regular("x", b"file"), directory("x/"), regular("x/child", b"child")],
        {b"x", b"x/child"},
        stat.S_IFDIR,
    ),
    "directory-to-file": (
        [
            directory("x/"),
            regular("x/a", b"a"),
            directory("x/sub/"),
            regular("x/sub/b", b"b"),
            regular("x", b"file"),
        ],
        {b"x"},
        stat.S_IFREG,
    ),
    "directory-to-symlink": (
        [directory("x/"), regular("x/a", b"a"), symlink("x", "target")],
        {b"x"},
        stat.S_IFLNK,
    ),
    "symlink-to-directory": (
        [symlink("x", "elsewhere"), directory("x/"), regular("x/new", b"new")],
        {b"x", b"x/new"},
        stat.S_IFDIR,
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("change", list(TYPE_CHANGES))
def test_type_change(change: str, tmp_path: Path) -> None:
    """A later entry of another type replaces the path, and an old subtree goes with it."""
    members, expected_paths, expected_type = TYPE_CHANGES[change]

    image = convert_layer(tar_bytes(members), tmp_path)

    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND, *expected_paths}
        assert stat.S_IFMT(os.lstat(mountpoint / "x").st_mode) == expected_type


# --- broken and empty streams --------------------------------------------------------------


def layer_with_big_file() -> tuple[bytes, int, int]:
    """Return a ustar layer and the offsets of its first file's header end and data middle."""
    big = regular("big.bin", seeded_bytes(10, 64 * KIB))
    archive = tar_bytes([big, regular("after.txt", b"after\n")], tar_format=tarfile.USTAR_FORMAT)
    header_end = tarbuild.BLOCK_BYTES
    data_middle = header_end + 32 * KIB
    return archive, header_end, data_middle


def gzip_cut_at(archive: bytes, cut: int) -> tuple[bytes, bytes]:
    """Return a gzip stream of ``archive`` and its prefix that decompresses to archive[:cut].

    A full flush at ``cut`` ends the deflate data there on a byte boundary, so the prefix is
    the whole layer's gzip stream cut where its tar reaches ``cut``.
    """
    compressor = zlib.compressobj(wbits=31)  # 16 + 15: gzip header and trailer
    prefix = compressor.compress(archive[:cut]) + compressor.flush(zlib.Z_FULL_FLUSH)
    whole = prefix + compressor.compress(archive[cut:]) + compressor.flush()
    assert gzip.decompress(whole) == archive
    assert zlib.decompressobj(wbits=31).decompress(prefix) == archive[:cut]
    return whole, prefix


def broken_gzip_cut_in_data() -> bytes:
    archive, _, data_middle = layer_with_big_file()
    return gzip_cut_at(archive, data_middle)[1]


def broken_gzip_cut_after_header() -> bytes:
    archive, header_end, _ = layer_with_big_file()
    return gzip_cut_at(archive, header_end)[1]


def broken_gzip_crc() -> bytes:
    archive, _, _ = layer_with_big_file()
    damaged = bytearray(gzip.compress(archive, mtime=0))
    damaged[-8] ^= 0xFF  # the trailer is CRC-32 then ISIZE, 4 bytes each
    return bytes(damaged)


def broken_size_past_end() -> bytes:
    # The header declares 4096 bytes, but only one data block and the end marker follow.
    header = tarbuild.ustar_header(b"short.bin", typeflag=tarfile.REGTYPE, size=4096)
    return header + tarbuild.padded(b"x" * 100) + END_OF_ARCHIVE


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(broken_gzip_cut_in_data, id="gzip-cut-in-data"),
        pytest.param(broken_gzip_cut_after_header, id="gzip-cut-after-header"),
        pytest.param(broken_gzip_crc, id="gzip-crc"),
        pytest.param(broken_size_past_end, id="size-past-end"),
    ],
)
def test_broken_stream_rejected(build: Callable[[], bytes], tmp_path: Path) -> None:
    convert_rejected(build(), tmp_path, CorruptInputError)


@pytest.mark.root
def test_gzip_layer_intact(tmp_path: Path) -> None:
    """The layer that the cut and damaged streams start from converts when it is whole."""
    archive, _, data_middle = layer_with_big_file()
    whole, _ = gzip_cut_at(archive, data_middle)

    image = convert_layer(whole, tmp_path)

    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND, b"big.bin", b"after.txt"}
        assert (mountpoint / "big.bin").read_bytes() == seeded_bytes(10, 64 * KIB)


@pytest.mark.parametrize("zero_blocks", [0, 1])
def test_missing_end_marker(zero_blocks: int, tmp_path: Path) -> None:
    members = [regular("a.txt", b"a\n"), regular("b.txt", b"b\n")]
    body = b"".join(tarbuild.member_bytes(member) for member in members)
    archive = body + bytes(zero_blocks * tarbuild.BLOCK_BYTES)

    error = convert_rejected(archive, tmp_path, CorruptInputError)

    assert "end-of-archive" in str(error)


def test_corrupt_zstd(tmp_path: Path) -> None:
    archive, _, _ = layer_with_big_file()
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    damaged = bytearray(compressor.compress(archive))
    damaged[len(damaged) // 2] ^= 0xFF

    convert_rejected(bytes(damaged), tmp_path, CorruptInputError)


EMPTY_LAYERS: Final = {
    "zero-bytes": b"",
    "end-marker": END_OF_ARCHIVE,
    "end-marker-record": bytes(10240),  # tarfile and GNU tar pad to a 10240-byte record
    "gzip-end-marker": gzip.compress(END_OF_ARCHIVE, mtime=0),
    "zstd-end-marker": zstandard.ZstdCompressor().compress(END_OF_ARCHIVE),
    "gzip-zero-bytes": gzip.compress(b"", mtime=0),
    "zstd-zero-bytes": zstandard.ZstdCompressor().compress(b""),
}


@pytest.mark.root
@pytest.mark.parametrize("layer", list(EMPTY_LAYERS))
def test_empty_layer(layer: str, tmp_path: Path) -> None:
    image = convert_layer(EMPTY_LAYERS[layer], tmp_path)

    with loop_mount(image) as mountpoint:
        assert tree_paths(mountpoint) == {ROOT, LOST_AND_FOUND}
