"""Read kernel-written and damaged ext4 filesystems back with Ext4Reader.

The main input is a sandbox as a container leaves it: mke2fs formats a sparse file with its
defaults, the kernel mounts it, overlayfs stacks it on two corpus layer images, and real
work goes through the merged view. The reader's view of ``upper/`` must equal the kernel's,
its export must extract with GNU tar to the same tree, and its changes must match the work
done. Other tests damage small images (journal recovery pending, wrong checksums, random
bytes) and read ext4 stored in VHDX files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import oracle
import treegen
from lcow import vhdx
from lcow.cli import main
from lcow.disk import open_disk
from lcow.errors import CorruptInputError, LcowError, UnsupportedError
from lcow.ext4.reader import Ext4Reader
from lcow.layer.changes import ChangeKind, LayerTree, MergedView, diff_size, layer_changes
from lcow.layer.export import export_tar
from lcow.layer.tar2ext4 import convert_tar
from oracle import (
    Snapshot,
    compare_trees,
    expected_from_tar_extraction,
    extract_with_gnu_tar,
    format_differences,
    loop_mount,
    run_tool,
    snapshot_tree,
)
from readback import change_pairs, gnu_tar_names, open_reader, reader_snapshot

TESTS_FOLDER: Final = Path(__file__).parent
MIB: Final = 1 << 20
GIB: Final = 1 << 30
BLOCK_BYTES: Final = 4096  # the block size of the images made here with mke2fs -b 4096

# --- the sandbox -----------------------------------------------------------------------------

SANDBOX_SIZE_BYTES: Final = GIB  # sparse, and the work below writes about 25 MB of it
SANDBOX_VARIANTS: Final = {
    "defaults": (),  # mke2fs 1.47: 64bit, metadata_csum, flex_bg, dir_index, journal
    "inline-data": ("-O", "inline_data"),
}
# The lower layers, top first: buildah's diff of the base system, then the base system.
LOWER_LAYER_NAMES: Final = ("L2-buildah", "L1-base")

# overlayfs keeps its bookkeeping in these xattrs of the upper directory.
OVERLAY_XATTR_PREFIX: Final = "trusted.overlay."
OPAQUE_XATTR: Final = "trusted.overlay.opaque"

# A directory of this many entries no longer fits in one block, so the kernel indexes it
# (htree, EXT4_INDEX_FL).
HTREE_ENTRY_COUNT: Final = 3000
EXT4_INDEX_FL: Final = 0x1000
EXT4_INLINE_DATA_FL: Final = 0x10000000

# 2000 separate 4 KiB pieces make 2000 extents. A leaf block holds 340 extents and the inode
# 4 entries, so the extent tree gets index blocks on two levels (depth 2).
SPARSE_PIECE_COUNT: Final = 2000
SPARSE_PIECE_BYTES: Final = 4096
SPARSE_STRIDE_BYTES: Final = 56 * 1024
SPARSE_FILE_SIZE_BYTES: Final = 110 * MIB

LONG_SYMLINK_TARGET: Final = "/opt/" + "long-target-component/" * 5 + "end"  # 118 bytes
SHORT_SYMLINK_TARGET: Final = "data.bin"
NANOSECOND_MTIME_NS: Final = 1_600_000_000_123_456_789
CAPABILITY: Final = treegen.capability_value(effective=True, permitted=1 << 13, inheritable=0)


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """A sandbox image after the work, and the changes that the work must produce."""

    image: Path
    variant: str
    lower_images: tuple[Path, ...]  # top first
    expected_changes: dict[str, ChangeKind]  # "/path" -> kind


class ExpectedChanges:
    """Changes written down as the work happens, with Docker's rules for parent directories.

    A path that the lower layers show is a modify, any other an add. Every directory above a
    changed path is in the upper directory too, so it is listed as well.
    """

    def __init__(self, lower_paths: frozenset[str]) -> None:
        self.lower_paths = lower_paths
        self.kinds: dict[str, ChangeKind] = {}

    def write(self, path: str) -> None:
        kind = ChangeKind.MODIFY if path in self.lower_paths else ChangeKind.ADD
        self.kinds["/" + path] = kind
        self._parents(path)

    def delete(self, path: str) -> None:
        self.kinds["/" + path] = ChangeKind.DELETE
        self._parents(path)

    def recreate_directory(self, path: str, new_names: set[str]) -> None:
        """Record a lower directory removed and made again: each lower entry not made
        again is a delete."""
        self.write(path)
        for lower_path in self.lower_paths:
            parent, name = posixpath.split(lower_path)
            if parent == path and name not in new_names:
                self.kinds["/" + lower_path] = ChangeKind.DELETE

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        while parent:
            if "/" + parent not in self.kinds:
                known = parent in self.lower_paths
                self.kinds["/" + parent] = ChangeKind.MODIFY if known else ChangeKind.ADD
            parent = posixpath.dirname(parent)


def list_paths(root: Path) -> frozenset[str]:
    """Return every path below ``root``, relative, without following symlinks."""
    paths: set[str] = set()
    for folder, directories, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in directories + files:
            paths.add(name if relative == "." else f"{relative}/{name}")
    return frozenset(paths)


@contextlib.contextmanager
def overlay_mount(
    lower: Sequence[Path], upper: Path, work: Path, mountpoint: Path
) -> Iterator[Path]:
    """Mount overlayfs at ``mountpoint`` and unmount it on exit.

    index=off and metacopy=off are set explicitly, so that a copy-up copies the whole file
    whatever the overlay module's defaults are.
    """
    options = (
        f"lowerdir={':'.join(str(path) for path in lower)},upperdir={upper},"
        f"workdir={work},index=off,metacopy=off"
    )
    run_tool(["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        run_tool(["umount", str(mountpoint)])


def untar_members(tar_path: Path, names: Sequence[str], destination: Path) -> None:
    """Extract the named members (directories with their content) as GNU tar does for root."""
    run_tool(
        [
            "tar",
            "--extract",
            f"--file={tar_path}",
            f"--directory={destination}",
            "--numeric-owner",
            "--same-owner",
            "--same-permissions",
            "--xattrs",
            "--xattrs-include=*",
            *names,
        ]
    )


def member_names_below(tar_path: Path, prefixes: Sequence[str]) -> list[str]:
    """Return the normalized member names of a tar that lie at or below one of ``prefixes``."""
    selected = []
    for member in oracle.list_tar_members(tar_path):
        name = os.fsdecode(member.name)
        if any(name == prefix or name.startswith(prefix + "/") for prefix in prefixes):
            selected.append(name)
    return selected


def smallest_package(tar_path: Path) -> str:
    """Pick a node_modules package directory of 10 to 60 members, the first by name."""
    counts: dict[str, int] = {}
    prefix = "usr/src/app/node_modules/"
    for member in oracle.list_tar_members(tar_path):
        name = os.fsdecode(member.name)
        if name.startswith(prefix) and not name.startswith(prefix + "."):
            package = name[len(prefix) :].split("/")[0]
            if not package.startswith("@"):
                counts[package] = counts.get(package, 0) + 1
    for package in sorted(counts):
        if 10 <= counts[package] <= 60:
            return prefix + package
    raise AssertionError(f"{tar_path} has no node_modules package of 10 to 60 members")


def do_work(merged: Path, corpus: Path, expected: ExpectedChanges) -> None:
    """Change the merged view as a container would, and record each change in ``expected``."""
    # Unpack parts of corpus layers: directories of the base system again (modifies), and
    # an npm package into a new directory (adds).
    base_tar = corpus / "L1-base.tar"
    base_parts = ["etc/default", "etc/skel"]
    untar_members(base_tar, base_parts, merged)
    for name in member_names_below(base_tar, base_parts):
        expected.write(name)
    node_tar = corpus / "L3-node-modules.tar"
    node_parts = ["usr/src/app/package.json", smallest_package(node_tar)]
    untar_members(node_tar, node_parts, merged)
    for name in member_names_below(node_tar, node_parts):
        expected.write(name)

    # Delete files of both lower layers, and whole directories.
    for path in ("etc/motd", "usr/bin/yes", "etc/ca-certificates.conf"):
        (merged / path).unlink()
        expected.delete(path)
    for path in ("usr/share/doc", "home"):
        shutil.rmtree(merged / path)
        expected.delete(path)

    # Remove a directory and make it again, so overlayfs marks the new one opaque.
    shutil.rmtree(merged / "etc/apt")
    (merged / "etc/apt").mkdir(mode=0o755)
    (merged / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    (merged / "etc/apt/lcow.conf").write_text('APT::Install-Recommends "false";\n')
    expected.recreate_directory("etc/apt", {"sources.list", "lcow.conf"})
    expected.write("etc/apt/sources.list")
    expected.write("etc/apt/lcow.conf")

    # Metadata changes of lower files copy them up.
    (merged / "etc/hostname").chmod(0o600)
    expected.write("etc/hostname")
    os.chown(merged / "etc/issue.net", 1000, 1000)
    expected.write("etc/issue.net")
    os.setxattr(merged / "etc/hosts", "user.origin", b"sandbox")
    expected.write("etc/hosts")
    os.utime(merged / "etc/inputrc", ns=(NANOSECOND_MTIME_NS, NANOSECOND_MTIME_NS))
    expected.write("etc/inputrc")

    # New files: xattrs, an owner, a nanosecond mtime and hard links, one of them to a
    # lower file.
    srv = merged / "srv"
    data = srv / "data.bin"
    data.write_bytes(treegen.seeded_bytes(1, 10_000))
    os.setxattr(data, "user.kind", b"fixture")
    os.setxattr(data, "security.capability", CAPABILITY)
    os.chown(data, 1000, 2000)
    (srv / "sub").mkdir(mode=0o750)
    os.link(data, srv / "data-link1")
    os.link(data, srv / "sub/data-link2")
    os.utime(data, ns=(NANOSECOND_MTIME_NS, NANOSECOND_MTIME_NS))
    for path in ("srv/data.bin", "srv/data-link1", "srv/sub", "srv/sub/data-link2"):
        expected.write(path)
    os.link(merged / "usr/bin/true", merged / "usr/local/bin/true-link")
    expected.write("usr/bin/true")
    expected.write("usr/local/bin/true-link")

    # A directory indexed by htree. With inline_data, its small files keep data in the inode.
    many = srv / "many"
    many.mkdir()
    expected.write("srv/many")
    for index in range(HTREE_ENTRY_COUNT):
        (many / f"entry-{index:05d}").write_text(f"{index}\n")
        expected.write(f"srv/many/entry-{index:05d}")

    # A sparse file over 100 MiB whose extent tree has depth 2.
    fd = os.open(srv / "sparse.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for index in range(SPARSE_PIECE_COUNT):
            piece = treegen.seeded_bytes(100 + index, SPARSE_PIECE_BYTES)
            os.pwrite(fd, piece, index * SPARSE_STRIDE_BYTES)
        os.ftruncate(fd, SPARSE_FILE_SIZE_BYTES)
    finally:
        os.close(fd)
    expected.write("srv/sparse.bin")

    # Symlinks on both sides of the 60-byte inline limit, a FIFO and device nodes.
    (srv / "link-long").symlink_to(LONG_SYMLINK_TARGET)
    (srv / "link-short").symlink_to(SHORT_SYMLINK_TARGET)
    os.mkfifo(srv / "fifo")
    (srv / "fifo").chmod(0o640)
    os.mknod(srv / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (srv / "null").chmod(0o666)
    os.mknod(srv / "disk", stat.S_IFBLK | 0o660, os.makedev(259, 65536))
    (srv / "disk").chmod(0o660)
    for path in ("srv/link-long", "srv/link-short", "srv/fifo", "srv/null", "srv/disk"):
        expected.write(path)

    # A file made and deleted again leaves nothing behind.
    (srv / "temporary").write_bytes(b"gone soon")
    (srv / "temporary").unlink()


@pytest.fixture(scope="module")
def lower_images(
    corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, ...]]:
    """Convert the lower corpus layers into layer images, top first."""
    folder = tmp_path_factory.mktemp("lower-images")
    images = []
    for name in LOWER_LAYER_NAMES:
        image = folder / f"{name}.vhd"
        convert_tar(corpus / f"{name}.tar", image)
        images.append(image)
    yield tuple(images)
    shutil.rmtree(folder)


def call_in_private_namespace(function_name: str, *arguments: str) -> object:
    """Run a function of this module in a child process with its own mount namespace.

    A process that makes a new mount namespace copies every mount that exists at that
    moment, and the copy keeps the filesystem mounted after the test unmounts its own. A
    read-write ext4 kept mounted that way keeps its journal in use, so the reader rightly
    rejects it. Mounts made in a private namespace are invisible to such copies. The
    function's JSON result comes back on stdout.
    """
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_reader; "
        "result = getattr(test_reader, sys.argv[2])(*sys.argv[3:]); print(json.dumps(result))"
    )
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script]
    result = run_tool([*command, str(TESTS_FOLDER), function_name, *arguments])
    return json.loads(result.stdout.splitlines()[-1])


def build_sandbox(image: str, folder: str, corpus: str, *lower_images: str) -> dict[str, int]:
    """Mount the formatted sandbox, work in it through overlayfs, unmount everything and
    return the expected changes as {"/path": kind}."""
    with contextlib.ExitStack() as mounts:
        lowers = [mounts.enter_context(loop_mount(Path(path))) for path in lower_images]
        sandbox_root = mounts.enter_context(loop_mount(Path(image), read_only=False))
        (sandbox_root / "upper").mkdir()
        (sandbox_root / "work").mkdir()
        merged = Path(folder) / "merged"
        merged.mkdir()
        mounts.enter_context(
            overlay_mount(lowers, sandbox_root / "upper", sandbox_root / "work", merged)
        )

        expected = ExpectedChanges(list_paths(merged))
        do_work(merged, Path(corpus), expected)
    return {path: int(kind) for path, kind in expected.kinds.items()}


@pytest.fixture(scope="module", params=sorted(SANDBOX_VARIANTS))
def sandbox(
    request: pytest.FixtureRequest,
    corpus: Path,
    lower_images: tuple[Path, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Sandbox]:
    """Format a sandbox, work in it through overlayfs and unmount everything."""
    oracle.require_root()
    variant: str = request.param
    folder = tmp_path_factory.mktemp(f"sandbox-{variant}")
    image = folder / "sandbox.img"
    with image.open("wb") as sparse:
        sparse.truncate(SANDBOX_SIZE_BYTES)
    run_tool(["mke2fs", "-t", "ext4", "-F", "-q", *SANDBOX_VARIANTS[variant], str(image)])

    arguments = [str(image), str(folder), str(corpus), *(str(path) for path in lower_images)]
    kinds = call_in_private_namespace("build_sandbox", *arguments)
    assert isinstance(kinds, dict)

    yield Sandbox(
        image=image,
        variant=variant,
        lower_images=lower_images,
        expected_changes={path: ChangeKind(kind) for path, kind in kinds.items()},
    )
    shutil.rmtree(folder)


def kernel_upper_snapshot(image: Path) -> Snapshot:
    """Snapshot the sandbox's ``upper/`` through a read-only loop mount."""
    with loop_mount(image) as mountpoint:
        return snapshot_tree(mountpoint / "upper")


