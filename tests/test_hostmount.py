"""Host mount mode (``lcow.hostmount=true``): Get returns a root that the kernel mounted.

The checks follow Docker's graphtest (CreateBase, CreateSnap, DeepLayerRead) and write and
read files through the returned root, so the kernel's ext4 and overlayfs decide what a
layer contains. Mounts and loop devices are read from /proc/self/mountinfo and losetup.
Every test needs root, loop devices and overlayfs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

pytest.register_assert_rewrite("driver_conformance")

import driver_conformance as suite  # noqa: E402
import tarbuild  # noqa: E402
from hoststate import (  # noqa: E402
    DETACH_TIMEOUT_S,
    loop_devices_backed_by,
    mount_options,
    mount_points_below,
    release_loop_devices_backed_by,
    release_mounts_below,
    run_folder,
    settle,
)
from lcow.driver import Driver  # noqa: E402
from lcow.errors import InvalidArgumentError  # noqa: E402
from lcow.layer.changes import ChangeKind  # noqa: E402

pytestmark = pytest.mark.root

OPTIONS: Final = ["lcow.hostmount=true"]
BUILD_OPTIONS: Final = ["lcow.globalmode=true"]  # for the chain only: see chain_driver
PAGE_SIZE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")  # the kernel's limit for mount options

# Docker graphtest's base layer: a sticky folder owned 1:2 and a setuid file anyone may write.
BASE_FOLDER: Final = "a subdir"
BASE_FOLDER_MODE: Final = stat.S_ISVTX | 0o705
BASE_FOLDER_OWNER: Final = (1, 2)
BASE_FILE: Final = "a file"
BASE_FILE_MODE: Final = stat.S_ISUID | 0o222
BASE_FILE_DATA: Final = b"Some data"

CHILD_TIMEOUT_S: Final = 60.0  # how long the child process of the crash test may take to Get

# The crash test's child: Init the store, Get one layer, print the root and wait on stdin.
CHILD_SCRIPT: Final = """
import sys
from lcow.driver import Driver
driver = Driver(sys.argv[1], sys.argv[3:])
print(driver.get(sys.argv[2]), flush=True)
sys.stdin.read()
"""


# The next process that opens the store.
INIT_SCRIPT: Final = """
import sys
from lcow.driver import Driver
Driver(sys.argv[1], sys.argv[2:])
"""


# --- fixtures ------------------------------------------------------------------------------


def release_host_state(root: Path, folder: Path) -> None:
    """Unmount what host mount mode left for ``root`` and detach loop devices of ``folder``."""
    release_mounts_below(run_folder(root))
    release_loop_devices_backed_by(folder)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A data root whose mounts and loop devices are released after the test."""
    data_root = tmp_path / "root"
    yield data_root
    release_host_state(data_root, tmp_path)


@pytest.fixture
def driver(root: Path) -> Iterator[Driver]:
    store = Driver(root, OPTIONS)
    yield store
    store.cleanup()


@pytest.fixture(scope="module")
def chain_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """A store in host mount mode containing the suite's 128-layer chain.

    A global-mode driver builds the chain, because one worker for all 128 conversions took
    about 2 s where a worker per conversion took 33 s (2-core test machine), and the images
    are the same. The driver under test then opens the store with this module's options.
    """
    folder = tmp_path_factory.mktemp("hostmount-chain")
    builder = Driver(folder / "root", BUILD_OPTIONS)
    try:
        suite.build_chain(builder)
    finally:
        builder.cleanup()
    store = Driver(folder / "root", OPTIONS)
    try:
        yield store
    finally:
        store.cleanup()
        release_host_state(store.root, folder)


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(driver: Driver, layer_id: str) -> Iterator[Path]:
    """Yield the root that Get returns for ``layer_id``, and Put the layer when the block ends."""
    layer_root = Path(driver.get(layer_id))
    try:
        yield layer_root
    finally:
        driver.put(layer_id)


