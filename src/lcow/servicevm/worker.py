"""The service VM's worker: the one program that touches untrusted layer data.

It runs as a child process in its own namespaces (process backend) or inside a utility VM
(qemu backend). It sees only the descriptors it is handed over the channel, answers the
requests listed in :mod:`lcow.servicevm.protocol`, and runs each request in a thread of its
own so one worker can serve several operations in global mode.

Started as ``python -m lcow.servicevm.worker --channel-fd N``. Before it reads any request
it hides the paths named by ``--hide`` behind empty tmpfs mounts (where its mount namespace
allows), lowers its resource limits and installs a seccomp filter.
"""

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Final

from lcow import __version__, vhd, vhdx
from lcow.clone import copy_data_ranges, set_size
from lcow.disk import open_disk
from lcow.errors import LcowError, ServiceVMError
from lcow.ext4.reader import Ext4Reader
from lcow.layer import changes as changes_module
from lcow.layer.export import export_tar
from lcow.layer.tar2ext4 import convert_stream, vhd_unique_id
from lcow.layer.tarstream import SOURCE_BUFFER_BYTES
from lcow.servicevm import protocol

log = logging.getLogger("lcow.servicevm.worker")

MAX_ADDRESS_SPACE_BYTES: Final = 16 << 30  # libarchive, ISA-L threads and the inode tree
MAX_OPEN_FILES: Final = 1024
SANDBOX_FEATURES: Final = "lazy_itable_init=1,lazy_journal_init=1"

# System calls a layer conversion never needs; each returns EPERM. The worker formats,
# reads and writes the descriptors it holds and runs mke2fs, nothing more.
DENIED_SYSCALLS: Final = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "reboot",
    "swapon",
    "swapoff",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "syslog",
    "connect",
)


def _descriptor_path(fd: int) -> str:
    # Tools such as mke2fs take a path; this one names exactly the descriptor we were handed.
    return f"/proc/self/fd/{fd}"