def is_whiteout(record: oracle.EntryRecord) -> bool:
    return record.kind == "character device" and record.rdev == (0, 0)


def exported_form(snapshot: Snapshot) -> Snapshot:
    """Return the kernel's view of ``upper/`` as an extracted export must show it.

    The export has no entry for ``upper/`` itself and keeps no overlayfs xattr but the
    opaque marker. overlayfs makes every whiteout a hard link of one shared inode, but the
    export writes each whiteout as its own entry.
    """
    result: Snapshot = {}
    for path, record in snapshot.items():
        if path == oracle.ROOT:
            continue
        xattrs = tuple(
            (name, value)
            for name, value in record.xattrs
            if not name.startswith(OVERLAY_XATTR_PREFIX) or name == OPAQUE_XATTR
        )
        hardlinks = (path,) if is_whiteout(record) else record.hardlinks
        result[path] = dataclasses.replace(record, xattrs=xattrs, hardlinks=hardlinks)
    return result


def export_member_names(snapshot: Snapshot) -> list[str]:
    """Return the member names that an export of ``snapshot`` must contain, sorted."""
    names = []
    for path, record in snapshot.items():
        if path == oracle.ROOT:
            continue
        text = os.fsdecode(path)
        if is_whiteout(record):
            parent, name = posixpath.split(text)
            names.append(posixpath.join(parent, ".wh." + name))
            continue
        names.append(text)
        if dict(record.xattrs).get(OPAQUE_XATTR) == b"y":
            names.append(text + "/.wh..wh..opq")
    return sorted(names)


