"""Conformance suite for the graph driver, in the spirit of Docker's graphtest.

Each ``check_*`` function takes a :data:`DriverFactory`, which opens a Driver on a data root
of its own, and a folder for scratch files. It exercises one part of the contract that
``lcow.driver`` documents and raises AssertionError at the first violation, so a test module
runs the same checks for every backend, mode and sandbox format. The deep-chain checks take
an open driver instead, so that one chain serves several checks.

Where the content of a disk matters, tools that lcow does not contain decide: e2fsck, and
the kernel's ext4 and overlayfs through loop mounts. Those checks need root. The helpers that
count open descriptors, child processes and leftover files serve the other driver test
modules too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import tarbuild
from lcow import vhdx
from lcow.disk import open_disk
from lcow.driver import LAYER_IMAGE, REMOVING_SUFFIX, TEMPORARY_SUFFIX, Driver
from lcow.ext4.reader import Ext4Reader
from lcow.layer.changes import ChangeKind, LayerTree, MergedView
from lcow.servicevm.base import ServiceVM
from lcow.servicevm.manager import SPARE_NAME
from oracle import e2fsck_clean, loop_mount, run_tool, snapshot_tree

DriverFactory = Callable[[], Driver]
Change = tuple[str, int]

GLOBAL_SERVICE_VM: Final = "_lcow_global_svm_"

CHAIN_DEPTH: Final = 128
# Levels that check_chain_mount stacks with the kernel's overlayfs. Stacking all 128 would
# take 128 loop devices and a lowerdir option of 128 paths, which mount(2) reads from one
# page (4096 bytes on x86-64): about 32 bytes a path. The bottom, middle and top levels show
# that the kernel reads the images as lcow's reader does.
CHAIN_MOUNT_LEVELS: Final = (0, 1, 63, 126, 127)

SMALL_FILE_BYTES: Final = 64
DIFF_FILE_COUNT: Final = 32
CHANGES_FILE_COUNT: Final = 20  # the 21-change case: 20 files and their directory
NON_DEFAULT_SANDBOX_SIZE: Final = "1G"  # differs from the 20 GB default, so it is formatted
UPPER: Final = "upper"  # a sandbox's ext4 root contains upper/ and work/ for overlayfs
WORK: Final = "work"


@dataclasses.dataclass(frozen=True)
class DriverConfig:
    """One option set of the driver: service VM mode and sandbox format."""

    mode: str  # "global" or "safe"
    sandbox_format: str  # "vhdx" or "raw"

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.sandbox_format}"

    @property
    def options(self) -> list[str]:
        global_mode = "true" if self.mode == "global" else "false"
        return [f"lcow.globalmode={global_mode}", f"lcow.sandboxformat={self.sandbox_format}"]


CONFIGS: Final = tuple(
    DriverConfig(mode, sandbox_format)
    for mode in ("global", "safe")
    for sandbox_format in ("vhdx", "raw")
)


# --- inputs --------------------------------------------------------------------------------


def file_content(seed: int, index: int) -> bytes:
    """Return 64 bytes that differ for every (seed, index) pair."""
    content = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest().encode()
    assert len(content) == SMALL_FILE_BYTES
    return content


def layer_tar(members: Sequence[tarbuild.Member]) -> io.BytesIO:
    """Return an uncompressed layer tar of ``members`` as a stream for ApplyDiff."""
    return io.BytesIO(tarbuild.tar_bytes(members))


def whiteout(path: str) -> tarbuild.Member:
    """Return the tar form of a deleted path: an empty ``.wh.NAME`` file next to it."""
    folder, _, name = path.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    return tarbuild.regular(f"{prefix}.wh.{name}")


def apply_layer(
    driver: Driver, layer_id: str, parent: str | None, members: Sequence[tarbuild.Member]
) -> int:
    """Create a layer and apply a tar of ``members`` to it; return ApplyDiff's size."""
    driver.create(layer_id, parent)
    return driver.apply_diff(layer_id, parent, layer_tar(members))


# --- process and store state ---------------------------------------------------------------