class Worker:
    """Serve requests on ``channel`` until shutdown or until the channel closes."""

    def __init__(self, channel: socket.socket, name: str, isolation: list[str]) -> None:
        self.channel = channel
        self.name = name
        self.isolation = isolation
        self.slots: dict[int, int] = {}
        self._send_lock = threading.Lock()
        self._slots_lock = threading.Lock()
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"Worker(name={self.name!r}, slots={sorted(self.slots)})"

    def run(self) -> None:
        threads: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                received = protocol.receive(self.channel)
            except ConnectionError as err:
                # The driver's process ended without stopping this worker, for example
                # killed, or exited with a spare still starting.
                log.info("the driver closed the channel: %s", err)
                break
            if received is None:
                break
            message, fds = received
            if message.get("op") == "attach":
                self._reply(message, self._attach(message, fds))
                continue
            for fd in fds:
                os.close(fd)
            if message.get("op") == "shutdown":
                self._reply(message, {})
                break
            thread = threading.Thread(target=self._serve, args=(message,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def _reply(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self._send(request, {"id": request.get("id"), "result": result})

    def _fail(self, request: dict[str, Any], error: BaseException) -> None:
        self._send(
            request,
            {
                "id": request.get("id"),
                "error": {"type": type(error).__name__, "message": str(error)},
            },
        )

    def _send(self, request: dict[str, Any], message: dict[str, Any]) -> None:
        try:
            with self._send_lock:
                protocol.send(self.channel, message)
        except ConnectionError as err:
            log.info(
                "failed to send the reply to request %s %s: the driver closed the channel: %s",
                request.get("id"),
                request.get("op"),
                err,
            )
        except OSError:
            log.exception(
                "failed to send the reply to request %s %s", request.get("id"), request.get("op")
            )

    def _serve(self, request: dict[str, Any]) -> None:
        handler = getattr(self, "op_" + str(request.get("op")), None)
        if handler is None:
            self._fail(request, ServiceVMError(f"unknown service VM request {request.get('op')!r}"))
            return
        try:
            result = handler(request)
        except (LcowError, OSError, ValueError) as err:
            log.info("request %s %s failed: %s", request.get("id"), request.get("op"), err)
            self._fail(request, err)
        except Exception as err:
            log.exception("request %s %s crashed", request.get("id"), request.get("op"))
            self._fail(request, err)
        else:
            self._reply(request, result)

    def _attach(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ServiceVMError(f"attach needs one descriptor, got {len(fds)}")
        with self._slots_lock:
            old = self.slots.pop(int(request["slot"]), None)
            if old is not None:
                os.close(old)
            self.slots[int(request["slot"])] = fds[0]
        return {}

    def _slot(self, number: Any) -> int:
        with self._slots_lock:
            fd = self.slots.get(int(number))
        if fd is None:
            raise ServiceVMError(f"no disk or stream is attached at slot {number}")
        return fd

    def op_hello(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "isolation": self.isolation}

    def op_rename(self, request: dict[str, Any]) -> dict[str, Any]:
        # A prestarted spare learns the name of the operation it serves, for its log lines.
        self.name = str(request["name"])
        _set_log_name(self.name)
        log.info("serving as service VM %s", self.name)
        return {}

    def op_detach(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._slots_lock:
            fd = self.slots.pop(int(request["slot"]), None)
        if fd is not None:
            os.close(fd)
        return {}

    def op_tar2ext4(self, request: dict[str, Any]) -> dict[str, Any]:
        source_fd = self._slot(request["input"])
        output_fd = self._slot(request["output"])
        source: IO[bytes] = os.fdopen(os.dup(source_fd), "rb", buffering=SOURCE_BUFFER_BYTES)
        with source:
            stats, digest = convert_stream(
                source, output_fd, max_size_bytes=int(request["max_size_bytes"])
            )
        output_size_bytes = stats.image_size_bytes
        if request.get("footer", True):
            unique_id = vhd_unique_id(digest)
            vhd.append_footer(output_fd, stats.image_size_bytes, unique_id)
            output_size_bytes += vhd.FOOTER_SIZE_BYTES
        os.fsync(output_fd)
        return {
            "output_size_bytes": output_size_bytes,
            "entries": stats.entries,
            "size_bytes": stats.size_bytes,
            "image_size_bytes": stats.image_size_bytes,
            "tar_bytes": stats.tar_bytes,
            "compression": stats.compression,
            "tar_blake3": stats.tar_blake3,
        }

    def op_ext4totar(self, request: dict[str, Any]) -> dict[str, Any]:
        disk_fd = self._slot(request["disk"])
        output_fd = self._slot(request["output"])
        subdirectory = request.get("subdirectory")
        try:
            with open_disk(_descriptor_path(disk_fd)) as disk:
                reader = Ext4Reader(disk.device, disk.size_bytes)
                with os.fdopen(os.dup(output_fd), "wb", buffering=1 << 20) as output:
                    stats = export_tar(
                        reader, output, subdirectory=subdirectory.encode() if subdirectory else None
                    )
        finally:
            # The reader of the stream gets end-of-file when the last write end closes.
            self.op_detach({"slot": request["output"]})
        return {"entries": stats.entries, "tar_bytes": stats.tar_bytes}

    def op_format_sandbox(self, request: dict[str, Any]) -> dict[str, Any]:
        output_fd = self._slot(request["output"])
        size_bytes = int(request["size_bytes"])
        disk_format = request.get("format", "vhdx")
        with tempfile.TemporaryDirectory(prefix="lcow-sandbox-") as folder:
            content = Path(folder, "root")
            (content / "upper").mkdir(parents=True)
            (content / "work").mkdir()
            if disk_format == "raw":
                set_size(output_fd, size_bytes)
                _mke2fs(output_fd, size_bytes, content)
                output_size_bytes = size_bytes
            else:
                # mke2fs writes raw disks only: format a sparse memory file, then convert.
                raw_fd = os.memfd_create("lcow-sandbox-raw", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(raw_fd, size_bytes)
                    _mke2fs(raw_fd, size_bytes, content)
                    converted = Path(folder, "sandbox.vhdx")
                    vhdx.raw_to_vhdx(_descriptor_path(raw_fd), converted)
                    output_size_bytes = _copy_sparse(converted, output_fd)
                finally:
                    os.close(raw_fd)
        os.fsync(output_fd)
        return {"output_size_bytes": output_size_bytes}

    def op_changes(self, request: dict[str, Any]) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            layer = [self._tree(stack, slot, sub) for slot, sub in request["layer"]]
            parent = [self._tree(stack, slot, sub) for slot, sub in request["parent"]]
            new_view = changes_module.MergedView(layer + parent)
            if request.get("own_parent", True) and layer:
                found = changes_module.layer_changes(layer[0], changes_module.MergedView(parent))
                if len(layer) > 1:
                    found = changes_module.tree_changes(new_view, changes_module.MergedView(parent))
            else:
                found = changes_module.tree_changes(new_view, changes_module.MergedView(parent))
            size = changes_module.diff_size(found, new_view)
        return {"changes": list(changes_module.iter_paths(found)), "size": size}

    def _tree(
        self, stack: contextlib.ExitStack, slot: int, subdirectory: str | None
    ) -> changes_module.LayerTree:
        disk = stack.enter_context(open_disk(_descriptor_path(self._slot(slot))))
        reader = Ext4Reader(disk.device, disk.size_bytes)
        top = reader.lookup(subdirectory.encode()) if subdirectory else 2
        return changes_module.LayerTree(reader, top)


def _mke2fs(fd: int, size_bytes: int, content: Path) -> None:
    """Format the disk open at ``fd``; mke2fs inherits the descriptor and opens its path."""
    program = shutil.which("mke2fs") or "/sbin/mke2fs"
    command = [
        program,
        "-q",
        "-F",
        "-t",
        "ext4",
        "-E",
        SANDBOX_FEATURES,
        "-d",
        str(content),
        _descriptor_path(fd),
        f"{size_bytes // 1024}k",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, pass_fds=(fd,))
    if result.returncode != 0:
        raise ServiceVMError(
            f"failed to format the sandbox: mke2fs exited with status {result.returncode}: "
            f"{result.stderr.strip()}"
        )


def _copy_sparse(source: Path, destination_fd: int) -> int:
    """Copy the data ranges of ``source`` into ``destination_fd``; return the size copied.

    The holes read as zeros in the copy because the destination is emptied first. A block
    device cannot be emptied: the qemu backend hands over output disks that are all zeros.
    """
    with source.open("rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        if not stat.S_ISBLK(os.fstat(destination_fd).st_mode):
            os.ftruncate(destination_fd, 0)
        copy_data_ranges(reader.fileno(), destination_fd, size)
    return size


def _code_under(folder: str) -> bool:
    """Tell whether Python or lcow itself is loaded from below ``folder``."""
    import lcow  # noqa: PLC0415 - only its location is needed

    places = [sys.prefix, sys.base_prefix, *lcow.__path__, *sys.path]
    prefix = folder.rstrip("/") + "/"
    return any(os.path.realpath(place or ".").startswith(prefix) for place in places)


def _private_tmp() -> bool:
    """Mount an empty tmpfs on /tmp, so temporary files never reach the host's /tmp.

    Skipped when the interpreter or lcow lives below /tmp (a checkout there, for example):
    covering it would hide the code the worker still imports.
    """
    if _code_under("/tmp"):  # noqa: S108 - the path is inspected, nothing is written
        log.info("worker shares the host's /tmp: Python or lcow is installed below it")
        return False
    result: int = _libc().mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"mode=1777")
    if result != 0:
        log.warning("worker shares the host's /tmp: %s", os.strerror(_errno()))
    return result == 0


def _hide_paths(paths: list[str]) -> list[str]:
    """Cover ``paths`` with empty read-only tmpfs mounts; return the ones hidden."""
    hidden = []
    libc = _libc()
    for path in paths:
        if not Path(path).is_dir():
            continue
        result = libc.mount(b"none", os.fsencode(path), b"tmpfs", 1, b"size=4k,mode=0")
        if result == 0:
            hidden.append(path)
        else:
            log.warning("could not hide %s from the worker: %s", path, os.strerror(_errno()))
    return hidden


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    return ctypes.get_errno()


def _limit_resources() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, limit), limit))
    resource.setrlimit(resource.RLIMIT_AS, (MAX_ADDRESS_SPACE_BYTES, MAX_ADDRESS_SPACE_BYTES))


def _load_seccomp() -> Any:
    """Import pyseccomp before any mount can hide it; None when libseccomp is missing."""
    try:
        import pyseccomp  # noqa: PLC0415 - loads libseccomp, which may be missing
    except (ImportError, OSError) as err:
        log.warning("worker runs without a seccomp filter: %s", err)
        return None
    return pyseccomp


def _install_seccomp(seccomp: Any) -> bool:
    if seccomp is None:
        return False
    syscall_filter = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name)
    syscall_filter.load()
    return True


def _log_format(name: str) -> str:
    return f"lcow worker {name}: %(levelname)s: %(message)s"


def _set_log_name(name: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(_log_format(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcow-worker")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--name", default="worker")
    parser.add_argument("--hide", action="append", default=[])
    parser.add_argument("--namespaces", default="")
    parser.add_argument("--log-level", default="WARNING", help="the driver's own log level")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=arguments.log_level, format=_log_format(arguments.name))

    isolation = [name for name in arguments.namespaces.split(",") if name]
    seccomp = _load_seccomp()
    if "mount" in isolation:
        if _private_tmp():
            isolation.append("private-tmp")
        if arguments.hide and _hide_paths(arguments.hide):
            isolation.append("hidden-store")
    _limit_resources()
    isolation.append("rlimits")
    if _install_seccomp(seccomp):
        isolation.append("seccomp")

    channel = socket.socket(fileno=arguments.channel_fd)
    worker = Worker(channel, arguments.name, isolation)
    log.info("started with pid %d, isolation %s", os.getpid(), ",".join(isolation) or "none")
    worker.run()
    log.info("stopped")
    # Every reply is sent and every request flushed its output, so the interpreter's own
    # shutdown has nothing left to do. Skipping it makes a safe-mode stop faster.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