def debugfs(image: Path, request: str) -> str:
    return run_tool(["debugfs", "-R", request, str(image)]).stdout


def inode_flags(image: Path, path: str) -> int:
    match = re.search(r"Flags: (0x[0-9a-f]+)", debugfs(image, f"stat {path}"))
    assert match is not None, f"debugfs printed no flags for {path}"
    return int(match.group(1), 16)


@pytest.mark.root
def test_sandbox_has_hard_structures(sandbox: Sandbox) -> None:
    """The kernel wrote what the reader must handle: check it before trusting the others."""
    features = run_tool(["dumpe2fs", "-h", str(sandbox.image)]).stdout

    for feature in ("64bit", "metadata_csum", "flex_bg", "dir_index", "has_journal"):
        assert feature in features
    assert ("inline_data" in features) == (sandbox.variant == "inline-data")
    assert inode_flags(sandbox.image, "/upper/srv/many") & EXT4_INDEX_FL
    assert "(ETB1)" in debugfs(sandbox.image, "stat /upper/srv/sparse.bin")
    if sandbox.variant == "inline-data":
        assert inode_flags(sandbox.image, "/upper/srv/many/entry-00001") & EXT4_INLINE_DATA_FL
    oracle.e2fsck_clean(sandbox.image)


@pytest.mark.root
def test_sandbox_tree_matches_kernel(sandbox: Sandbox) -> None:
    with open_reader(sandbox.image) as reader:
        from_reader = reader_snapshot(reader, reader.lookup(b"upper"))

    from_kernel = kernel_upper_snapshot(sandbox.image)

    differences = compare_trees(from_kernel, from_reader)
    assert differences == [], format_differences(differences)