def open_fd_count() -> int:
    """Count this process's open file descriptors."""
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def child_pids() -> frozenset[int]:
    """Return the pids of this process's children, whichever thread started them."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(pid) for pid in (task / "children").read_text().split())
    return frozenset(pids)


SPARE_START_LIMIT_S: Final = 60.0


def ready_spares(driver: Driver) -> list[ServiceVM]:
    """Wait until the driver's spare service VMs have started; return them, oldest first."""
    driver.service_vms.wait_for_spares(SPARE_START_LIMIT_S)
    return driver.service_vms.spares


@dataclasses.dataclass(frozen=True)
class ProcessResources:
    """What a driver may hold in the test process: descriptors and child processes.

    Given a driver, the capture waits until its spare service VMs (prestart) have started
    and leaves their processes and descriptors out: a spare belongs to no operation.
    """

    open_fds: int
    children: frozenset[int]

    @classmethod
    def capture(cls, driver: Driver | None = None) -> ProcessResources:
        spares = ready_spares(driver) if driver is not None else []
        open_fds, children = open_fd_count(), child_pids()
        for spare in spares:
            assert spare.channel is not None
            open_fds -= 2  # the spare's channel socket and its scratch disk
            children -= {spare.pid()}  # type: ignore[attr-defined]
        return cls(open_fds=open_fds, children=children)


def removing_folders(root: Path) -> list[str]:
    """List the ``<id>-removing`` folders of an interrupted Remove."""
    return sorted(entry.name for entry in root.iterdir() if entry.name.endswith(REMOVING_SUFFIX))


def _spare_file(name: str) -> bool:
    """Tell whether a file in ``scratch/`` belongs to a spare service VM.

    A spare that is starting may still be copying its disk, under a name starting with '.'.
    """
    return name.lstrip(".").startswith(SPARE_NAME)


def scratch_disks(root: Path, *, spare: bool = False) -> list[str]:
    """List the files in ``scratch/``, where each running service VM keeps its scratch disk.

    The spare service VMs' disks are listed only with ``spare``: they belong to no operation.
    """
    scratch = root / "scratch"
    names = sorted(entry.name for entry in scratch.iterdir()) if scratch.is_dir() else []
    return [name for name in names if spare or not _spare_file(name)]


def temporary_files(root: Path) -> list[str]:
    """List the files that a write in progress uses: names starting with '.' and ending in .tmp.

    A spare service VM that is starting may be copying its scratch disk. That copy belongs
    to no operation and is left out.
    """
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.name.startswith(".")
        and path.name.endswith(TEMPORARY_SUFFIX)
        and not _spare_file(path.name)
    )


def sha256_file(path: Path) -> str:
    with path.open("rb") as content:
        return hashlib.file_digest(content, "sha256").hexdigest()


def sandbox_e2fsck_clean(sandbox: Path, work: Path) -> None:
    """Raise AssertionError unless e2fsck accepts the sandbox; a VHDX is converted to raw first."""
    if sandbox.suffix != ".vhdx":
        e2fsck_clean(sandbox)
        return
    raw = Path(tempfile.mkdtemp(dir=work)) / "sandbox.img"
    vhdx.vhdx_to_raw(sandbox, raw)
    try:
        e2fsck_clean(raw)
    finally:
        raw.unlink()
        raw.parent.rmdir()


# --- reading layers ------------------------------------------------------------------------


def layer_disk(folder: Path) -> tuple[Path, str | None] | None:
    """Return the disk with a layer's own content and its folder on it; None when empty."""
    image = folder / LAYER_IMAGE
    if image.exists():
        return image, None
    for sandbox in (folder / "sandbox.vhdx", folder / "sandbox.img"):
        if sandbox.exists():
            return sandbox, UPPER
    return None


def open_merged_view(stack: contextlib.ExitStack, folders: Sequence[Path]) -> MergedView:
    """Open the layers in ``folders`` (top first) with lcow's ext4 reader and stack them."""
    trees: list[LayerTree] = []
    for folder in folders:
        disk = layer_disk(folder)
        if disk is None:
            continue
        opened = stack.enter_context(open_disk(disk[0]))
        reader = Ext4Reader(opened.device, opened.size_bytes)
        if disk[1] is None:
            trees.append(LayerTree(reader))
        else:
            trees.append(LayerTree(reader, reader.lookup(disk[1].encode())))
    return MergedView(trees)


