"""The lcow graph driver: Docker's graph-driver API over layer images and sandboxes.

Glossary
    data root   the store's folder; ``<root>/<id>/`` holds one layer
    layer id    Docker's cache id: 1 to 128 characters of ``[A-Za-z0-9_.-]``, not starting
                with ``.``; ``<id>-init`` is legal, ``cache``, ``scratch`` and names ending in
                ``-removing`` are reserved
    layer image ``<id>/layer.vhd``: a read-only ext4 with a fixed-VHD footer
    sandbox     ``<id>/sandbox.vhdx`` (or ``sandbox.img``): a writable disk whose ext4 root
                holds ``upper/`` and ``work/`` for overlayfs
    layer chain ``<id>/layerchain.json``: the parent folders, nearest first

Lifecycle and what a caller may rely on
    ``Driver(root, options)`` is Init: it creates the root, ``cache/`` and ``scratch/``,
    and deletes what a crashed process left (temporary files, scratch disks, ``-removing``
    folders) when no live process holds them.
    ``create`` and ``create_read_write`` return once the folder, its chain and (for the
    latter) its sandbox exist; on error nothing of the layer remains.
    ``apply_diff`` returns once ``layer.vhd`` is complete and on disk; a layer is either
    complete or has no ``layer.vhd`` at all.
    ``get`` and ``put`` count references per process; ``remove`` refuses a layer that any
    process holds, and an unknown id is not an error.
    ``cleanup`` releases leaked references, deletes ``-removing`` folders and stops every
    service VM.

Every conversion of layer data runs in a service VM (see :mod:`lcow.servicevm`).
"""

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

from lcow import __version__, spawn
from lcow.clone import clone_file
from lcow.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LcowError,
    NotFoundError,
    ServiceVMError,
)
from lcow.ext4.writer import DEFAULT_MAX_SIZE_BYTES
from lcow.hostmount import HostMounts
from lcow.layer.export import output_descriptor
from lcow.layer.tar2ext4 import fsync_directory
from lcow.options import DriverOptions, parse_size
from lcow.servicevm.base import ServiceVM
from lcow.servicevm.manager import ServiceVMManager
from lcow.servicevm.qemu_config import QemuConfig
from lcow.spawn import try_lock_file

log = logging.getLogger(__name__)

LAYER_IMAGE: Final = "layer.vhd"
LAYER_CHAIN: Final = "layerchain.json"
SANDBOX_NAMES: Final = {"vhdx": "sandbox.vhdx", "raw": "sandbox.img"}
LOCK_FILE: Final = ".lock"
REMOVING_SUFFIX: Final = "-removing"
RESERVED_IDS: Final = frozenset({"cache", "scratch"})
TEMPORARY_SUFFIX: Final = ".tmp"
LAYER_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
FEED_CHUNK_BYTES: Final = 1 << 20
# A pipe buffers 64 KiB by default, so a 50 MB tar crosses it in about 800 rounds of the
# writer filling it and the reader emptying it. 1 MiB, the kernel's default pipe-max-size,
# cuts the rounds 16-fold.
TAR_PIPE_BYTES: Final = 1 << 20
DEFAULT_ROOT: Final = "/var/lib/lcow"
FEEDER_JOIN_S: Final = 1.0
EMPTY_TAR: Final = bytes(10240)  # a tar with no members: its end marker, padded to one record
REMOVE_WAIT_S: Final = 15.0
MIN_SANDBOX_BYTES: Final = 16 << 20
LOCK_POLL_S: Final = 0.05
FSFREEZE_TIMEOUT_S: Final = 60.0


def default_root() -> Path:
    """``/var/lib/lcow`` for root, else ``$XDG_DATA_HOME/lcow``."""
    if os.geteuid() == 0:
        return Path(DEFAULT_ROOT)
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home) if data_home else Path.home() / ".local" / "share"
    return base / "lcow"


