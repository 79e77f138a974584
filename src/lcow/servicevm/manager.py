"""Start, share and stop service VMs: global mode and safe mode.

- Global mode: one service VM, ``_lcow_global_svm_``, started on first use and kept for
  the driver's life; operations share it.
- Safe mode (the default): a fresh service VM named ``<id>_svm`` per operation, terminated
  when the operation ends, also when it fails.
- Prestart (safe mode, process backend): the manager keeps up to two spare service VMs,
  workers that have served nothing yet. An operation takes one under its own name instead
  of waiting for a worker to start, and a new spare starts after the operation has ended.
  An operation that finds no spare starts its own worker, then one spare. Every operation
  still gets a worker of its own, which stops when the operation ends.

  A spare starts after an operation, not while it runs, unless the operation found none.
  On a 2-core machine, a worker starting at idle priority made a running ApplyDiff of a
  small layer 8 to 10 % slower. A busy loop at idle priority slowed a conversion by about
  1 %, so it is the start's work that interferes. The second spare serves an operation
  that follows at once, which then overlaps the next spare's start.

Each service VM gets its own scratch disk, a copy of ``cache/scratch.vhdx`` in
``scratch/<name>.vhdx``, hot-added at start and deleted when the service VM stops.
"""

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from lcow import vhdx
from lcow.clone import clone_file
from lcow.errors import ServiceVMError
from lcow.servicevm.base import ServiceVM
from lcow.servicevm.process import ProcessServiceVM
from lcow.servicevm.qemu import QemuServiceVM
from lcow.servicevm.qemu_config import QemuConfig

log = logging.getLogger(__name__)

GLOBAL_NAME: Final = "_lcow_global_svm_"
SCRATCH_SIZE_BYTES: Final = 1 << 30
SCRATCH_DISK_ID: Final = b"lcow scratch vm\0"  # 16 bytes: the page 83 id of every scratch disk
BACKENDS: Final = ("process", "qemu")
PRESTART_BACKENDS: Final = ("process",)  # a spare qemu VM would hold its guest memory idle
SPARE_NAME: Final = "_lcow_spare_svm_"
SPARE_COUNT: Final = 2  # one for the next operation, one for the operation right after it