def entry_names(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def write_base(layer_root: Path) -> None:
    """Write graphtest's base layer below ``layer_root``, with modes that the umask cannot cut."""
    folder = layer_root / BASE_FOLDER
    folder.mkdir()
    folder.chmod(BASE_FOLDER_MODE)
    os.lchown(folder, *BASE_FOLDER_OWNER)

    file = layer_root / BASE_FILE
    file.write_bytes(BASE_FILE_DATA)
    file.chmod(BASE_FILE_MODE)


def assert_base(layer_root: Path) -> None:
    """Check graphtest's base layer below ``layer_root``: two entries, modes, owners, content."""
    assert entry_names(layer_root) == [BASE_FILE, BASE_FOLDER]

    folder = os.lstat(layer_root / BASE_FOLDER)
    assert stat.S_ISDIR(folder.st_mode)
    assert stat.S_IMODE(folder.st_mode) == BASE_FOLDER_MODE
    assert (folder.st_uid, folder.st_gid) == BASE_FOLDER_OWNER

    file = os.lstat(layer_root / BASE_FILE)
    assert stat.S_ISREG(file.st_mode)
    assert stat.S_IMODE(file.st_mode) == BASE_FILE_MODE
    assert (file.st_uid, file.st_gid) == (0, 0)
    assert (layer_root / BASE_FILE).read_bytes() == BASE_FILE_DATA


def create_base(driver: Driver, layer_id: str) -> None:
    """Create ``layer_id`` as a sandbox without parent and write the base layer through Get."""
    driver.create_read_write(layer_id)
    with mounted(driver, layer_id) as layer_root:
        write_base(layer_root)


def apply_files(driver: Driver, layer_id: str, parent: str | None, files: dict[str, bytes]) -> None:
    members = [tarbuild.regular(name, data) for name, data in files.items()]
    suite.apply_layer(driver, layer_id, parent, members)


def chain_level_names(depth: int) -> list[str]:
    return [f"level-{level}" for level in range(depth)]


def assert_chain_readable(layer_root: Path, depth: int) -> None:
    for level in range(depth):
        content = (layer_root / suite.chain_file(level)).read_bytes()
        assert content == suite.chain_file_content(level), f"level {level}"


def write_errno(layer_root: Path) -> int | None:
    """Try to create a file below ``layer_root``, and return the errno or None on success."""
    try:
        (layer_root / "written-through-get").write_bytes(b"x")
    except OSError as err:
        return err.errno
    return None


def read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """Return the next line the process prints, or fail when none comes within the timeout."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, f"the child printed nothing in {timeout_s} s"
    return process.stdout.readline().strip()


# --- graphtest ---------------------------------------------------------------------------------


def test_create_base(driver: Driver) -> None:
    """CreateBase: files written through Get reach the sandbox and read back from the disk."""
    create_base(driver, "base")

    # The Put unmounted the sandbox, so this Get mounts it again and reads the disk.
    with mounted(driver, "base") as layer_root:
        assert_base(layer_root)

    driver.create_read_write("child", "base")
    with mounted(driver, "child") as layer_root:
        assert_base(layer_root)


def test_create_snap(driver: Driver) -> None:
    """CreateSnap: a layer created on the base shows the base's files through Get."""
    create_base(driver, "base")
    driver.create("snap", "base")

    with mounted(driver, "snap") as layer_root:
        assert_base(layer_root)


def test_deep_layer_read(chain_driver: Driver) -> None:
    """DeepLayerRead: Get of the top of 128 layers shows every level's file."""
    depth = suite.CHAIN_DEPTH
    top = suite.chain_layer_id(depth - 1)

    with mounted(chain_driver, top) as layer_root:
        assert_chain_readable(layer_root, depth)

        names = entry_names(layer_root)
        assert names == sorted([*chain_level_names(depth), "lost+found"])

        assert len(mount_options(str(layer_root))) < PAGE_SIZE_BYTES

    assert mount_points_below(run_folder(chain_driver.root)) == []


def test_deep_sandbox_read(chain_driver: Driver) -> None:
    """A sandbox on the top of 128 layers shows every level and takes new files."""
    depth = suite.CHAIN_DEPTH
    top = suite.chain_layer_id(depth - 1)
    chain_driver.create_read_write("deep-sandbox", top)

    with mounted(chain_driver, "deep-sandbox") as layer_root:
        assert_chain_readable(layer_root, depth)

        (layer_root / "new-file").write_bytes(b"on top of the chain\n")
        assert (layer_root / "new-file").read_bytes() == b"on top of the chain\n"

        assert len(mount_options(str(layer_root))) < PAGE_SIZE_BYTES

    assert chain_driver.changes("deep-sandbox", top) == [("/new-file", int(ChangeKind.ADD))]
    chain_driver.remove("deep-sandbox")


def test_chain_sandbox(chain_driver: Driver) -> None:
    suite.check_chain_sandbox(chain_driver)


def test_remove_cleanup(root: Path) -> None:
    suite.check_remove_cleanup(lambda: Driver(root, OPTIONS))

    assert mount_points_below(run_folder(root)) == []
    assert settle(lambda: loop_devices_backed_by(root), [], DETACH_TIMEOUT_S) == []


# --- references and mounts -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layer", "sandbox"])
def test_get_same_path(driver: Driver, kind: str) -> None:
    """Repeated Gets return one mount, which stays until the last Put."""
    apply_files(driver, "base", None, {"base-file": b"base\n"})
    if kind == "layer":
        apply_files(driver, "top", "base", {"top-file": b"top\n"})
    else:
        driver.create_read_write("top", "base")

    first = driver.get("top")
    second = driver.get("top")

    assert second == first
    assert first in mount_points_below(run_folder(driver.root))

    driver.put("top")
    assert first in mount_points_below(run_folder(driver.root))

    driver.put("top")
    assert first not in mount_points_below(run_folder(driver.root))


def test_put_unmounts_all(driver: Driver) -> None:
    """The last Put of every layer unmounts all and detaches every loop device it attached."""
    apply_files(driver, "base", None, {"base-file": b"base\n"})
    apply_files(driver, "middle", "base", {"middle-file": b"middle\n"})
    driver.create_read_write("sandbox", "middle")
    folder = run_folder(driver.root)

    driver.get("sandbox")
    driver.get("middle")

    # Two layer images, one sandbox and two overlays.
    assert len(mount_points_below(folder)) == 5
    assert len(loop_devices_backed_by(driver.root)) == 3

    driver.put("sandbox")
    driver.put("middle")

    assert mount_points_below(folder) == []
    assert settle(lambda: loop_devices_backed_by(driver.root), [], DETACH_TIMEOUT_S) == []


@pytest.mark.parametrize("kind", ["image", "stacked", "empty"])
def test_read_only_layer(driver: Driver, kind: str) -> None:
    """Get of a layer without sandbox returns a root that rejects writes with EROFS."""
    if kind == "empty":
        driver.create("layer")
    elif kind == "image":
        apply_files(driver, "layer", None, {"layer-file": b"layer\n"})
    else:
        apply_files(driver, "base", None, {"base-file": b"base\n"})
        apply_files(driver, "layer", "base", {"layer-file": b"layer\n"})

    with mounted(driver, "layer") as layer_root:
        assert write_errno(layer_root) == errno.EROFS


@pytest.mark.parametrize("parent_kind", ["none", "layer", "sandbox"])
def test_empty_layer_content(driver: Driver, parent_kind: str) -> None:
    """A layer created and never filled shows its parent's content, or nothing."""
    parent: str | None = None
    expected: list[str] = []
    if parent_kind == "layer":
        parent = "parent"
        apply_files(driver, parent, None, {"parent-file": b"parent\n"})
        expected = ["lost+found", "parent-file"]  # the layer image's root
    elif parent_kind == "sandbox":
        parent = "parent"
        driver.create_read_write(parent)
        with mounted(driver, parent) as layer_root:
            (layer_root / "parent-file").write_bytes(b"parent\n")
        expected = ["parent-file"]  # the sandbox's upper/
    driver.create("empty", parent)

    with mounted(driver, "empty") as layer_root:
        assert entry_names(layer_root) == expected


# --- options and crashes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["lcow.hostmount=true", "lcow.sandboxformat=vhdx"],
        ["lcow.sandboxformat=vhdx", "lcow.hostmount=true"],
    ],
)
def test_vhdx_rejected(root: Path, options: list[str]) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        Driver(root, options)

    message = str(raised.value)
    assert "lcow.hostmount=true" in message
    assert "lcow.sandboxformat=raw" in message
    assert "VHDX" in message
    assert not root.exists()