def read_merged_file(view: MergedView, path: str) -> bytes | None:
    """Return the content the merged view shows at ``path``, or None when it shows nothing."""
    found = view.lookup(path.encode().split(b"/"))
    if found is None:
        return None
    layer, inode = found
    content = bytearray(inode.size)
    for offset, chunk in layer.reader.read_data(inode.number):
        content[offset : offset + len(chunk)] = chunk
    return bytes(content)


@contextlib.contextmanager
def overlay_mount(
    lower: Sequence[Path],
    target: Path,
    *,
    upper: Path | None = None,
    workdir: Path | None = None,
) -> Iterator[Path]:
    """Mount overlayfs on the new folder ``target``: ``lower`` nearest first, optional upper."""
    options = "lowerdir=" + ":".join(str(path) for path in lower)
    if upper is not None and workdir is not None:
        options += f",upperdir={upper},workdir={workdir}"
    with contextlib.ExitStack() as cleanup:
        target.mkdir()
        cleanup.callback(target.rmdir)
        run_tool(["mount", "-t", "overlay", "overlay", "-o", options, str(target)])
        cleanup.callback(run_tool, ["umount", str(target)])
        yield target


@contextlib.contextmanager
def mounted_layers(folders: Sequence[Path], work: Path) -> Iterator[Path]:
    """Loop-mount the layer images in ``folders`` (top first) and stack them read-only."""
    with contextlib.ExitStack() as mounts:
        lower = [mounts.enter_context(loop_mount(folder / LAYER_IMAGE)) for folder in folders]
        if len(lower) == 1:
            yield lower[0]
            return
        target = Path(tempfile.mkdtemp(dir=work)) / "merged"
        mounts.callback(target.parent.rmdir)
        yield mounts.enter_context(overlay_mount(lower, target))


@contextlib.contextmanager
def sandbox_edit(driver: Driver, layer_id: str, work: Path) -> Iterator[Path]:
    """Yield the merged root of a sandbox and its parents, writable through overlayfs.

    The parents' layer images are loop-mounted read-only and the sandbox read-write, so the
    kernel's overlayfs writes copy-ups and whiteouts into the sandbox's ``upper/``. A VHDX
    sandbox is converted to raw for the mount and written back as a new VHDX when the
    block ends without an error. The layer is held with Get while it is mounted.
    """
    sandbox = Path(driver.get_metadata(layer_id)["Sandbox"])
    scratch = Path(tempfile.mkdtemp(dir=work))
    is_vhdx = sandbox.suffix == ".vhdx"
    raw = scratch / "sandbox.img" if is_vhdx else sandbox
    if is_vhdx:
        vhdx.vhdx_to_raw(sandbox, raw)

    driver.get(layer_id)
    try:
        with contextlib.ExitStack() as mounts:
            lower = [
                mounts.enter_context(loop_mount(folder / LAYER_IMAGE))
                for folder in driver.chain(layer_id)
                if (folder / LAYER_IMAGE).exists()
            ]
            if not lower:
                empty = scratch / "empty"
                empty.mkdir()
                lower = [empty]
            disk = mounts.enter_context(loop_mount(raw, read_only=False))
            merged = mounts.enter_context(
                overlay_mount(lower, scratch / "merged", upper=disk / UPPER, workdir=disk / WORK)
            )
            yield merged

        if is_vhdx:
            edited = scratch / "sandbox.vhdx"
            vhdx.raw_to_vhdx(raw, edited)
            edited.replace(sandbox)
    finally:
        driver.put(layer_id)
        if is_vhdx:
            raw.unlink(missing_ok=True)


def tree_contents(root: Path) -> dict[bytes, tuple[str, int, str | None]]:
    """Map each path below ``root`` to its kind, permission bits and content digest."""
    return {
        path: (record.kind, record.mode, record.sha256)
        for path, record in snapshot_tree(root).items()
        if path != b"."
    }


# --- checks --------------------------------------------------------------------------------