@pytest.mark.root
def test_sandbox_export_extracts(sandbox: Sandbox, tmp_path: Path) -> None:
    tar_path = tmp_path / "upper.tar"
    with open_reader(sandbox.image) as reader, tar_path.open("wb") as output:
        export_tar(reader, output, subdirectory=b"upper")
    from_kernel = kernel_upper_snapshot(sandbox.image)

    assert gnu_tar_names(tar_path) == export_member_names(from_kernel)

    extract_with_gnu_tar(tar_path, tmp_path / "extracted")
    extracted = expected_from_tar_extraction(snapshot_tree(tmp_path / "extracted"))
    del extracted[oracle.ROOT]
    differences = compare_trees(exported_form(from_kernel), extracted)
    assert differences == [], format_differences(differences)


@contextlib.contextmanager
def sandbox_trees(sandbox: Sandbox) -> Iterator[tuple[LayerTree, list[LayerTree]]]:
    """Yield the sandbox's ``upper/`` tree and the lower layer trees, top first."""
    with contextlib.ExitStack() as readers:
        reader = readers.enter_context(open_reader(sandbox.image))
        upper = LayerTree(reader, reader.lookup(b"upper"))
        lowers = [
            LayerTree(readers.enter_context(open_reader(image))) for image in sandbox.lower_images
        ]
        yield upper, lowers