@pytest.mark.parametrize("release", ["init", "cleanup"])
def test_crash_mounts_released(driver: Driver, release: str) -> None:
    """A process killed between Get and Put leaves mounts, and Init or Cleanup removes them."""
    apply_files(driver, "base", None, {"base-file": b"base\n"})
    driver.create_read_write("sandbox", "base")
    folder = run_folder(driver.root)

    with subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(driver.root), "sandbox", *OPTIONS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            merged = read_line(child, CHILD_TIMEOUT_S)
        finally:
            child.kill()  # SIGKILL: the child gets no chance to Put or unmount
            child.wait(timeout=CHILD_TIMEOUT_S)
    child_folder = folder / str(child.pid)

    # One layer image, the sandbox and the overlay stay mounted after the kill.
    assert merged in mount_points_below(child_folder)
    assert len(mount_points_below(child_folder)) == 3
    assert len(loop_devices_backed_by(driver.root)) == 2

    if release == "init":
        init = subprocess.run(
            [sys.executable, "-c", INIT_SCRIPT, str(driver.root), *OPTIONS],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        assert init.returncode == 0, init.stderr
    else:
        driver.cleanup()

    assert mount_points_below(child_folder) == []
    assert not child_folder.exists()
    assert settle(lambda: loop_devices_backed_by(driver.root), [], DETACH_TIMEOUT_S) == []