def check_create_empty(open_driver: DriverFactory) -> None:
    """Create a layer without parent, query it, Get and Put it, and Remove it twice."""
    driver = open_driver()
    try:
        driver.create("empty")

        assert driver.exists("empty")

        metadata = driver.get_metadata("empty")
        folder = driver.root / "empty"
        assert metadata["Dir"] == str(folder)
        assert json.loads(metadata["LayerChain"]) == []
        assert "LayerImage" not in metadata
        assert "Sandbox" not in metadata

        path = driver.get("empty")
        assert path == str(folder)
        assert Path(path).is_dir()
        assert driver.get("empty") == path
        assert driver.references("empty") == 2

        driver.put("empty")
        driver.put("empty")
        assert driver.references("empty") == 0

        driver.remove("empty")
        assert not driver.exists("empty")
        assert not folder.exists()

        driver.remove("empty")
        assert not driver.exists("empty")
        assert removing_folders(driver.root) == []
    finally:
        driver.cleanup()


def chain_layer_id(level: int) -> str:
    return f"level-{level}"


def chain_file(level: int) -> str:
    return f"level-{level}/file"


def chain_file_content(level: int) -> bytes:
    return f"the file of chain level {level}\n".encode()


def build_chain(driver: Driver, depth: int = CHAIN_DEPTH) -> str:
    """Apply ``depth`` layers, each on the one before, each adding ``level-<n>/file``.

    Return the id of the top layer.
    """
    parent: str | None = None
    for level in range(depth):
        layer_id = chain_layer_id(level)
        members = [
            tarbuild.directory(f"level-{level}"),
            tarbuild.regular(chain_file(level), chain_file_content(level)),
        ]
        apply_layer(driver, layer_id, parent, members)
        parent = layer_id
    assert parent is not None
    return parent


def expected_chain_changes(depth: int) -> list[Change]:
    """Return the changes of a whole chain against nothing: every folder and file added."""
    changes = [(f"/level-{level}", int(ChangeKind.ADD)) for level in range(depth)]
    changes += [(f"/{chain_file(level)}", int(ChangeKind.ADD)) for level in range(depth)]
    return sorted(changes)


def check_chain_links(driver: Driver, depth: int = CHAIN_DEPTH) -> None:
    """The top layer's chain lists every level below it, nearest first."""
    top = chain_layer_id(depth - 1)
    expected = [driver.root / chain_layer_id(level) for level in reversed(range(depth - 1))]

    assert driver.chain(top) == expected

    metadata = driver.get_metadata(top)
    assert json.loads(metadata["LayerChain"]) == [str(path) for path in expected]


def check_chain_reader(driver: Driver, depth: int = CHAIN_DEPTH) -> None:
    """lcow's ext4 reader, stacking every layer image, shows each level's file."""
    top = chain_layer_id(depth - 1)
    with contextlib.ExitStack() as stack:
        view = open_merged_view(stack, [driver.root / top, *driver.chain(top)])

        assert len(view.layers) == depth

        for level in range(depth):
            content = read_merged_file(view, chain_file(level))
            assert content == chain_file_content(level), f"level {level}"

        root_names = sorted(name.decode() for name in view.children([]))
        assert root_names == sorted([*(f"level-{level}" for level in range(depth)), "lost+found"])


def check_chain_mount(driver: Driver, work: Path, levels: Sequence[int]) -> None:
    """The kernel, stacking some of the chain's images with overlayfs, shows their files."""
    folders = [driver.root / chain_layer_id(level) for level in sorted(levels, reverse=True)]
    for folder in folders:
        e2fsck_clean(folder / LAYER_IMAGE)

    with mounted_layers(folders, work) as merged:
        for level in levels:
            content = (merged / chain_file(level)).read_bytes()
            assert content == chain_file_content(level), f"level {level}"

        root_names = sorted(entry.name for entry in merged.iterdir())
        assert root_names == sorted([*(f"level-{level}" for level in levels), "lost+found"])


def check_chain_changes(driver: Driver, depth: int = CHAIN_DEPTH) -> None:
    """Changes of the top against nothing adds every level; against its parent, its own."""
    top = chain_layer_id(depth - 1)

    own = driver.changes(top, chain_layer_id(depth - 2))
    assert sorted(own) == [
        (f"/level-{depth - 1}", int(ChangeKind.ADD)),
        (f"/{chain_file(depth - 1)}", int(ChangeKind.ADD)),
    ]

    changes = driver.changes(top, None)
    for level in range(depth):
        assert (f"/{chain_file(level)}", int(ChangeKind.ADD)) in changes, f"level {level}"

    assert sorted(changes) == expected_chain_changes(depth)