@pytest.mark.root
def test_sandbox_changes(sandbox: Sandbox) -> None:
    with sandbox_trees(sandbox) as (upper, lowers):
        changes = layer_changes(upper, MergedView(lowers))
    actual = change_pairs(changes)
    expected = sorted(sandbox.expected_changes.items())

    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert len(actual) == len(set(actual))


@pytest.mark.root
def test_sandbox_diff_size(sandbox: Sandbox) -> None:
    from_kernel = kernel_upper_snapshot(sandbox.image)
    sizes_by_inode = {
        record.hardlinks: record.size or 0
        for record in from_kernel.values()
        if record.kind != "directory" and not is_whiteout(record)
    }

    with sandbox_trees(sandbox) as (upper, lowers):
        changes = layer_changes(upper, MergedView(lowers))
        size = diff_size(changes, MergedView([upper, *lowers]))

    assert size == sum(sizes_by_inode.values())


@pytest.mark.root
def test_sandbox_vhdx_export(sandbox: Sandbox, tmp_path: Path) -> None:
    """``lcow vhd2tar`` finds the sandbox in a VHDX and exports what the raw file gives."""
    disk = tmp_path / "sandbox.vhdx"
    vhdx.raw_to_vhdx(sandbox.image, disk)
    from_raw = tmp_path / "from-raw.tar"
    with open_reader(sandbox.image) as reader, from_raw.open("wb") as output:
        export_tar(reader, output, subdirectory=b"upper")

    result = CliRunner().invoke(main, ["vhd2tar", str(disk), str(tmp_path / "from-vhdx.tar")])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-vhdx.tar").read_bytes() == from_raw.read_bytes()


HTREE_TEST_ENTRY_COUNT: Final = 300  # 300 entries of 60 bytes need five 4 KiB blocks


def fill_directory(image: str, *names: str) -> None:
    """Create the empty files ``names`` in a new directory ``d`` through the kernel."""
    with loop_mount(Path(image), read_only=False) as mountpoint:
        (mountpoint / "d").mkdir()
        for name in names:
            (mountpoint / "d" / name).write_bytes(b"")


@pytest.mark.root
def test_kernel_htree_directory(tmp_path: Path) -> None:
    """A directory that the kernel grew past one block and indexed reads like a plain one."""
    image = tmp_path / "htree.img"
    with image.open("wb") as sparse:
        sparse.truncate(32 * MIB)
    run_tool(["mke2fs", "-t", "ext4", "-b", "4096", "-F", "-q", str(image)])
    names = sorted(f"entry-{index:05d}-{'n' * 38}" for index in range(HTREE_TEST_ENTRY_COUNT))
    call_in_private_namespace("fill_directory", str(image), *names)

    assert inode_flags(image, "/d") & EXT4_INDEX_FL
    with open_reader(image) as reader:
        listed = sorted(os.fsdecode(name) for name, _, _ in reader.iterdir(reader.lookup(b"d")))
    assert listed == names


# --- rejected filesystems --------------------------------------------------------------------

SMALL_IMAGE_BYTES: Final = 32 * MIB
JOURNAL_TARGET_BLOCK: Final = 8000  # the block that a replay would overwrite (never replayed)


def make_journaled_image(path: Path) -> None:
    with path.open("wb") as sparse:
        sparse.truncate(SMALL_IMAGE_BYTES)
    run_tool(["mke2fs", "-t", "ext4", "-b", "4096", "-F", "-q", str(path)])


