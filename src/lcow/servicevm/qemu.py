"""The qemu backend: the worker runs in a QEMU utility VM built by ``lcow vm build``.

The machine is a q35 with PCIe root ports, so disks can be hot-added. Each attach passes
the descriptor to QEMU (QMP ``add-fd``) and adds a block node over ``/dev/fdset/N``
(``blockdev-add``). Then it adds a ``virtio-blk-pci`` device on a free root port
(``device_add``) whose serial names the slot, and the guest agent opens the disk with that
serial. A detach asks the guest to close the disk, then runs ``device_del``, waits for
``DEVICE_DELETED`` and runs ``blockdev-del``. Requests use the framed JSON of
:mod:`lcow.servicevm.protocol` over a virtio-serial port whose host end is a unix socket.

Descriptors cannot cross into a VM, so what :meth:`QemuServiceVM.attach` gets is mapped:

- a regular file or block device becomes a disk. A fixed VHD is attached as ``raw`` with
  the ext4 size, so the guest sees the filesystem without the footer; a VHDX goes through
  QEMU's ``vhdx`` driver. A writable raw file is grown sparsely to
  ``OUTPUT_CAPACITY_BYTES``, because a block device cannot grow, and cut back on detach to
  the ``output_size_bytes`` the worker reported (or to its old size).
- the read end of a pipe (a stream the worker reads) is spooled into a file in the store's
  ``scratch/`` folder until the writer closes it; that file is then hot-added and the
  agent copies it into a pipe in the guest.
- the write end of a pipe (a stream the worker writes) gets a sparse spool disk; when the
  worker closes the stream, the agent reports its length and the host copies the spool
  into the pipe.

The QMP socket, the channel socket and the console log live in a private temporary
folder. :meth:`QemuServiceVM.terminate` asks the agent to stop, then QEMU (``quit``), then
kills it; it always reaps the process and deletes the folder and the spool files.
"""

import atexit
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import platform
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lcow import vhd
from lcow.errors import FailedPreconditionError, LcowError, ServiceVMError
from lcow.servicevm import vmbuild
from lcow.servicevm.base import DEFAULT_STOP_TIMEOUT_S, ServiceVM
from lcow.servicevm.qemu_config import QemuConfig, select_accelerator
from lcow.servicevm.qmp import QmpClient
from lcow.spawn import SPAWN_LOCK

log = logging.getLogger(__name__)

ROOT_PORTS: Final = 16  # disks attached at once: a Changes over a deep chain needs many
OUTPUT_CAPACITY_BYTES: Final = 2 << 40  # above the converter's 1 TiB limit plus the footer
SECTOR_BYTES: Final = 512  # QEMU's raw driver takes sizes in whole sectors
QMP_TIMEOUT_S: Final = 30.0
UNPLUG_TIMEOUT_S: Final = 30.0  # an unplug under TCG takes about 0.1 s (scripts/bench_qemu.py)
QUIT_TIMEOUT_S: Final = 5.0
SPOOL_CHUNK_BYTES: Final = 1 << 20
SPOOL_POLL_INTERVAL_S: Final = 0.2
CONSOLE_TAIL_LINES: Final = 15
STREAM_JOIN_TIMEOUT_S: Final = 30.0
SLOT_ARGUMENTS: Final = ("input", "output", "disk")  # request arguments that name slots

# VMs started and not yet terminated. A program that exits without stopping its driver
# still ends them, and deletes their folders, at interpreter exit.
_live_vms: "weakref.WeakSet[QemuServiceVM]" = weakref.WeakSet()


@atexit.register
def _terminate_live_vms() -> None:
    for service_vm in list(_live_vms):
        log.warning("service VM %s still ran at exit; killing it", service_vm.name)
        service_vm.terminate(stop_timeout_s=0)