def check_chain_diff_size(driver: Driver, depth: int = CHAIN_DEPTH) -> None:
    """DiffSize of the top against nothing sums every level's file."""
    top = chain_layer_id(depth - 1)
    expected = sum(len(chain_file_content(level)) for level in range(depth))

    assert driver.diff_size(top, None) == expected


def check_chain_sandbox(driver: Driver, depth: int = CHAIN_DEPTH) -> None:
    """A sandbox on the chain's top starts empty and shows every level below it."""
    top = chain_layer_id(depth - 1)
    sandbox = "sandbox-on-chain"
    driver.create_read_write(sandbox, top)
    try:
        assert driver.changes(sandbox, top) == []

        changes = driver.changes(sandbox, None)
        for level in range(depth):
            assert (f"/{chain_file(level)}", int(ChangeKind.ADD)) in changes, f"level {level}"

        with contextlib.ExitStack() as stack:
            view = open_merged_view(stack, [driver.root / sandbox, *driver.chain(sandbox)])
            for level in range(depth):
                content = read_merged_file(view, chain_file(level))
                assert content == chain_file_content(level), f"level {level}"
    finally:
        driver.remove(sandbox)


def check_diff_apply(
    open_driver: DriverFactory, work: Path, file_count: int = DIFF_FILE_COUNT
) -> None:
    """Diff a sandbox edited through overlayfs and apply the tar as a layer on its parent.

    The base has ``file_count`` files of 64 bytes, a file and a folder to delete. The
    sandbox rewrites every file and deletes the other two. ApplyDiff must return DiffSize,
    the new layer must have the sandbox's Changes, and the kernel must show the same tree.
    """
    driver = open_driver()
    try:
        base_members = [
            tarbuild.regular(f"file-{index}", file_content(1, index)) for index in range(file_count)
        ]
        base_members += [
            tarbuild.regular("file-remove", file_content(1, file_count)),
            tarbuild.directory("directory-remove"),
            tarbuild.regular("directory-remove/file", file_content(1, file_count + 1)),
        ]
        apply_layer(driver, "base", None, base_members)
        driver.create_read_write("child", "base")

        with sandbox_edit(driver, "child", work) as merged:
            for index in range(file_count):
                (merged / f"file-{index}").write_bytes(file_content(2, index))
            (merged / "file-remove").unlink()
            (merged / "directory-remove" / "file").unlink()
            (merged / "directory-remove").rmdir()
            expected_tree = tree_contents(merged)

        child_changes = driver.changes("child", "base")
        expected_changes = [
            (f"/file-{index}", int(ChangeKind.MODIFY)) for index in range(file_count)
        ]
        expected_changes += [
            ("/file-remove", int(ChangeKind.DELETE)),
            ("/directory-remove", int(ChangeKind.DELETE)),
        ]
        assert sorted(child_changes) == sorted(expected_changes)

        diff_size = driver.diff_size("child", "base")
        assert diff_size == file_count * SMALL_FILE_BYTES

        driver.create("applied", "base")
        with io.BufferedReader(driver.diff("child", "base")) as diff:
            applied_size = driver.apply_diff("applied", "base", diff)
        assert applied_size == diff_size

        # write_diff writes the same tar into a file, by the worker's hand or by a copy.
        with io.BufferedReader(driver.diff("child", "base")) as diff:
            streamed = diff.read()
        written = work / "written.tar"
        with written.open("wb") as output:
            written_size = driver.write_diff("child", "base", output)
        assert written_size == len(streamed)
        assert written.read_bytes() == streamed

        applied_changes = driver.changes("applied", "base")
        assert sorted(applied_changes) == sorted(child_changes)

        applied_image = driver.root / "applied" / LAYER_IMAGE
        e2fsck_clean(applied_image)

        with mounted_layers([driver.root / "applied", driver.root / "base"], work) as merged:
            assert tree_contents(merged) == expected_tree
    finally:
        driver.cleanup()