class ServiceVMManager:
    """Hand out service VMs for operations and make sure every one of them stops."""

    def __init__(
        self,
        root: Path,
        *,
        backend: str = "process",
        global_mode: bool = False,
        timeout_s: float = 300.0,
        hide: tuple[str, ...] = (),
        qemu: QemuConfig | None = None,
        prestart: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ServiceVMError(f"unknown service VM backend {backend!r}")
        if backend == "qemu" and qemu is None:
            raise ServiceVMError("the qemu backend needs a QemuConfig")
        self.root = root
        self.backend = backend
        self.global_mode = global_mode
        self.timeout_s = timeout_s
        self.hide = hide
        self.qemu = qemu
        self._lock = threading.Lock()
        self._global: ServiceVM | None = None
        self._global_start = threading.Lock()  # one boot of the global VM at a time
        self._running: dict[str, ServiceVM] = {}
        self.started_count = 0  # service VMs that began serving operations
        self.prestart = prestart and backend in PRESTART_BACKENDS and not global_mode
        self._spares: list[_SpareStart] = []  # oldest first

    def __repr__(self) -> str:
        mode = "global" if self.global_mode else "safe"
        return f"ServiceVMManager({self.backend}, {mode}, running={sorted(self._running)})"

    @property
    def scratch_template(self) -> Path:
        return self.root / "cache" / "scratch.vhdx"

    def ensure_scratch_template(self) -> None:
        """Create the blank scratch disk once; later service VMs get copies of it."""
        template = self.scratch_template
        if template.exists():
            return
        # Several processes may start their first service VM at once on a new store.
        lock_fd = os.open(
            template.with_name(".scratch.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not template.exists():
                vhdx.create(template, SCRATCH_SIZE_BYTES, disk_id=SCRATCH_DISK_ID)
        finally:
            os.close(lock_fd)

    def _unique_name(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self._running:
            number += 1
            candidate = f"{name}-{number}"
        return candidate

    def _start(self, name: str, spare: "_SpareStart | None" = None) -> ServiceVM:
        with self._lock:
            name = self._unique_name(name)
            self._running[name] = placeholder = _Starting(name, timeout_s=0)
        # The pid keeps the names of two processes' service VMs apart on one store.
        scratch = self.root / "scratch" / f"{name}.{os.getpid()}.vhdx"
        service_vm: ServiceVM
        if self.qemu is not None and self.backend == "qemu":
            service_vm = QemuServiceVM(
                name, timeout_s=self.timeout_s, config=self.qemu, spool_folder=self.root / "scratch"
            )
        else:
            service_vm = ProcessServiceVM(
                name, timeout_s=self.timeout_s, hide=self.hide, background=spare is not None
            )
        if spare is not None:
            spare.starting = service_vm
        try:
            self.ensure_scratch_template()
            clone_file(self.scratch_template, scratch)
            # Held while the service VM runs: the store's Init deletes only unlocked disks.
            scratch_fd = os.open(scratch, os.O_RDWR | os.O_CLOEXEC)
            fcntl.flock(scratch_fd, fcntl.LOCK_EX)
            service_vm.scratch_fd = scratch_fd  # type: ignore[union-attr]
            service_vm.start()
            service_vm.attach(scratch_fd)
        except BaseException:
            service_vm.terminate(stop_timeout_s=0)
            _close_scratch(service_vm)
            scratch.unlink(missing_ok=True)
            with self._lock:
                self._running.pop(name, None)
            raise
        service_vm.scratch_path = scratch  # type: ignore[union-attr]
        with self._lock:
            assert self._running.get(name) is placeholder
            self._running[name] = service_vm
        return service_vm

    def _stop(self, service_vm: ServiceVM) -> None:
        try:
            service_vm.terminate()
        finally:
            scratch = getattr(service_vm, "scratch_path", None)
            if scratch is not None:
                scratch.unlink(missing_ok=True)
            _close_scratch(service_vm)
            with self._lock:
                if self._running.get(service_vm.name) is service_vm:
                    del self._running[service_vm.name]

    @contextlib.contextmanager
    def acquire(self, operation_id: str) -> Iterator[ServiceVM]:
        """Yield a service VM for one operation on layer ``operation_id``."""
        if self.global_mode:
            with self._lock:
                current = self._global
            if current is None or not current.running:
                with self._lock:
                    if self._global is not None and not self._global.running:
                        stale = self._global
                        self._global = None
                    else:
                        stale = None
                if stale is not None:
                    self._stop(stale)
                with self._global_start:
                    if self._global is None:
                        self._global = self._start(GLOBAL_NAME)
                        self.started_count += 1
                    current = self._global
            yield current
            return

        name = f"{operation_id}_svm"
        service_vm = self._take_spare(name) if self.prestart else None
        found_spare = service_vm is not None
        if service_vm is None:
            service_vm = self._start(name)
        with self._lock:
            self.started_count += 1  # service VMs handed to operations, spares taken included
        try:
            if not found_spare:
                # This is a new driver's first operation, or operations come faster than
                # spares start. One starts now, so that the next operation finds it. The
                # other starts after this one, because a starting spare slows it.
                self.start_spares(1)
            yield service_vm
        finally:
            try:
                self._stop(service_vm)
            finally:
                self.start_spares()

    def start_spares(self, count: int = SPARE_COUNT) -> None:
        """Start spare service VMs in the background until ``count`` are ready or starting."""
        with self._lock:
            # A spare that failed to start gives its place to a new one.
            self._spares = [spare for spare in self._spares if spare.is_alive() or spare.service_vm]
            while self.prestart and len(self._spares) < count:
                spare = _SpareStart(self)
                # Started under the lock, so that _take_spare never joins an unstarted thread.
                spare.start()
                self._spares.append(spare)

    def wait_for_spares(self, timeout_s: float) -> bool:
        """Wait for the spares there are now; return whether each one runs.

        False also when there is no spare, as with prestart off.
        """
        with self._lock:
            spares = list(self._spares)
        deadline = time.monotonic() + timeout_s
        for spare in spares:
            spare.join(max(0.0, deadline - time.monotonic()))
        return bool(spares) and all(
            spare.service_vm is not None and spare.service_vm.running for spare in spares
        )

    def _take_spare(self, name: str) -> ServiceVM | None:
        """Return the oldest running spare renamed to ``name``, or None when there is none.

        A spare that is still starting is waited for, because it is further along than a
        new start would be. Spares that failed to start, or whose worker ended, are dropped.
        """
        while True:
            with self._lock:
                spare = self._spares.pop(0) if self._spares else None
            if spare is None:
                return None
            starting = spare.starting
            if starting is not None:
                # A spare still starting in the background would keep the operation waiting.
                starting.to_foreground()
            spare.join()
            service_vm = spare.service_vm
            if service_vm is not None and service_vm.running:
                return self._rename_spare(service_vm, name)
            if service_vm is not None:
                self._stop(service_vm)

    def _rename_spare(self, service_vm: ServiceVM, name: str) -> ServiceVM | None:
        """Give a spare the operation's name; None, with the spare stopped, when that fails."""
        service_vm.to_foreground()
        scratch: Path = service_vm.scratch_path  # type: ignore[attr-defined]
        try:
            with self._lock:
                new_name = self._unique_name(name)
                if self._running.get(service_vm.name) is service_vm:
                    del self._running[service_vm.name]
                service_vm.rename(new_name)
                self._running[new_name] = service_vm
                # Under the lock: a spare that starts now may take the old name, and with it
                # the old scratch path.
                renamed = scratch.rename(scratch.with_name(f"{new_name}.{os.getpid()}.vhdx"))
                service_vm.scratch_path = renamed  # type: ignore[attr-defined]
            service_vm.request("rename", name=new_name)
        except (ServiceVMError, OSError) as err:
            log.warning("failed to use the spare service VM for %s: %s", name, err)
            self._stop(service_vm)
            return None
        return service_vm

    def terminate_all(self) -> None:
        """Stop every service VM this manager started, the spares included; used by Cleanup.

        No spare is started after this; safe-mode operations start their own service VM.
        """
        with self._lock:
            self.prestart = False
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.join()
        with self._lock:
            running = [vm for vm in self._running.values() if not isinstance(vm, _Starting)]
            self._global = None
        for service_vm in running:
            log.info("terminating service VM %s", service_vm.name)
            self._stop(service_vm)

    def running_names(self) -> list[str]:
        """List the service VMs that serve or start for operations; spares are not."""
        with self._lock:
            return sorted(name for name in self._running if not name.startswith(SPARE_NAME))

    @property
    def spares(self) -> list[ServiceVM]:
        """The spare service VMs that have started, oldest first."""
        with self._lock:
            spares = list(self._spares)
        return [
            spare.service_vm
            for spare in spares
            if not spare.is_alive() and spare.service_vm is not None
        ]

    @property
    def spares_starting(self) -> int:
        """How many spare service VMs are starting now."""
        with self._lock:
            return sum(1 for spare in self._spares if spare.is_alive())


class _SpareStart(threading.Thread):
    """Start one spare service VM; ``service_vm`` is None until it started, or if it failed."""

    def __init__(self, manager: ServiceVMManager) -> None:
        super().__init__(name="lcow-spare-service-vm", daemon=True)
        self.manager = manager
        self.starting: ServiceVM | None = None  # set as soon as the service VM exists
        self.service_vm: ServiceVM | None = None

    def run(self) -> None:
        try:
            self.service_vm = self.manager._start(SPARE_NAME, self)
        except Exception as err:  # noqa: BLE001 - the next operation starts its own instead
            log.warning("failed to start a spare service VM: %s", err)


def _close_scratch(service_vm: ServiceVM) -> None:
    fd = getattr(service_vm, "scratch_fd", -1)
    if fd >= 0:
        os.close(fd)
        service_vm.scratch_fd = -1  # type: ignore[attr-defined]


class _Starting(ServiceVM):
    """Holds a name in the table while its service VM boots."""

    def start(self) -> None:  # pragma: no cover - never started
        raise ServiceVMError("placeholder")

    def terminate(self, stop_timeout_s: float = 0) -> None:
        del stop_timeout_s

    @property
    def running(self) -> bool:
        return False