def validate_id(layer_id: str) -> str:
    """Return ``layer_id`` when it is a legal layer id; raise InvalidArgumentError if not."""
    if (
        not LAYER_ID.fullmatch(layer_id)
        or layer_id.startswith(".")
        or layer_id in RESERVED_IDS
        or layer_id.endswith(REMOVING_SUFFIX)
    ):
        raise InvalidArgumentError(
            f"invalid layer id {layer_id!r}: use 1 to 128 characters of A-Z, a-z, 0-9, "
            "'_', '.' and '-', not starting with '.', and not 'cache', 'scratch' or a name "
            f"ending in {REMOVING_SUFFIX!r}"
        )
    return layer_id


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[int]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield fd
    finally:
        os.close(fd)


def _try_exclusive(path: Path) -> int | None:
    """Open ``path`` and take an exclusive flock without waiting; None when it is held."""
    return try_lock_file(path, fcntl.LOCK_EX)


def _wait_exclusive(path: Path, timeout_s: float) -> int | None:
    """Take an exclusive flock on ``path`` within ``timeout_s``; None when it stays held."""
    deadline = time.monotonic() + timeout_s
    while True:
        fd = _try_exclusive(path)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(LOCK_POLL_S)


@contextlib.contextmanager
def _temporary_file(folder: Path, name: str) -> Iterator[tuple[int, Path]]:
    """Create a locked temporary file in ``folder``; removed unless renamed away.

    The flock tells a later Init that a live process still writes the file.
    """
    fd, path_text = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMPORARY_SUFFIX, dir=folder)
    path = Path(path_text)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd, path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class DiffStream(io.RawIOBase):
    """The tar stream of a Diff; closing it ends the export and its service VM."""

    def __init__(self, read_fd: int, finish: contextlib.ExitStack) -> None:
        super().__init__()
        self._fd = read_fd
        self._finish = finish

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        """Return the pipe's read end, for callers that splice or poll it."""
        return self._fd

    def readinto(self, buffer: Any) -> int:
        return os.readv(self._fd, [buffer])

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            super().close()
            self._finish.close()