def expected_changes_21() -> list[Change]:
    """The changes of the 21-change case: the folder and 7 modifies, 7 adds, 6 deletes."""
    changes = [("/directory-0", int(ChangeKind.MODIFY))]
    for index in range(CHANGES_FILE_COUNT):
        if index % 3 == 0:
            changes.append((f"/directory-0/file-{index}", int(ChangeKind.MODIFY)))
        elif index % 3 == 1:
            changes.append((f"/directory-0/file-6-{index}", int(ChangeKind.ADD)))
        else:
            changes.append((f"/directory-0/file-{index}", int(ChangeKind.DELETE)))
    return sorted(changes)


def check_changes_21(open_driver: DriverFactory, work: Path, child_kind: str) -> None:
    """Changes lists 21 changes for a child that rewrites, adds and deletes files.

    The base has ``directory-0/file-<i>`` for i in 0..19. The child rewrites file-i when
    i % 3 == 0, adds ``file-6-<i>`` when i % 3 == 1 and deletes file-i when i % 3 == 2. With
    ``child_kind`` "layer" the child is an applied tar with whiteouts; with "sandbox" it is
    a sandbox edited through the kernel's overlayfs.
    """
    driver = open_driver()
    try:
        base_members = [tarbuild.directory("directory-0")]
        base_members += [
            tarbuild.regular(f"directory-0/file-{index}", file_content(1, index))
            for index in range(CHANGES_FILE_COUNT)
        ]
        apply_layer(driver, "base", None, base_members)

        if child_kind == "layer":
            child_members = [tarbuild.directory("directory-0")]
            for index in range(CHANGES_FILE_COUNT):
                if index % 3 == 0:
                    name = f"directory-0/file-{index}"
                    child_members.append(tarbuild.regular(name, file_content(2, index)))
                elif index % 3 == 1:
                    name = f"directory-0/file-6-{index}"
                    child_members.append(tarbuild.regular(name, file_content(2, index)))
                else:
                    child_members.append(whiteout(f"directory-0/file-{index}"))
            apply_layer(driver, "child", "base", child_members)
        else:
            driver.create_read_write("child", "base")
            with sandbox_edit(driver, "child", work) as merged:
                folder = merged / "directory-0"
                for index in range(CHANGES_FILE_COUNT):
                    if index % 3 == 0:
                        (folder / f"file-{index}").write_bytes(file_content(2, index))
                    elif index % 3 == 1:
                        (folder / f"file-6-{index}").write_bytes(file_content(2, index))
                    else:
                        (folder / f"file-{index}").unlink()

        changes = driver.changes("child", "base")

        assert len(changes) == 21

        kinds = [kind for _, kind in changes]
        assert kinds.count(ChangeKind.MODIFY) == 8
        assert kinds.count(ChangeKind.ADD) == 7
        assert kinds.count(ChangeKind.DELETE) == 6

        assert sorted(changes) == expected_changes_21()

        assert driver.diff_size("child", "base") == 14 * SMALL_FILE_BYTES
    finally:
        driver.cleanup()


def exercise_driver(driver: Driver) -> list[str]:
    """Run every operation that starts a service VM or takes a lock; return the layer ids."""
    apply_layer(driver, "base", None, [tarbuild.regular("file", file_content(1, 0))])
    driver.create_read_write("sandbox", "base")
    driver.create_read_write("sized-sandbox", "base", {"size": NON_DEFAULT_SANDBOX_SIZE})
    apply_layer(driver, "child", "base", [whiteout("file")])

    for layer_id in ("child", "sandbox"):
        with io.BufferedReader(driver.diff(layer_id, "base")) as diff:
            diff.read()
        driver.changes(layer_id, "base")
        driver.diff_size(layer_id, "base")

    driver.get("sandbox")
    driver.put("sandbox")
    return ["base", "sandbox", "sized-sandbox", "child"]


def check_remove_cleanup(open_driver: DriverFactory) -> None:
    """After Remove of every layer and Cleanup, the store and the process hold nothing."""
    before = ProcessResources.capture()
    driver = open_driver()
    root = driver.root
    try:
        layer_ids = exercise_driver(driver)
        for layer_id in reversed(layer_ids):
            driver.remove(layer_id)
    finally:
        driver.cleanup()

    assert driver.layer_ids() == []
    assert removing_folders(root) == []
    assert scratch_disks(root) == []
    assert temporary_files(root) == []
    assert driver.service_vms.running_names() == []
    assert child_pids() == before.children
    assert open_fd_count() == before.open_fds


