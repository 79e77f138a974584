"""Host mount mode (``lcow.hostmount=true``): Get returns a mounted root on this host.

Each layer image of a chain is loop-mounted read-only once and shared by every Get that
needs it; a sandbox (raw in this mode, since VHDX cannot be loop-mounted) is loop-mounted
read-write, and its ``upper/`` and ``work/`` back an overlayfs whose lower directories are
the chain, nearest first; a sandbox parent contributes its ``upper/``. Mounts are counted:
the last Put unmounts the overlay and every image mount it held, and ``mount -o loop``
detaches each loop device at its unmount (autoclear).

Everything lives in one run folder per data root and process,
``/run/lcow/<root hash>/<pid>/``: ``i/<n>`` image mounts with short names, so that the
overlay's lowerdir option stays below the kernel's page-size limit for 128 layers and more,
``m/<id>`` merged roots, and ``empty/``, a read-only empty tmpfs that stands for a layer
with no content and serves as the lower layer of a sandbox without parents. Init and
Cleanup unmount what processes that no longer run left there, and never touch anything
outside that folder and the data root.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lcow import spawn
from lcow.errors import FailedPreconditionError, LcowError, UnsupportedError
from lcow.spawn import try_lock_file

log = logging.getLogger(__name__)

RUN_BASE: Final = Path("/run/lcow")
PAGE_SIZE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
MOUNT_TIMEOUT_S: Final = 60.0


def _run(command: list[str], *, cwd: Path | None = None) -> None:
    result = spawn.run(
        command, capture_output=True, text=True, cwd=cwd, timeout=MOUNT_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise LcowError(
            f"failed to run {' '.join(command)}: exit status {result.returncode}: "
            f"{result.stderr.strip()}"
        )


def _check_option_length(layer_id: str, options: str) -> None:
    if len(options) >= PAGE_SIZE_BYTES:
        raise UnsupportedError(
            f"failed to mount layer {layer_id}: its overlay options take {len(options)} "
            f"bytes, the kernel's limit is {PAGE_SIZE_BYTES}"
        )


def check_support() -> None:
    """Raise FailedPreconditionError unless this host can loop-mount and use overlayfs."""
    problems = []
    if os.geteuid() != 0:
        problems.append("it needs root")
    if not Path("/dev/loop-control").exists():
        problems.append("/dev/loop-control is missing (load the loop module)")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            spawn.run(["modprobe", "overlay"], capture_output=True, timeout=30, check=False)
        filesystems = Path("/proc/filesystems").read_text()
        if "overlay" not in filesystems:
            problems.append("the kernel has no overlayfs (modprobe overlay)")
    if "ext4" not in filesystems:
        problems.append("the kernel has no ext4")
    if problems:
        raise FailedPreconditionError("failed to enable lcow.hostmount: " + "; ".join(problems))


def mounts_below(folder: Path) -> list[Path]:
    """Return the mount points at or below ``folder``, deepest first."""
    found = []
    prefix = str(folder)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            found.append(Path(mount_point))
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def _unmount(path: Path) -> None:
    _run(["umount", str(path)])


@dataclass
class _ImageMount:
    path: Path
    users: int = 0
    lock_fd: int = -1  # an exclusive flock that keeps other processes off a sandbox


@dataclass
class _Root:
    path: Path
    images: list[Path] = field(default_factory=list)
    users: int = 0
    is_mount: bool = True
    uses_empty: bool = False  # uses the read-only empty tmpfs


class HostMounts:
    """The mounts of one driver process, counted per image and per layer."""

    def __init__(self, data_root: Path) -> None:
        check_support()
        digest = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:8]
        self.base = RUN_BASE / digest
        self.folder = self.base / str(os.getpid())
        self._lock = threading.RLock()
        self._images: dict[Path, _ImageMount] = {}
        self._roots: dict[str, _Root] = {}
        self._next_short = 0
        self._empty_users = 0
        self.remove_stale()

    def __repr__(self) -> str:
        return f"HostMounts({str(self.folder)!r}, roots={sorted(self._roots)})"

    # Stale state ----------------------------------------------------------------------

    def remove_stale(self) -> None:
        """Unmount and delete the run folders of processes that no longer run."""
        if not self.base.is_dir():
            return
        for entry in self.base.iterdir():
            if not entry.name.isdigit() or entry == self.folder:
                continue
            if Path(f"/proc/{entry.name}").exists() and entry.name != str(os.getpid()):
                continue  # that process still runs and owns its mounts
            self._tear_down(entry)

    def _tear_down(self, folder: Path) -> None:
        for mount_point in mounts_below(folder):
            log.info("unmounting %s, left by a stopped lcow process", mount_point)
            try:
                _unmount(mount_point)
            except LcowError as err:
                log.warning("could not unmount %s: %s", mount_point, err)
        shutil.rmtree(folder, ignore_errors=True)

    def _prepare_folder(self) -> None:
        for name in ("i", "m", "empty"):
            (self.folder / name).mkdir(parents=True, exist_ok=True, mode=0o755)

    def _acquire_empty(self) -> Path:
        """Mount ``empty/`` as a read-only tmpfs for its first user: shared, unwritable."""
        empty = self.folder / "empty"
        if self._empty_users == 0:
            _run(["mount", "-t", "tmpfs", "-o", "ro,size=4k,mode=0755", "lcow-empty", str(empty)])
        self._empty_users += 1
        return empty

    def _release_empty(self) -> None:
        self._empty_users -= 1
        if self._empty_users == 0:
            _unmount(self.folder / "empty")

    # Image mounts ---------------------------------------------------------------------

    def _mount_image(self, image: Path, *, writable: bool) -> Path:
        existing = self._images.get(image)
        if existing is not None:
            existing.users += 1
            return existing.path
        lock_fd = -1
        if writable:
            locked_fd = try_lock_file(image.with_name(".mount.lock"), fcntl.LOCK_EX)
            if locked_fd is None:
                raise FailedPreconditionError(
                    f"failed to mount sandbox {image}: another process has it mounted"
                )
            lock_fd = locked_fd
        short = format(self._next_short, "x")
        self._next_short += 1
        mount_point = self.folder / "i" / short
        mount_point.mkdir()
        options = "loop" if writable else "ro,loop,noload"
        try:
            _run(["mount", "-t", "ext4", "-o", options, str(image), str(mount_point)])
        except BaseException:
            mount_point.rmdir()
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        self._images[image] = _ImageMount(mount_point, 1, lock_fd)
        return mount_point

    def _release_image(self, image: Path) -> None:
        mounted = self._images.get(image)
        if mounted is None:
            return
        mounted.users -= 1
        if mounted.users > 0:
            return
        del self._images[image]
        try:
            _unmount(mounted.path)
            mounted.path.rmdir()
        finally:
            if mounted.lock_fd >= 0:
                os.close(mounted.lock_fd)

    def mounted_sandbox(self, image: Path) -> Path | None:
        """Return where ``image`` is mounted by this process, or None."""
        with self._lock:
            mounted = self._images.get(image)
            return mounted.path if mounted else None

    # Roots ----------------------------------------------------------------------------

    def get(self, layer_id: str, sandbox: Path | None, lowers: list[tuple[Path, bool]]) -> Path:
        """Mount and return the root of ``layer_id``; repeated calls share one mount.

        ``sandbox`` is the layer's own raw sandbox, or None for a read-only layer.
        ``lowers`` lists the disks below, nearest first, each with whether it is a sandbox
        (whose ``upper/`` is the lower directory) or a layer image (whose root is).
        """
        with self._lock:
            existing = self._roots.get(layer_id)
            if existing is not None:
                existing.users += 1
                return existing.path
            self._prepare_folder()
            held: list[Path] = []
            try:
                root = self._mount_root(layer_id, sandbox, lowers, held)
            except BaseException:
                for image in reversed(held):
                    self._release_image(image)
                raise
            self._roots[layer_id] = root
            return root.path

    def _mount_root(
        self, layer_id: str, sandbox: Path | None, lowers: list[tuple[Path, bool]], held: list[Path]
    ) -> _Root:
        lower_names: list[str] = []
        for disk, is_sandbox in lowers:
            mount_point = self._mount_image(disk, writable=is_sandbox)
            held.append(disk)
            relative = mount_point.relative_to(self.folder / "i")
            lower_names.append(f"{relative}/upper" if is_sandbox else str(relative))

        if sandbox is None and not lowers:
            return _Root(self._acquire_empty(), held, 1, is_mount=False, uses_empty=True)
        if sandbox is None and len(lowers) == 1 and not lowers[0][1]:
            # One layer image and nothing to stack: its read-only mount is the layer.
            return _Root(self._images[held[0]].path, held, 1, is_mount=False)
        uses_empty = False
        if sandbox is None and len(lower_names) == 1:
            # A sandbox's upper/ alone: a read-only overlay keeps writes off the parent's
            # disk. overlayfs without an upper layer needs two lower layers.
            self._acquire_empty()
            uses_empty = True
            lower_names.append("../empty")

        merged = self.folder / "m" / layer_id
        merged.mkdir(exist_ok=True)
        if sandbox is not None:
            upper_mount = self._mount_image(sandbox, writable=True)
            held.append(sandbox)
            if not lower_names:
                self._acquire_empty()
                uses_empty = True
                lower_names.append("../empty")
            options = (
                f"lowerdir={':'.join(lower_names)},"
                f"upperdir={upper_mount}/upper,workdir={upper_mount}/work"
            )
        else:
            options = f"lowerdir={':'.join(lower_names)}"
        # Relative lower paths from the image folder keep the option short, as overlay2 does.
        try:
            _check_option_length(layer_id, options)
            _run(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                cwd=self.folder / "i",
            )
        except BaseException:
            if uses_empty:
                self._release_empty()
            raise
        return _Root(merged, held, 1, uses_empty=uses_empty)

    def put(self, layer_id: str) -> None:
        """Release one reference; the last one unmounts the root and its images."""
        with self._lock:
            root = self._roots.get(layer_id)
            if root is None:
                return
            root.users -= 1
            if root.users > 0:
                return
            del self._roots[layer_id]
            if root.is_mount:
                _unmount(root.path)
                root.path.rmdir()
            if root.uses_empty:
                self._release_empty()
            for image in reversed(root.images):
                self._release_image(image)

    def cleanup(self) -> None:
        """Unmount everything this process mounted, and what stopped processes left."""
        with self._lock:
            for layer_id in list(self._roots):
                root = self._roots[layer_id]
                log.warning("layer %s was still mounted at Cleanup; unmounting", layer_id)
                root.users = 1
                self.put(layer_id)
            self.remove_stale()
            self._tear_down(self.folder)
            with contextlib.suppress(OSError):
                self.base.rmdir()  # only when no other process has a folder there