def disk_container(fd: int) -> tuple[str, int]:
    """Return QEMU's format driver for the disk open at ``fd`` and its guest-visible size.

    A fixed VHD is raw data followed by a footer, and the guest gets only the data.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if os.pread(fd, 8, 0) == b"vhdxfile":
        return "vhdx", size
    if size >= vhd.FOOTER_SIZE_BYTES:
        footer = os.pread(fd, vhd.FOOTER_SIZE_BYTES, size - vhd.FOOTER_SIZE_BYTES)
        if footer.startswith(b"conectix"):
            with contextlib.suppress(LcowError):
                vhd.parse_footer(footer)
                return "vhd", size - vhd.FOOTER_SIZE_BYTES
    return "raw", size


@dataclass(slots=True)
class _HotDisk:
    """A disk plugged into the VM: its QMP names and the root port it occupies."""

    node: str
    device: str
    port: str
    fdset: int


_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Have the kernel kill QEMU when the driver process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(slots=True)
class _Slot:
    """Host-side state of one attached slot."""

    kind: str  # disk, stream-in or stream-out
    disk: _HotDisk | None = None
    fd: int = -1  # the host's own descriptor: the disk, the pipe, or the spool file
    grown_from: int | None = None  # old size of a writable raw file grown for output
    output_size_bytes: int | None = None
    spool: Path | None = None
    spool_fd: int = -1
    thread: threading.Thread | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class QemuServiceVM(ServiceVM):
    """A utility VM under QEMU, reached over QMP and a virtio-serial channel."""

    def __init__(
        self, name: str, *, timeout_s: float, config: QemuConfig, spool_folder: Path
    ) -> None:
        super().__init__(name, timeout_s=timeout_s)
        self.config = config
        self.spool_folder = spool_folder
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.accelerator = ""
        self.boot_time_s = 0.0
        self._folder: Path | None = None
        self._free_ports = [f"lcow-port{i}" for i in range(ROOT_PORTS)]
        self._slot_table: dict[int, _Slot] = {}
        self._table_lock = threading.Lock()
        self._failed = False

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        state = "running" if self.running else "stopped"
        return (
            f"QemuServiceVM(name={self.name!r}, pid={pid}, accel={self.accelerator or None}, "
            f"slots={sorted(self._slot_table)}, {state})"
        )

    @property
    def running(self) -> bool:
        return not self._failed and self.process is not None and self.process.poll() is None

    # Start ----------------------------------------------------------------------------

    def _command(self, folder: Path, accelerator: str, initrd: Path) -> list[str]:
        level = logging.getLevelName(logging.getLogger("lcow").getEffectiveLevel())
        append = (
            f"console=ttyS0 panic=-1 quiet lcow.name={self.name} lcow.loglevel={level} "
            f"{self.config.boot_parameters}"
        ).strip()
        command = [
            self.config.qemu,
            *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
            # No network device: -nodefaults leaves none, and none is added.
            *("-machine", f"q35,accel={accelerator}"),
            *("-cpu", "host" if accelerator == "kvm" else "max"),
            *("-m", f"{self.config.memory_mib}M", "-smp", "1"),
            *("-kernel", str(self.config.kernel), "-initrd", str(initrd), "-append", append),
            *("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny"),
            *("-chardev", f"file,id=console,path={folder / 'console.log'}"),
            *("-serial", "chardev:console"),
            *("-chardev", f"socket,id=qmp,path={folder / 'qmp.sock'},server=on,wait=off"),
            *("-mon", "chardev=qmp,mode=control"),
            *("-chardev", f"socket,id=channel,path={folder / 'channel.sock'},server=on,wait=off"),
            *("-device", "virtio-serial-pci,id=serial0,bus=pcie.0"),
            *("-device", "virtserialport,bus=serial0.0,chardev=channel,name=lcow.channel"),
        ]
        for index, port in enumerate(self._free_ports):
            slot, function = divmod(index, 8)
            command += [
                "-device",
                f"pcie-root-port,id={port},bus=pcie.0,chassis={index + 1},"
                f"addr={0x10 + slot:#x}.{function}"
                + (",multifunction=on" if function == 0 else "")
                # Root ports reserve 4 KiB of I/O space each by default, and there are
                # only 64 KiB; virtio disks need none.
                + ",io-reserve=0",
            ]
        return command

    def _initrd(self, folder: Path) -> Path:
        """Return the initrd to boot: the configured one, or a copy with this lcow appended."""
        manifest = vmbuild.read_manifest(self.config.initrd.parent)
        built_for = manifest.get("python_version")
        if built_for is not None and built_for != platform.python_version():
            # The guest's interpreter and wheels are copies of the host's; lcow laid over
            # them must match their Python.
            raise FailedPreconditionError(
                f"failed to start service VM {self.name}: the utility VM in "
                f"{self.config.initrd.parent} carries Python {built_for}, lcow runs on "
                f"{platform.python_version()}; rebuild it with "
                f"`lcow vm build {self.config.initrd.parent}`"
            )
        missing = vmbuild.missing_packages(manifest) if manifest else []
        if missing:
            raise FailedPreconditionError(
                f"failed to start service VM {self.name}: the utility VM in "
                f"{self.config.initrd.parent} lacks the Python packages {', '.join(missing)} "
                f"that this lcow imports; rebuild it with "
                f"`lcow vm build {self.config.initrd.parent}`"
            )
        if manifest.get("lcow_digest") == vmbuild.lcow_digest():
            return self.config.initrd
        log.info(
            "the utility VM in %s carries another lcow; booting it with this one laid over",
            self.config.initrd.parent,
        )
        # NOTE: a cpio archive can add and replace files but not remove them. An extension
        # module that the base initrd's lcow has and this lcow lacks (a build with
        # LCOW_MYPYC=0, say) stays in the guest and shadows its source: rebuild the VM then.
        combined = folder / "initrd.img"
        with combined.open("wb") as output:
            with self.config.initrd.open("rb") as base:
                shutil.copyfileobj(base, output)
            output.write(_lcow_archive())
        return combined

    def start(self) -> None:
        self.config.check()
        started = time.monotonic()
        deadline = started + self.timeout_s
        self.accelerator = select_accelerator(self.config)
        self._folder = Path(tempfile.mkdtemp(prefix="lcow-vm-"))
        _live_vms.add(self)
        try:
            command = self._command(self._folder, self.accelerator, self._initrd(self._folder))
            with (self._folder / "qemu.log").open("wb") as qemu_log, SPAWN_LOCK:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=qemu_log,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl runs there
                )
            log.info(
                "started service VM %s (qemu pid %d, %s)",
                self.name,
                self.process.pid,
                self.accelerator,
            )
            self.qmp = QmpClient(
                str(self._wait_for_socket("qmp.sock", deadline)), timeout_s=QMP_TIMEOUT_S
            )
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            channel.connect(str(self._folder / "channel.sock"))
            self.channel = channel
            self._start_reader()
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                self.request("hello", timeout_s=remaining)
            except ServiceVMError as err:
                raise ServiceVMError(
                    f"failed to boot service VM {self.name}: {err}; {self._console_tail()}"
                ) from err
        except BaseException:
            self.terminate(stop_timeout_s=0)
            raise
        self.boot_time_s = time.monotonic() - started
        log.info("service VM %s booted in %.1f s", self.name, self.boot_time_s)

    def _wait_for_socket(self, name: str, deadline: float) -> Path:
        assert self._folder is not None
        assert self.process is not None
        path = self._folder / name
        while not path.exists():
            if self.process.poll() is not None:
                raise ServiceVMError(
                    f"failed to start service VM {self.name}: QEMU exited with status "
                    f"{self.process.returncode}: {self._qemu_log()}"
                )
            if time.monotonic() >= deadline:
                raise ServiceVMError(
                    f"failed to start service VM {self.name}: QEMU made no QMP socket within "
                    f"{self.timeout_s:g} s (lcow.timeout sets the limit)"
                )
            time.sleep(0.01)
        return path

    def _qemu_log(self) -> str:
        assert self._folder is not None
        with contextlib.suppress(OSError):
            return (self._folder / "qemu.log").read_text(errors="replace").strip()[-1000:]
        return "(no output)"

    def _console_tail(self) -> str:
        if self._folder is None:
            return "no console output"
        try:
            lines = (self._folder / "console.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no console output"
        if not lines:
            return "the guest printed nothing on its console"
        return "last console lines: " + " | ".join(lines[-CONSOLE_TAIL_LINES:])

    # Stop -----------------------------------------------------------------------------

    def terminate(self, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        _live_vms.discard(self)
        process = self.process
        if process is None:
            self._remove_folder()
            return
        if process.poll() is None and stop_timeout_s > 0 and self.channel is not None:
            try:
                self.request("shutdown", timeout_s=stop_timeout_s)
                process.wait(timeout=stop_timeout_s)
            except (ServiceVMError, subprocess.TimeoutExpired) as err:
                log.info("service VM %s did not power off on request: %s", self.name, err)
        if process.poll() is None and self.qmp is not None and stop_timeout_s > 0:
            try:
                self.qmp.execute("quit", timeout_s=QUIT_TIMEOUT_S)
                process.wait(timeout=QUIT_TIMEOUT_S)
            except (ServiceVMError, subprocess.TimeoutExpired) as err:
                log.info("QEMU of service VM %s did not quit: %s", self.name, err)
        if process.poll() is None:
            log.warning("killing service VM %s (qemu pid %d)", self.name, process.pid)
            process.kill()
        process.wait()
        self._failed = True

        if self.channel is not None:
            self.channel.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.qmp is not None:
            self.qmp.close()
        self._release_slots()
        self._remove_folder()
        log.info("stopped service VM %s (qemu exit status %s)", self.name, process.returncode)
        self.process = None
        self.channel = None
        self.qmp = None

    def _remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _release_slots(self) -> None:
        """Close what the host holds for every slot; QEMU has exited, so no disk is in use."""
        with self._table_lock:
            slots, self._slot_table = self._slot_table, {}
        for entry in slots.values():
            entry.cancelled.set()
        for entry in slots.values():
            if entry.thread is not None:
                entry.thread.join(timeout=STREAM_JOIN_TIMEOUT_S)
            _close(entry.fd)
            entry.fd = -1
            self._drop_spool(entry)

    def _fail(self, reason: str) -> None:
        """Mark the VM unusable, so the manager starts a new one for the next operation."""
        if not self._failed:
            log.warning("service VM %s is unusable: %s", self.name, reason)
        self._failed = True

    # Requests -------------------------------------------------------------------------

    def request(
        self,
        op: str,
        *,
        fds: list[int] | None = None,
        timeout_s: float | None = None,
        **arguments: Any,
    ) -> dict[str, Any]:
        if fds:
            raise ServiceVMError(
                f"failed to send {op} to service VM {self.name}: descriptors cannot cross "
                "into a VM; use attach"
            )
        result = super().request(op, timeout_s=timeout_s, **arguments)
        for key in SLOT_ARGUMENTS:
            with self._table_lock:
                entry = self._slot_table.get(arguments.get(key, -1))
            if entry is None:
                continue
            if entry.error is not None:
                raise ServiceVMError(
                    f"failed to {op} in service VM {self.name}: the stream of slot "
                    f"{arguments[key]} failed: {entry.error}"
                )
            if key == "output" and "output_size_bytes" in result:
                entry.output_size_bytes = int(result["output_size_bytes"])
        return result

    def _handle_event(self, message: dict[str, Any]) -> None:
        if message.get("event") != "stream_closed":
            super()._handle_event(message)
            return
        with self._table_lock:
            entry = self._slot_table.get(int(message.get("slot", -1)))
        if entry is None or entry.kind != "stream-out":
            log.warning("service VM %s closed an unknown stream: %s", self.name, message)
            return
        entry.error = message.get("error")
        entry.thread = threading.Thread(
            target=self._deliver_output,
            args=(int(message["slot"]), entry, int(message.get("size_bytes", 0))),
            name=f"{self.name}-stream-out",
            daemon=True,
        )
        entry.thread.start()

    # Disks ----------------------------------------------------------------------------

    def attach(self, fd: int) -> int:
        """Hot-add a disk, or a pipe end as a stream; return its slot number."""
        info = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        slot = next(self._slots)
        if stat.S_ISFIFO(info.st_mode):
            if access == os.O_RDONLY:
                self._attach_stream_in(fd, slot)
            else:
                self._attach_stream_out(fd, slot)
        elif stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode):
            if access == os.O_WRONLY:
                raise ServiceVMError(
                    f"failed to attach descriptor {fd} to service VM {self.name}: a disk "
                    "must be open for reading or for reading and writing"
                )
            self._attach_disk(fd, slot, writable=access == os.O_RDWR)
        else:
            raise ServiceVMError(
                f"failed to attach descriptor {fd} to service VM {self.name}: it is neither "
                f"a file, a block device nor a pipe (mode {stat.filemode(info.st_mode)})"
            )
        return slot

    def _attach_disk(self, fd: int, slot: int, *, writable: bool) -> None:
        container, size = disk_container(fd)
        entry = _Slot("disk", fd=os.dup(fd))
        with contextlib.ExitStack() as undo:
            undo.callback(_close, entry.fd)
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if writable and container == "raw" and regular and size < OUTPUT_CAPACITY_BYTES:
                entry.grown_from = size
                os.ftruncate(fd, OUTPUT_CAPACITY_BYTES)
                undo.callback(os.ftruncate, entry.fd, size)
            entry.disk = self._hot_add(
                fd, slot, container, size if container == "vhd" else None, writable=writable
            )
            undo.callback(self._hot_remove_quietly, entry.disk)
            self._register(slot, entry)
            undo.callback(self._unregister, slot)
            self.request("attach_disk", slot=slot, serial=_serial(slot), writable=writable)
            undo.pop_all()

    def detach(self, slot: int) -> None:
        with self._table_lock:
            entry = self._slot_table.get(slot)
        if entry is None:
            raise ServiceVMError(
                f"failed to detach slot {slot} of service VM {self.name}: nothing is attached there"
            )
        # A spool still reading the caller's stream stops; a feed in progress ends when the
        # guest closes the slot's pipe.
        entry.cancelled.set()
        self.request("detach", slot=slot)
        if entry.thread is not None:
            entry.thread.join(timeout=self.timeout_s)
            if entry.thread.is_alive():
                self._fail(f"the stream of slot {slot} did not stop")
        if entry.kind == "disk" and entry.disk is not None:
            self._hot_remove(entry.disk)
            if entry.grown_from is not None:
                final = entry.output_size_bytes
                os.ftruncate(entry.fd, entry.grown_from if final is None else final)
        if entry.kind != "stream-out":
            self._unregister(slot)
            _close(entry.fd)
            self._drop_spool(entry)

    def _register(self, slot: int, entry: _Slot) -> None:
        with self._table_lock:
            self._slot_table[slot] = entry

    def _unregister(self, slot: int) -> None:
        with self._table_lock:
            self._slot_table.pop(slot, None)

    def _hot_add(
        self, fd: int, slot: int, container: str, size: int | None, *, writable: bool
    ) -> _HotDisk:
        """Plug the disk open at ``fd`` into a free root port with the slot's serial."""
        qmp = self._qmp()
        with self._table_lock:
            if not self._free_ports:
                raise ServiceVMError(
                    f"failed to attach a disk to service VM {self.name}: all {ROOT_PORTS} "
                    "PCIe root ports hold disks; detach one first"
                )
            port = self._free_ports.pop(0)
        with contextlib.ExitStack() as undo:
            undo.callback(self._return_port, port)
            fdset = int(qmp.execute("add-fd", {"opaque": f"slot {slot}"}, fds=[fd])["fdset-id"])
            undo.callback(self._qmp_quietly, "remove-fd", {"fdset-id": fdset})
            node = f"disk{slot}"
            options: dict[str, Any] = {
                "driver": "raw" if container == "vhd" else container,
                "node-name": node,
                "read-only": not writable,
                # The store's own file locks guard the disks; QEMU's byte-range locks
                # would only stop two service VMs from reading one layer at once.
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "locking": "off"},
            }
            if size is not None:
                options["size"] = size
            try:
                qmp.execute("blockdev-add", options)
            except ServiceVMError as err:
                raise ServiceVMError(
                    f"failed to attach a {container} disk to service VM {self.name}: {err}"
                ) from err
            undo.callback(self._qmp_quietly, "blockdev-del", {"node-name": node})
            device = f"blk{slot}"
            qmp.execute(
                "device_add",
                {
                    "driver": "virtio-blk-pci",
                    "id": device,
                    "drive": node,
                    "bus": port,
                    "serial": _serial(slot),
                },
            )
            undo.pop_all()
        return _HotDisk(node, device, port, fdset)

    def _hot_remove(self, disk: _HotDisk) -> None:
        """Unplug a disk the guest has closed: device_del, DEVICE_DELETED, blockdev-del."""
        qmp = self._qmp()
        mark = qmp.event_mark()
        try:
            qmp.execute("device_del", {"id": disk.device})
            qmp.wait_event(
                "DEVICE_DELETED", {"device": disk.device}, since=mark, timeout_s=UNPLUG_TIMEOUT_S
            )
        except ServiceVMError as err:
            self._fail(f"disk {disk.device} did not unplug: {err}")
            raise ServiceVMError(
                f"failed to detach disk {disk.device} from service VM {self.name}: {err}"
            ) from err
        qmp.execute("blockdev-del", {"node-name": disk.node})
        self._qmp_quietly("remove-fd", {"fdset-id": disk.fdset})
        self._return_port(disk.port)

    def _hot_remove_quietly(self, disk: _HotDisk) -> None:
        with contextlib.suppress(ServiceVMError):
            self._hot_remove(disk)

    def _return_port(self, port: str) -> None:
        with self._table_lock:
            self._free_ports.append(port)

    def _qmp(self) -> QmpClient:
        if self.qmp is None or not self.running:
            raise ServiceVMError(f"service VM {self.name} is not running")
        return self.qmp

    def _qmp_quietly(self, command: str, arguments: dict[str, Any]) -> None:
        with contextlib.suppress(ServiceVMError):
            self._qmp().execute(command, arguments)

    # Streams --------------------------------------------------------------------------

    def _new_spool(self, slot: int, suffix: str) -> tuple[Path, int]:
        """Create a spool file in the store's scratch folder, locked while it is used.

        The lock shows the store's Init that a live process owns the file.
        """
        self.spool_folder.mkdir(parents=True, exist_ok=True)
        # The pid keeps apart the global VMs of two processes, which share one name.
        path = self.spool_folder / f"{self.name}-{os.getpid()}-{slot}.{suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    def _drop_spool(self, entry: _Slot) -> None:
        if entry.spool is not None:
            entry.spool.unlink(missing_ok=True)
            entry.spool = None
        _close(entry.spool_fd)
        entry.spool_fd = -1

    def _attach_stream_in(self, fd: int, slot: int) -> None:
        entry = _Slot("stream-in", fd=fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))
        entry.spool, entry.spool_fd = self._new_spool(slot, "in")
        self._register(slot, entry)
        try:
            self.request("attach_stream_in", slot=slot)
        except BaseException:
            self._unregister(slot)
            _close(entry.fd)
            self._drop_spool(entry)
            raise
        entry.thread = threading.Thread(
            target=self._feed_input, args=(slot, entry), name=f"{self.name}-stream-in", daemon=True
        )
        entry.thread.start()

    def _feed_input(self, slot: int, entry: _Slot) -> None:
        """Spool the caller's stream to its end, then hand the spool to the guest as a disk."""
        length = 0
        try:
            while not entry.cancelled.is_set():
                # Wait in short steps, so a detach need not wait for the writer to finish.
                readable, _, _ = select.select([entry.fd], [], [], SPOOL_POLL_INTERVAL_S)
                if not readable:
                    continue
                chunk = os.read(entry.fd, SPOOL_CHUNK_BYTES)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.pwrite(entry.spool_fd, view, length + len(chunk) - len(view)) :]
                length += len(chunk)
        except OSError as err:
            if not entry.cancelled.is_set():
                entry.error = f"failed to read the stream after {length} bytes: {err}"
        if entry.cancelled.is_set():
            return
        if entry.error is None:
            try:
                # QEMU's raw driver sizes disks in whole sectors; the guest reads `length`.
                os.ftruncate(entry.spool_fd, -(-length // SECTOR_BYTES) * SECTOR_BYTES)
                # QEMU dups a descriptor of the fdset with the access mode it opens with.
                assert entry.spool is not None
                reader = os.open(entry.spool, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    entry.disk = self._hot_add(reader, slot, "raw", None, writable=False)
                finally:
                    os.close(reader)
                try:
                    self.request("feed", slot=slot, serial=_serial(slot), size_bytes=length)
                finally:
                    self._hot_remove(entry.disk)
                    entry.disk = None
            except (OSError, LcowError) as err:
                entry.error = f"failed to pass {length} bytes into the VM: {err}"
        if entry.error is not None:
            log.warning("stream of slot %d into service VM %s: %s", slot, self.name, entry.error)
            # End the guest's pipe, so the worker stops waiting; request() reports the error.
            with contextlib.suppress(LcowError):
                self.request("feed", slot=slot, size_bytes=0)

    def _attach_stream_out(self, fd: int, slot: int) -> None:
        entry = _Slot("stream-out", fd=fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))
        with contextlib.ExitStack() as undo:
            undo.callback(_close, entry.fd)
            entry.spool, entry.spool_fd = self._new_spool(slot, "out")
            undo.callback(self._drop_spool, entry)
            os.ftruncate(entry.spool_fd, OUTPUT_CAPACITY_BYTES)
            entry.disk = self._hot_add(entry.spool_fd, slot, "raw", None, writable=True)
            undo.callback(self._hot_remove_quietly, entry.disk)
            self._register(slot, entry)
            undo.callback(self._unregister, slot)
            self.request("attach_stream_out", slot=slot, serial=_serial(slot))
            undo.pop_all()

    def _deliver_output(self, slot: int, entry: _Slot, size_bytes: int) -> None:
        """Copy a closed output stream from its spool into the caller's pipe."""
        position = 0
        try:
            while position < size_bytes and not entry.cancelled.is_set():
                chunk = os.pread(
                    entry.spool_fd, min(SPOOL_CHUNK_BYTES, size_bytes - position), position
                )
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(entry.fd, view) :]
                position += len(chunk)
        except OSError as err:
            # The reader closed its end: a Diff closed before its end.
            log.info("output stream of slot %d stopped at byte %d: %s", slot, position, err)
        _close(entry.fd)
        entry.fd = -1
        if entry.disk is not None and self.running:
            with contextlib.suppress(ServiceVMError):
                self._hot_remove(entry.disk)
        self._unregister(slot)
        self._drop_spool(entry)


def _serial(slot: int) -> str:
    return f"lcow-{slot}"


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


@functools.cache
def _lcow_archive_for(digest: str) -> bytes:
    del digest  # the cache key: a changed lcow gets a new archive
    return vmbuild.lcow_archive()


def _lcow_archive() -> bytes:
    return _lcow_archive_for(vmbuild.lcow_digest())