class Driver:
    """One data root; safe to share between threads, and between processes via the disk."""

    def __init__(self, root: str | os.PathLike[str] | None = None, options: Any = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.options = DriverOptions.parse(options)
        self._refs: dict[str, tuple[int, int]] = {}  # id -> (count, fd holding a shared lock)
        self._refs_lock = threading.Lock()
        self._init_store()
        self.host_mounts = HostMounts(self.root) if self.options.host_mount else None
        self.service_vms = ServiceVMManager(
            self.root,
            backend=self.options.backend,
            global_mode=self.options.global_mode,
            timeout_s=self.options.timeout_s,
            hide=(str(self.root),),
            qemu=QemuConfig.from_options(
                self.root,
                kird_path=self.options.kird_path,
                kernel=self.options.kernel,
                initrd=self.options.initrd,
                boot_parameters=self.options.boot_parameters,
                memory_mib=self.options.vm_memory_mib,
                accel=self.options.accel,
            )
            if self.options.backend == "qemu"
            else None,
            prestart=self.options.prestart,
        )
        log.info(
            "initialised lcow store %s (%s backend, %s mode)",
            self.root,
            self.options.backend,
            "global" if self.options.global_mode else "safe",
        )

    def __repr__(self) -> str:
        return f"Driver(root={str(self.root)!r}, options={self.options!r})"

    # Init and paths ---------------------------------------------------------------------

    def _init_store(self) -> None:
        for folder in (self.root, self.root / "cache", self.root / "scratch"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _flock(self.root / LOCK_FILE, fcntl.LOCK_EX):
            self._remove_stale()

    def _remove_stale(self) -> None:
        """Delete what crashed processes left behind and no live process holds."""
        for scratch in (self.root / "scratch").iterdir():
            self._unlink_if_unlocked(scratch)
        for entry in self.root.iterdir():
            if entry.name.endswith(REMOVING_SUFFIX) and entry.is_dir():
                log.info("deleting %s, left by an interrupted Remove", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir():
                for child in entry.iterdir():
                    if child.name.startswith(".") and child.name.endswith(TEMPORARY_SUFFIX):
                        self._unlink_if_unlocked(child)

    @staticmethod
    def _unlink_if_unlocked(path: Path) -> None:
        try:
            fd = _try_exclusive(path)
        except OSError:
            return
        if fd is None:
            return  # a live process still works on it
        try:
            log.info("deleting %s, left by a process that stopped", path)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _folder(self, layer_id: str) -> Path:
        return self.root / validate_id(layer_id)

    def _require(self, layer_id: str) -> Path:
        folder = self._folder(layer_id)
        if not folder.is_dir():
            raise NotFoundError(f"failed to find layer {layer_id}: no such layer in {self.root}")
        return folder

    def _sandbox_path(self, folder: Path) -> Path | None:
        for name in SANDBOX_NAMES.values():
            if (folder / name).exists():
                return folder / name
        return None

    def _disk_of(self, folder: Path) -> tuple[Path, str | None] | None:
        """Return the disk with a layer's own content and the folder in it; None if empty."""
        image = folder / LAYER_IMAGE
        if image.exists():
            return image, None
        sandbox = self._sandbox_path(folder)
        if sandbox is not None:
            return sandbox, "upper"
        return None

    def chain(self, layer_id: str) -> list[Path]:
        """Return the folders of a layer's parents, nearest first."""
        folder = self._require(layer_id)
        try:
            entries = json.loads((folder / LAYER_CHAIN).read_text())
        except FileNotFoundError:
            return []
        except ValueError as err:
            raise LcowError(f"failed to read the chain of layer {layer_id}: {err}") from err
        return [Path(entry) for entry in entries]

    # Create -----------------------------------------------------------------------------

    def create(
        self, layer_id: str, parent: str | None = None, storage_opt: Mapping[str, str] | None = None
    ) -> None:
        """Create an empty read-only layer folder whose parent is ``parent``."""
        del storage_opt
        folder = self._folder(layer_id)
        chain: list[str] = []
        if parent:
            parent_folder = self._require(parent)
            chain = [str(parent_folder), *(str(p) for p in self.chain(parent))]
        with _flock(self.root / LOCK_FILE, fcntl.LOCK_SH):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError as err:
                raise AlreadyExistsError(f"failed to create layer {layer_id}: it exists") from err
            try:
                with _temporary_file(folder, LAYER_CHAIN) as (fd, temporary):
                    os.write(fd, json.dumps(chain).encode())
                    os.fsync(fd)
                    temporary.replace(folder / LAYER_CHAIN)
                fsync_directory(folder)
                fsync_directory(self.root)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        log.info("created layer %s (parent %s)", layer_id, parent or "none")

    def create_read_write(
        self, layer_id: str, parent: str | None = None, storage_opt: Mapping[str, str] | None = None
    ) -> None:
        """Create a layer with a blank sandbox; ``storage_opt`` may set its ``size``."""
        size_bytes = self.options.sandbox_size_bytes
        for key, value in (storage_opt or {}).items():
            if key.lower() != "size":
                raise InvalidArgumentError(
                    f"invalid storage option {key!r} for layer {layer_id}: only size is supported"
                )
            size_bytes = parse_size(value)
        if size_bytes < MIN_SANDBOX_BYTES:
            raise InvalidArgumentError(
                f"invalid sandbox size {size_bytes} bytes for layer {layer_id}: the minimum "
                f"is {MIN_SANDBOX_BYTES} bytes (16 MiB), room for ext4's journal and tables"
            )
        self.create(layer_id, parent)
        folder = self._folder(layer_id)
        try:
            self._make_sandbox(layer_id, folder, size_bytes)
        except BaseException:
            self._delete_folder(layer_id, folder)
            raise
        log.info("created sandbox layer %s (%d bytes)", layer_id, size_bytes)

    def _make_sandbox(self, layer_id: str, folder: Path, size_bytes: int) -> None:
        name = SANDBOX_NAMES[self.options.sandbox_format]
        if size_bytes == self.options.sandbox_size_bytes:
            clone_file(self._cached_sandbox(), folder / name)
        else:
            self._format_sandbox(layer_id, folder / name, size_bytes)
        fsync_directory(folder)

    def _cached_sandbox(self) -> Path:
        cached = self.root / "cache" / SANDBOX_NAMES[self.options.sandbox_format]
        if cached.exists():
            return cached
        with _flock(self.root / "cache" / LOCK_FILE, fcntl.LOCK_EX):
            if not cached.exists():
                self._format_sandbox("cache", cached, self.options.sandbox_size_bytes)
        return cached

    def _format_sandbox(self, operation_id: str, destination: Path, size_bytes: int) -> None:
        with (
            _temporary_file(destination.parent, destination.name) as (fd, temporary),
            self.service_vms.acquire(operation_id) as service_vm,
        ):
            slot = service_vm.attach(fd)
            try:
                service_vm.request(
                    "format_sandbox",
                    output=slot,
                    size_bytes=size_bytes,
                    format=self.options.sandbox_format,
                )
            finally:
                service_vm.detach(slot)
            os.fsync(fd)
            temporary.replace(destination)

    # Remove -----------------------------------------------------------------------------

    def remove(self, layer_id: str) -> None:
        """Delete a layer; an unknown id is not an error, a layer in use is."""
        folder = self._folder(layer_id)
        if not folder.is_dir():
            return
        if self.references(layer_id):
            raise FailedPreconditionError(
                f"failed to remove layer {layer_id}: this process uses it (Get without Put)"
            )
        # dockerd sends Remove right after it gives up on an ApplyDiff, and that call may still
        # be winding down. So wait a little for it before calling the layer in use.
        lock = _wait_exclusive(folder / LOCK_FILE, REMOVE_WAIT_S)
        if lock is None:
            raise FailedPreconditionError(
                f"failed to remove layer {layer_id}: it is in use (Get without Put, or an "
                "operation in progress)"
            )
        try:
            self._delete_folder(layer_id, folder)
        finally:
            os.close(lock)
        log.info("removed layer %s", layer_id)

    def _delete_folder(self, layer_id: str, folder: Path) -> None:
        removing = folder.with_name(folder.name + REMOVING_SUFFIX)
        try:
            folder.rename(removing)
        except FileNotFoundError:
            return
        fsync_directory(self.root)
        shutil.rmtree(removing, ignore_errors=True)
        if removing.exists():
            log.warning("could not delete all of %s; Cleanup will retry", removing)
        del layer_id

    # Get and Put ------------------------------------------------------------------------

    def get(self, layer_id: str, mount_label: str = "") -> str:
        """Return the layer's folder and count one more reference to it."""
        del mount_label
        folder = self._require(layer_id)
        with self._refs_lock:
            count, fd = self._refs.get(layer_id, (0, -1))
            if count == 0:
                locked_fd = try_lock_file(folder / LOCK_FILE, fcntl.LOCK_SH)
                if locked_fd is None:
                    raise FailedPreconditionError(
                        f"failed to get layer {layer_id}: it is being written or removed"
                    )
                fd = locked_fd
            if self.host_mounts is not None:
                try:
                    path = self._host_mount(layer_id, folder)
                except BaseException:
                    if count == 0:
                        os.close(fd)
                    raise
                self._refs[layer_id] = (count + 1, fd)
                return str(path)
            self._refs[layer_id] = (count + 1, fd)
        return str(folder)

    def _host_mount(self, layer_id: str, folder: Path) -> Path:
        assert self.host_mounts is not None
        lowers: list[tuple[Path, bool]] = []
        for parent in self.chain(layer_id):
            disk = self._disk_of(parent)
            if disk is not None:
                lowers.append((disk[0], disk[1] is not None))
        own = self._disk_of(folder)
        sandbox = own[0] if own is not None and own[1] is not None else None
        if own is not None and sandbox is None:
            lowers.insert(0, (own[0], False))
        return self.host_mounts.get(layer_id, sandbox, lowers)

    def put(self, layer_id: str) -> None:
        """Release one reference; at zero the layer may be removed again."""
        validate_id(layer_id)
        with self._refs_lock:
            count, fd = self._refs.get(layer_id, (0, -1))
            if count == 0:
                log.debug("put of layer %s without a matching get", layer_id)
                return
            if self.host_mounts is not None:
                self.host_mounts.put(layer_id)
            if count == 1:
                del self._refs[layer_id]
                os.close(fd)
            else:
                self._refs[layer_id] = (count - 1, fd)

    def references(self, layer_id: str) -> int:
        with self._refs_lock:
            return self._refs.get(layer_id, (0, -1))[0]

    # Queries ----------------------------------------------------------------------------

    def exists(self, layer_id: str) -> bool:
        try:
            return self._folder(layer_id).is_dir()
        except InvalidArgumentError:
            return False

    def layer_ids(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir()
            and entry.name not in RESERVED_IDS
            and not entry.name.endswith(REMOVING_SUFFIX)
        )

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backend", self.options.backend),
            ("Mode", "global" if self.options.global_mode else "safe"),
            ("Root", str(self.root)),
            ("Layers", str(len(self.layer_ids()))),
            ("Sandbox size", f"{self.options.sandbox_size_bytes / (1 << 30):g} GB"),
            ("Sandbox format", self.options.sandbox_format),
            ("lcow version", __version__),
            ("e2fsprogs version", e2fsprogs_version()),
        ]

    def get_metadata(self, layer_id: str) -> dict[str, str]:
        folder = self._require(layer_id)
        metadata = {"Dir": str(folder)}
        if (folder / LAYER_IMAGE).exists():
            metadata["LayerImage"] = str(folder / LAYER_IMAGE)
        sandbox = self._sandbox_path(folder)
        if sandbox is not None:
            metadata["Sandbox"] = str(sandbox)
        metadata["LayerChain"] = json.dumps([str(p) for p in self.chain(layer_id)])
        return metadata

    def cleanup(self) -> None:
        """Release leaked references, delete ``-removing`` folders, stop all service VMs."""
        with self._refs_lock:
            leaked, self._refs = self._refs, {}
        for layer_id, (count, fd) in leaked.items():
            log.warning("layer %s still had %d references at Cleanup; released", layer_id, count)
            os.close(fd)
        if self.host_mounts is not None:
            self.host_mounts.cleanup()
        self.service_vms.terminate_all()
        with _flock(self.root / LOCK_FILE, fcntl.LOCK_EX):
            self._remove_stale()

    # ApplyDiff --------------------------------------------------------------------------

    def apply_diff(self, layer_id: str, parent: str | None, diff: IO[bytes]) -> int:
        """Convert the tar stream ``diff`` into the layer's ``layer.vhd``; return its size.

        The stream may be plain, gzip or zstd. The size is the sum of the tar entries' sizes.
        A failed service VM is retried when it consumed no input yet, or when ``diff`` can
        seek back to where it started; a half-read stream is never retried.
        """
        del parent
        folder = self._require(layer_id)
        lock = _try_exclusive(folder / LOCK_FILE)
        if lock is None:
            raise AlreadyExistsError(
                f"failed to apply diff to layer {layer_id}: another operation is using the layer"
            )
        try:
            if (folder / LAYER_IMAGE).exists():
                raise AlreadyExistsError(
                    f"failed to apply diff to layer {layer_id}: it has a layer image already"
                )
            start = diff.tell() if _seekable(diff) else None
            for attempt in (1, 2):
                consumed = [0]
                try:
                    return self._apply_once(layer_id, folder, diff, consumed)
                except ServiceVMError as err:
                    can_retry = consumed[0] == 0 or start is not None
                    if attempt == 2 or not can_retry:
                        raise _with_context(err, f"apply diff to layer {layer_id}") from err
                    log.warning("retrying ApplyDiff of layer %s: %s", layer_id, err)
                    if start is not None:
                        diff.seek(start)
                except LcowError as err:
                    raise _with_context(err, f"apply diff to layer {layer_id}") from err
            raise AssertionError("unreachable")
        finally:
            os.close(lock)

    def _apply_once(self, layer_id: str, folder: Path, diff: IO[bytes], consumed: list[int]) -> int:
        with (
            _temporary_file(folder, LAYER_IMAGE) as (fd, temporary),
            self.service_vms.acquire(layer_id) as service_vm,
        ):
            direct = _reopen_regular_file(diff) if service_vm.streams_host_files else None
            if direct is not None:
                # The worker reads the caller's file itself: no copy through a pipe.
                read_end, write_end = direct, -1
            else:
                read_end, write_end = tar_pipe()
            try:
                input_slot = service_vm.attach(read_end)
                output_slot = service_vm.attach(fd)
            except BaseException:
                if write_end >= 0:
                    os.close(write_end)
                raise
            finally:
                os.close(read_end)
            feeder = _Feeder(diff, write_end, consumed) if write_end >= 0 else None
            if feeder is not None:
                feeder.start()
            try:
                result = service_vm.request(
                    "tar2ext4",
                    input=input_slot,
                    output=output_slot,
                    max_size_bytes=DEFAULT_MAX_SIZE_BYTES,
                    footer=True,
                )
            finally:
                # Detaching closes the worker's read end, which ends a blocked feeder.
                _detach_quietly(service_vm, input_slot)
                _detach_quietly(service_vm, output_slot)
                if feeder is not None:
                    feeder.stop()
            if feeder is not None and feeder.error is not None:
                raise LcowError(
                    f"failed to read the diff of layer {layer_id}: {feeder.error}"
                ) from feeder.error
            if feeder is None:
                diff.seek(0, os.SEEK_END)  # consumed, as it is after reading through a pipe
            os.fsync(fd)
            temporary.replace(folder / LAYER_IMAGE)
        fsync_directory(folder)
        log.info(
            "applied diff to layer %s: %d entries, %d bytes",
            layer_id,
            result["entries"],
            result["size_bytes"],
        )
        return int(result["size_bytes"])

    # Diff, Changes, DiffSize -------------------------------------------------------------

    def _own_parent(self, layer_id: str, parent: str | None) -> bool:
        chain = self.chain(layer_id)
        if not parent:
            return not chain
        return bool(chain) and chain[0] == self._folder(parent)

    def diff(self, layer_id: str, parent: str | None = None) -> DiffStream:
        """Return the tar stream of the layer's own changes; close it when done."""
        finish = contextlib.ExitStack()
        try:
            export = self._start_export(finish, layer_id, parent)
            if export is None:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                with os.fdopen(write_end, "wb") as empty:
                    empty.write(EMPTY_TAR)
                return DiffStream(read_end, finish)
            return _export_stream(finish, *export)
        except BaseException:
            finish.close()
            raise

    def write_diff(self, layer_id: str, parent: str | None, output: IO[bytes]) -> int:
        """Write the tar stream of Diff to ``output``; return its length in bytes.

        When ``output`` is a plain file object over a regular file or a pipe, a process
        service VM writes to it itself, after a flush, so the tar passes through no pipe
        and no copy in this process. The worker can then write anywhere in that file, so
        it should hold nothing else of value. Other outputs (a terminal, a socket, a
        wrapper such as GzipFile) and a utility VM get the stream of :meth:`diff`, copied.
        """
        fd = _streamable_descriptor(output)
        with contextlib.ExitStack() as finish:
            export = self._start_export(finish, layer_id, parent)
            if export is None:
                output.write(EMPTY_TAR)
                return len(EMPTY_TAR)
            service_vm, disk_slot, subdirectory = export
            if fd is None or not service_vm.streams_host_files:
                # Closing the stream closes ``finish`` too, which then has nothing left to do.
                with _export_stream(finish, *export) as stream:
                    return _copy_stream(stream, output)
            output_slot = service_vm.attach(fd)
            result = service_vm.request(
                "ext4totar", disk=disk_slot, subdirectory=subdirectory, output=output_slot
            )
            if output.seekable():
                # The worker moved the shared file offset, which a buffered object caches.
                output.seek(0, os.SEEK_CUR)
            return int(result["tar_bytes"])

    def _start_export(
        self, finish: contextlib.ExitStack, layer_id: str, parent: str | None
    ) -> tuple[ServiceVM, int, str | None] | None:
        """Take a service VM with the layer's disk attached until ``finish`` closes.

        Returns the service VM, the disk's slot and the folder to export in it, or None
        when the layer has no disk and its Diff is an empty tar.
        """
        folder = self._require(layer_id)
        if parent and not self._own_parent(layer_id, parent):
            raise InvalidArgumentError(
                f"failed to diff layer {layer_id}: {parent} is not its parent; lcow exports "
                "a layer's changes against its own parent only"
            )
        disk = self._disk_of(folder)
        if disk is None:
            return None
        service_vm = finish.enter_context(self.service_vms.acquire(layer_id))
        lock = finish.enter_context(_flock(folder / LOCK_FILE, fcntl.LOCK_SH))
        del lock
        return service_vm, self._attach_disk(finish, service_vm, disk[0]), disk[1]

    def _changes_request(self, layer_id: str, parent: str | None) -> dict[str, Any]:
        folder = self._require(layer_id)
        own_parent = self._own_parent(layer_id, parent)
        layer_folders = [folder] if own_parent else [folder, *self.chain(layer_id)]
        parent_folders: list[Path] = []
        if parent:
            parent_folders = [self._require(parent), *self.chain(parent)]
        with contextlib.ExitStack() as stack:
            service_vm = stack.enter_context(self.service_vms.acquire(layer_id))
            layer = self._attach_disks(stack, service_vm, layer_folders)
            parents = self._attach_disks(stack, service_vm, parent_folders)
            return service_vm.request("changes", layer=layer, parent=parents, own_parent=own_parent)

    def _attach_disks(
        self, stack: contextlib.ExitStack, service_vm: ServiceVM, folders: list[Path]
    ) -> list[list[Any]]:
        attached: list[list[Any]] = []
        for folder in folders:
            disk = self._disk_of(folder)
            if disk is None:
                continue
            attached.append([self._attach_disk(stack, service_vm, disk[0]), disk[1]])
        return attached

    def _attach_disk(self, stack: contextlib.ExitStack, service_vm: ServiceVM, disk: Path) -> int:
        """Attach ``disk`` read-only until ``stack`` closes; return its slot."""
        self._quiesce(stack, disk)
        fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
        try:
            slot = service_vm.attach(fd)
        finally:
            os.close(fd)
        stack.callback(_detach_quietly, service_vm, slot)
        return slot

    def _quiesce(self, stack: contextlib.ExitStack, disk: Path) -> None:
        """Freeze a sandbox this process has mounted until ``stack`` closes.

        Freezing writes out the journal, so the disk file holds a consistent filesystem
        that a service VM can read while the host keeps it mounted.
        """
        if self.host_mounts is None:
            return
        mount_point = self.host_mounts.mounted_sandbox(disk)
        if mount_point is None:
            return
        spawn.run(
            ["fsfreeze", "--freeze", str(mount_point)], check=True, timeout=FSFREEZE_TIMEOUT_S
        )
        stack.callback(
            spawn.run,
            ["fsfreeze", "--unfreeze", str(mount_point)],
            check=False,
            timeout=FSFREEZE_TIMEOUT_S,
        )

    def changes(self, layer_id: str, parent: str | None = None) -> list[tuple[str, int]]:
        """List (path, kind) changes: kind 0 modify, 1 add, 2 delete."""
        result = self._changes_request(layer_id, parent)
        return [(str(path), int(kind)) for path, kind in result["changes"]]

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Return the summed size of the added and modified non-directories."""
        return int(self._changes_request(layer_id, parent)["size"])


def _with_context(error: LcowError, action: str) -> LcowError:
    """Return ``error``'s class with "failed to <action>: " before its message."""
    return type(error)(f"failed to {action}: {error}")


def _detach_quietly(service_vm: ServiceVM, slot: int) -> None:
    if service_vm.running:
        with contextlib.suppress(LcowError):
            service_vm.detach(slot)


def _export_stream(
    finish: contextlib.ExitStack, service_vm: ServiceVM, disk_slot: int, subdirectory: str | None
) -> DiffStream:
    """Start the export of an attached disk into a pipe; return the pipe's read end.

    Closing the stream waits for the request and then closes ``finish``.
    """
    read_end, write_end = tar_pipe()
    try:
        output_slot = service_vm.attach(write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    thread = _Request(
        service_vm, "ext4totar", disk=disk_slot, subdirectory=subdirectory, output=output_slot
    )
    thread.start()
    finish.callback(thread.join)
    return DiffStream(read_end, finish)


def tar_pipe() -> tuple[int, int]:
    """Open a pipe for a layer's tar stream, of TAR_PIPE_BYTES where the kernel allows it."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        # Past the user's pipe limits the kernel rejects the size (EPERM). 64 KiB still work.
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, TAR_PIPE_BYTES)
    return read_end, write_end


def _streamable_descriptor(output: IO[bytes]) -> int | None:
    """Return the regular file or pipe under ``output`` for a worker to write, else None.

    A terminal stays out of the worker's reach: its ioctls could type into the shell.
    """
    fd = output_descriptor(output)
    if fd is None:
        return None
    mode = os.fstat(fd).st_mode
    return fd if stat.S_ISREG(mode) or stat.S_ISFIFO(mode) else None


def _copy_stream(stream: io.RawIOBase, output: IO[bytes]) -> int:
    copied = 0
    while chunk := stream.read(FEED_CHUNK_BYTES):
        output.write(chunk)
        copied += len(chunk)
    return copied


def _reopen_regular_file(stream: IO[bytes]) -> int | None:
    """Open the regular file behind ``stream`` anew, at the stream's position, else None.

    The new open file description has an offset of its own, so the worker's reads leave the
    caller's descriptor alone. It is read-only whatever the caller's mode. Only plain file
    objects qualify, because a wrapper such as gzip.GzipFile reports the file's descriptor
    but a position in other bytes.
    """
    if type(stream) not in (io.FileIO, io.BufferedReader, io.BufferedRandom):
        return None
    try:
        fileno = stream.fileno()
        if not stat.S_ISREG(os.fstat(fileno).st_mode):
            return None
        position = stream.tell()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        fd = os.open(f"/proc/self/fd/{fileno}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        log.info("failed to reopen the diff stream's file, copying it through a pipe: %s", err)
        return None
    os.lseek(fd, position, os.SEEK_SET)
    return fd


def _seekable(stream: IO[bytes]) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False


class _Feeder(threading.Thread):
    """Copy the caller's diff stream into the pipe the worker reads."""

    def __init__(self, source: IO[bytes], write_fd: int, consumed: list[int]) -> None:
        super().__init__(name="lcow-apply-diff-feeder", daemon=True)
        self.source = source
        self.consumed = consumed
        self.error: BaseException | None = None
        self._fd = write_fd
        self._fd_lock = threading.Lock()  # the pipe is written or closed, never both at once

    def run(self) -> None:
        try:
            while True:
                chunk = self.source.read(FEED_CHUNK_BYTES)
                if not chunk:
                    break
                self.consumed[0] += len(chunk)
                with self._fd_lock:
                    if self._fd < 0:
                        return
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self._fd, view) :]
        except BrokenPipeError:
            pass  # the worker stopped reading, and its reply gives the reason
        except Exception as err:  # noqa: BLE001 - any failure of the caller's stream
            # The worker would see a clean end of the stream; keep the error so ApplyDiff
            # fails instead of storing the part that arrived.
            self.error = err
        finally:
            self._close()

    def _close(self) -> None:
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def stop(self) -> None:
        """Close the pipe and wait briefly for the thread.

        Closing ends the worker's read even when the caller's stream blocks. A thread
        blocked in that stream ends when the stream returns; it holds no descriptor.
        """
        self._close()
        self.join(timeout=FEEDER_JOIN_S)
        if self.is_alive():
            log.info("the ApplyDiff stream still blocks; its reader thread ends when it returns")


class _Request(threading.Thread):
    """Run one request in the background; join() waits for it."""

    def __init__(self, service_vm: ServiceVM, op: str, **arguments: Any) -> None:
        super().__init__(name=f"lcow-{op}", daemon=True)
        self.service_vm = service_vm
        self.op = op
        self.arguments = arguments
        self.error: LcowError | None = None

    def run(self) -> None:
        try:
            self.service_vm.request(self.op, **self.arguments)
        except LcowError as err:
            self.error = err
            log.warning("%s in service VM %s failed: %s", self.op, self.service_vm.name, err)


def e2fsprogs_version() -> str:
    """Return the version mke2fs reports, or ``unknown``."""
    program = shutil.which("mke2fs") or "/sbin/mke2fs"
    try:
        result = spawn.run([program, "-V"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    match = re.search(r"mke2fs ([0-9][0-9.]*)", result.stderr + result.stdout)
    return match.group(1) if match else "unknown"