# --- a driver in another process -----------------------------------------------------------

# The program that DriverProcess runs: a Driver that reads one JSON request per line on
# stdin and writes one JSON reply per line on stdout. A reply carries the result, or the
# class name and message of any exception, so that errors outside lcow's classes show too.
# The end of the input runs Cleanup.
DRIVER_PROCESS_SCRIPT: Final = """
import io
import json
import sys

from lcow.driver import Driver


def serve(driver, request):
    op = request["op"]
    layer_id = request.get("id")
    parent = request.get("parent")
    if op == "create":
        return driver.create(layer_id, parent)
    if op == "apply":
        with open(request["tar"], "rb") as tar:
            return driver.apply_diff(layer_id, parent, tar)
    if op == "create_read_write":
        size = request.get("size")
        return driver.create_read_write(layer_id, parent, {"size": size} if size else None)
    if op == "changes":
        return driver.changes(layer_id, parent)
    if op == "remove":
        return driver.remove(layer_id)
    if op == "get":
        return driver.get(layer_id)
    if op == "put":
        return driver.put(layer_id)
    raise ValueError(f"unknown request {op!r}")


def main():
    driver = Driver(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": serve(driver, request)}
        except Exception as err:
            reply = {"error": type(err).__name__, "message": str(err)}
        print(json.dumps(reply), flush=True)
    driver.cleanup()


main()
"""
DRIVER_PROCESS_START_TIMEOUT_S: Final = 60.0
DRIVER_PROCESS_REPLY_TIMEOUT_S: Final = 120.0
DRIVER_PROCESS_EXIT_TIMEOUT_S: Final = 30.0


class DriverProcess:
    """A Driver in a child process, reached with one JSON line per request.

    Use it as a context manager: the exit closes the child's input, so that it runs Cleanup
    and exits, and kills it when it does not exit in time.
    """

    def __init__(self, root: Path, options: Sequence[str], folder: Path) -> None:
        script = folder / "driver_process.py"
        if not script.exists():
            script.write_text(DRIVER_PROCESS_SCRIPT)
        self.root = root
        self.log = Path(tempfile.mkstemp(dir=folder, prefix="driver-process-", suffix=".log")[1])
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(script), str(root), json.dumps(list(options))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,
            )
        try:
            ready = self.reply(DRIVER_PROCESS_START_TIMEOUT_S)
            assert ready == {"ready": True}, f"the driver process sent {ready!r}"
        except BaseException:
            self.kill()
            self.close()
            raise

    def __repr__(self) -> str:
        return f"DriverProcess(pid={self.process.pid}, root={str(self.root)!r})"

    def __enter__(self) -> DriverProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, op: str, **arguments: object) -> None:
        """Send one request without waiting for its reply."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}).encode() + b"\n")

    def request(self, op: str, **arguments: object) -> dict[str, object]:
        """Send one request and return its reply: ``result``, or ``error`` and ``message``."""
        self.send(op, **arguments)
        return self.reply()

    def reply(self, timeout_s: float = DRIVER_PROCESS_REPLY_TIMEOUT_S) -> dict[str, object]:
        """Wait for the reply to the oldest request that has none yet."""
        stdout = self.process.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], timeout_s)
        line = stdout.readline() if readable else b""
        if not line:
            raise AssertionError(
                f"{self!r} sent no reply within {timeout_s:g} s; its log:\n"
                + self.log.read_text(errors="replace")
            )
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    def kill(self) -> None:
        """Send SIGKILL and reap the process."""
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            try:
                self.process.wait(timeout=DRIVER_PROCESS_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def processes_using(root: Path) -> list[int]:
    """Return the pids of live processes whose command line names ``root``.

    A service VM worker gets the data root on its command line (``--hide``), so this finds
    workers that a killed driver left behind.
    """
    needle = os.fsencode(root)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # the process ended meanwhile
        if needle in command_line.split(b"\0"):
            pids.append(int(entry.name))
    return sorted(pids)