def copy_while_mounted(image: str, copy: str) -> None:
    """Write a file through the kernel and copy the image before it is unmounted."""
    with loop_mount(Path(image), read_only=False) as mountpoint:
        (mountpoint / "hello.txt").write_bytes(b"hello\n")
        fd = os.open(mountpoint / "hello.txt", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.copyfile(image, copy)


def damage_by_mounting(image: Path, copy: Path) -> None:
    call_in_private_namespace("copy_while_mounted", str(image), str(copy))


def damage_with_debugfs(image: Path, copy: Path) -> None:
    """Log one transaction with debugfs's journal commands and leave it unreplayed."""
    shutil.copyfile(image, copy)
    block = copy.parent / "journal-block.bin"
    block.write_bytes(bytes(BLOCK_BYTES))
    commands = copy.parent / "debugfs-commands"
    commands.write_text(f"jo\njw -b {JOURNAL_TARGET_BLOCK} {block}\njc\n")
    run_tool(["debugfs", "-w", "-f", str(commands), str(copy)])


RECOVERY_DAMAGE: Final[dict[str, Callable[[Path, Path], None]]] = {
    "copied while mounted": damage_by_mounting,
    "transaction logged by debugfs": damage_with_debugfs,
}


@pytest.mark.root
@pytest.mark.parametrize("damage", sorted(RECOVERY_DAMAGE))
def test_journal_recovery_rejected(damage: str, tmp_path: Path) -> None:
    image = tmp_path / "clean.img"
    make_journaled_image(image)
    copy = tmp_path / "needs-recovery.img"
    RECOVERY_DAMAGE[damage](image, copy)

    with pytest.raises(UnsupportedError) as raised, open_reader(copy):
        pass

    assert "e2fsck" in str(raised.value)


@pytest.mark.root
def test_journal_replayed_readable(tmp_path: Path) -> None:
    """After e2fsck replays the journal, the file written before the copy reads back."""
    image = tmp_path / "clean.img"
    make_journaled_image(image)
    copy = tmp_path / "needs-recovery.img"
    damage_by_mounting(image, copy)

    e2fsck = subprocess.run(
        [oracle.require_tool("e2fsck"), "-fy", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert e2fsck.returncode in (0, 1), e2fsck.stdout + e2fsck.stderr
    with open_reader(copy) as reader:
        number = reader.lookup(b"hello.txt")
        assert b"".join(data for _, data in reader.read_data(number)) == b"hello\n"


@pytest.mark.root
def test_recovery_flag_empty_journal_read(tmp_path: Path) -> None:
    """The recovery flag over an empty journal (s_start 0) leaves nothing to replay.

    The reader documents that it reads such a filesystem, which is how a frozen or synced
    mounted one looks.
    """
    image = tmp_path / "flagged.img"
    make_journaled_image(image)
    run_tool(["debugfs", "-w", "-R", "feature needs_recovery", str(image)])

    with open_reader(image) as reader:
        names = [name for name, _, _ in reader.iterdir(reader.lookup(b""))]

    assert names == [b"lost+found"]


def make_populated_image(path: Path, source: Path, size_bytes: int, *options: str) -> None:
    """Format ``path`` with mke2fs and copy the directory ``source`` into it (mke2fs -d)."""
    with path.open("wb") as sparse:
        sparse.truncate(size_bytes)
    run_tool(["mke2fs", "-t", "ext4", "-F", "-q", *options, "-d", str(source), str(path)])


def fill_source_folder(folder: Path) -> None:
    """Create files, directories, xattrs, links and special files for mke2fs -d to copy."""
    folder.mkdir()
    (folder / "dir").mkdir()
    (folder / "dir/file").write_bytes(b"hi\n")
    os.setxattr(folder / "dir/file", "user.small", b"v")
    os.setxattr(folder / "dir/file", "user.big", b"x" * 700)  # too big for the inode
    (folder / "dir/medium").write_bytes(treegen.seeded_bytes(7, 20_000))
    os.link(folder / "dir/file", folder / "dir/file-link")
    (folder / "dir/link-short").symlink_to("file")
    (folder / "dir/link-long").symlink_to("/" + "long/" * 20)
    os.mkfifo(folder / "fifo")
    os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (folder / "many").mkdir()
    for index in range(200):
        (folder / f"many/name-{index:03d}-{'n' * 40}").write_bytes(b"")
    # Ten separate pieces make ten extents, more than the inode holds, so the file gets an
    # extent tree block.
    fd = os.open(folder / "fragmented", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for index in range(10):
            os.pwrite(fd, treegen.seeded_bytes(20 + index, 4096), index * 65536)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    oracle.require_root()
    folder = tmp_path_factory.mktemp("mke2fs-source") / "tree"
    fill_source_folder(folder)
    return folder


def block_offset(image: Path, request: str, pattern: str) -> int:
    """Return the block number that ``pattern`` finds in debugfs's output for ``request``."""
    match = re.search(pattern, debugfs(image, request))
    assert match is not None, f"debugfs {request!r} printed nothing that matches {pattern!r}"
    return int(match.group(1))


def inode_field_offset(image: Path, path: str, field_offset: int) -> int:
    output = debugfs(image, f"imap {path}")
    match = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", output)
    assert match is not None, output
    return int(match.group(1)) * BLOCK_BYTES + int(match.group(2), 16) + field_offset


# Where to flip a byte, as a function of the image: each lands in a field that nothing but
# the checksum covers, so only checksum verification can notice it.
CHECKSUM_TARGETS: Final[dict[str, Callable[[Path], int]]] = {
    "superblock s_wtime": lambda image: 1024 + 0x30,
    "group descriptor bg_free_blocks_count_lo": lambda image: BLOCK_BYTES + 0x0C,
    "inode i_mtime": lambda image: inode_field_offset(image, "/dir/file", 0x10),
    "directory entry name": lambda image: (
        block_offset(image, "blocks /dir", r"(\d+)") * BLOCK_BYTES + 24 + 8
    ),
    "xattr block value": lambda image: (
        block_offset(image, "stat /dir/file", r"File ACL: (\d+)") * BLOCK_BYTES + BLOCK_BYTES - 8
    ),
    "extent tree block": lambda image: (
        block_offset(image, "stat /fragmented", r"\(ETB0\):(\d+)") * BLOCK_BYTES + 12
    ),
}


def read_everything(reader: Ext4Reader) -> int:
    """Walk the whole tree, read every file, symlink and xattr, and return the entry count."""
    count = 0
    for _, inode in reader.walk():
        count += 1
        kind = stat.S_IFMT(inode.mode)
        if kind == stat.S_IFREG:
            for _ in reader.read_data(inode.number):
                pass
        elif kind == stat.S_IFLNK:
            reader.read_symlink(inode.number)
    return count


@pytest.mark.root
@pytest.mark.parametrize("target", sorted(CHECKSUM_TARGETS))
def test_checksum_mismatch_rejected(target: str, source_folder: Path, tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    make_populated_image(image, source_folder, 8 * MIB, "-b", str(BLOCK_BYTES))
    offset = CHECKSUM_TARGETS[target](image)
    with image.open("r+b") as damaged:
        damaged.seek(offset)
        original = damaged.read(1)
        damaged.seek(offset)
        damaged.write(bytes([original[0] ^ 0x01]))

    with pytest.raises(CorruptInputError) as raised, open_reader(image) as reader:
        read_everything(reader)

    assert "checksum" in str(raised.value)


@pytest.mark.parametrize("table_block", [0, 1 << 31])
def test_inode_table_outside_rejected(table_block: int, tmp_path: Path) -> None:
    """A group whose inode table starts at block 0 or past the end is corrupt.

    debugfs moves the table and recomputes the descriptor's checksum, so only the bounds
    check can catch it.
    """
    image = lcow_base_image(tmp_path)
    requests = tmp_path / "requests"
    requests.write_text(f"set_bg 0 inode_table {table_block}\nset_bg 0 checksum calc\n")
    run_tool(["debugfs", "-w", "-f", str(requests), str(image)])

    with pytest.raises(CorruptInputError) as raised, open_reader(image) as reader:
        read_everything(reader)

    assert "inode table at block" in str(raised.value)


# --- fuzzing ---------------------------------------------------------------------------------

FUZZ_IMAGE_BYTES: Final = 8 * MIB
READ_BUDGET_FACTOR: Final = 32  # a walk may read the image this many times over, no more
HARD_TIME_LIMIT_S: Final = 10.0  # stops a hang, and the hypothesis deadline flags slow examples
HOT_CHUNK_BYTES: Final = 1024


class ReadBudgetError(Exception):
    """The reader requested more bytes than READ_BUDGET_FACTOR times the image size."""


class ExampleTimeoutError(Exception):
    """One example ran past HARD_TIME_LIMIT_S."""


class BoundedDevice:
    """An in-memory disk that counts the bytes requested and behaves like os.pread."""

    def __init__(self, data: bytes, budget_bytes: int) -> None:
        self.data = data
        self.budget_bytes = budget_bytes
        self.requested_bytes = 0

    def pread(self, length: int, offset: int) -> bytes:
        if length < 0:
            raise ValueError(f"negative read length {length}")
        if offset < 0:
            raise OSError(errno.EINVAL, f"negative read offset {offset}")
        self.requested_bytes += length
        if self.requested_bytes > self.budget_bytes:
            raise ReadBudgetError(
                f"the reader requested {self.requested_bytes} bytes of a "
                f"{len(self.data)}-byte image, more than the budget of {self.budget_bytes}"
            )
        return self.data[offset : offset + length]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise ExampleTimeoutError(f"reading the image took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass(frozen=True)
class FuzzBase:
    """A valid image and the offsets of its non-zero 1 KiB chunks, where metadata lives."""

    data: bytes
    hot_offsets: tuple[int, ...]


def lcow_base_image(folder: Path) -> Path:
    image = folder / "lcow.img"
    tar_path = folder / "all-kinds.tar"
    with tar_path.open("wb") as output:
        treegen.write_tar(treegen.all_kinds_tree(), output)
    convert_tar(tar_path, image, vhd_footer=False)
    return image


FUZZ_BASE_OPTIONS: Final = {
    "mke2fs-4k": ("-b", "4096"),
    "mke2fs-inline-data": ("-b", "4096", "-O", "inline_data"),
    "mke2fs-1k-no-csum": ("-b", "1024", "-I", "128", "-O", "^metadata_csum,^has_journal"),
}
FUZZ_BASE_NAMES: Final = ("lcow-writer", *FUZZ_BASE_OPTIONS)


@pytest.fixture(scope="module")
def fuzz_bases(
    source_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FuzzBase]:
    folder = tmp_path_factory.mktemp("fuzz-bases")
    images = {"lcow-writer": lcow_base_image(folder)}
    for name, options in FUZZ_BASE_OPTIONS.items():
        images[name] = folder / f"{name}.img"
        make_populated_image(images[name], source_folder, FUZZ_IMAGE_BYTES, *options)

    bases = {}
    for name, image in images.items():
        data = image.read_bytes()
        hot = tuple(
            offset
            for offset in range(0, len(data), HOT_CHUNK_BYTES)
            if any(data[offset : offset + HOT_CHUNK_BYTES])
        )
        bases[name] = FuzzBase(data, hot)
        with open_reader(image) as reader:
            assert read_everything(reader) > 20, f"{name}: the valid image must read back"
    return bases


def mutate(base: FuzzBase, data: st.DataObject) -> tuple[bytes, int]:
    """Draw a damaged copy of the image and return its bytes and the size the disk states."""
    image = bytearray(base.data)

    def offset() -> int:
        if data.draw(st.booleans(), label="near metadata"):
            chunk = data.draw(st.sampled_from(base.hot_offsets), label="chunk")
            return min(len(image) - 1, chunk + data.draw(st.integers(0, HOT_CHUNK_BYTES - 1)))
        return data.draw(st.integers(0, len(image) - 1), label="offset")

    for _ in range(data.draw(st.integers(1, 8), label="mutation count")):
        kind = data.draw(st.sampled_from(["flip", "overwrite", "zero"]), label="mutation")
        start = offset()
        if kind == "flip":
            image[start] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "overwrite":
            replacement = data.draw(st.binary(min_size=1, max_size=32), label="bytes")
            image[start : start + len(replacement)] = replacement[: len(image) - start]
        else:
            length = data.draw(st.integers(1, 4096), label="zeroed bytes")
            end = min(len(image), start + length)
            image[start:end] = bytes(end - start)

    claimed_size = len(image)
    truncation = data.draw(st.sampled_from(["none", "file", "short reads"]), label="truncation")
    if truncation != "none":
        length = data.draw(st.integers(0, len(image)), label="truncated length")
        del image[length:]
        # A truncated file has a smaller size. Short reads keep the claimed size, as a
        # disk container might.
        if truncation == "file":
            claimed_size = length
    return bytes(image), claimed_size


def read_damaged(image: bytes, claimed_size: int, budget_bytes: int) -> None:
    """Read all of a damaged image. Only lcow's errors, or a missing path, may escape."""
    device = BoundedDevice(image, budget_bytes)
    with time_limit(HARD_TIME_LIMIT_S):
        try:
            reader = Ext4Reader(device, claimed_size)
            read_everything(reader)
        except LcowError as err:
            event(f"rejected with {type(err).__name__}")
            return
        event("read completely")
        for path in (b"dir/file", b"dir/link-long", b"many/missing"):
            try:
                reader.lookup(path)
            except (LcowError, FileNotFoundError):
                continue


@pytest.mark.root
@pytest.mark.parametrize("base_name", FUZZ_BASE_NAMES)
@settings(
    max_examples=1000,  # about 5 s for each base image on an idle 2-core machine
    deadline=2000,
    derandomize=oracle.in_ci(),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzzed_image_errors(
    base_name: str, fuzz_bases: dict[str, FuzzBase], data: st.DataObject
) -> None:
    base = fuzz_bases[base_name]
    image, claimed_size = mutate(base, data)

    read_damaged(image, claimed_size, READ_BUDGET_FACTOR * len(base.data))


# --- VHDX ------------------------------------------------------------------------------------

VHDX_RAW_BYTES: Final = 192 * MIB


def qemu_vhdx(subformat: str) -> Callable[[Path, Path], None]:
    def convert(raw: Path, disk: Path) -> None:
        run_tool(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "-o",
                f"subformat={subformat}",
                str(raw),
                str(disk),
            ]
        )

    return convert


def lcow_vhdx(raw: Path, disk: Path) -> None:
    vhdx.raw_to_vhdx(raw, disk)


VHDX_MAKERS: Final[dict[str, Callable[[Path, Path], None]]] = {
    "qemu-img dynamic": qemu_vhdx("dynamic"),
    "qemu-img fixed": qemu_vhdx("fixed"),
    "lcow raw_to_vhdx": lcow_vhdx,
}


@pytest.fixture(scope="module")
def vhdx_raw_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A raw ext4 with a 70 MiB file that runs across several VHDX payload blocks."""
    folder = tmp_path_factory.mktemp("vhdx-raw")
    source = folder / "tree"
    fill_source_folder(source)
    fd = os.open(source / "large.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for index in range(70):
            os.pwrite(fd, treegen.seeded_bytes(50 + index, MIB), index * MIB)
    finally:
        os.close(fd)
    image = folder / "raw.img"
    make_populated_image(image, source, VHDX_RAW_BYTES, "-b", str(BLOCK_BYTES))
    yield image
    shutil.rmtree(folder)


@pytest.mark.root
@pytest.mark.parametrize("maker", sorted(VHDX_MAKERS))
def test_vhdx_tree_matches_raw(maker: str, vhdx_raw_image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.vhdx"
    VHDX_MAKERS[maker](vhdx_raw_image, disk)
    with open_reader(vhdx_raw_image) as reader:
        from_raw = reader_snapshot(reader)

    with open_disk(disk) as opened:
        container = opened.container
        from_vhdx = reader_snapshot(Ext4Reader(opened.device, opened.size_bytes))

    assert container == "vhdx"
    assert b"large.bin" in from_raw
    differences = compare_trees(from_raw, from_vhdx)
    assert differences == [], format_differences(differences)
