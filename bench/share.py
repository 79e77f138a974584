"""``--share INPUT``: where ApplyDiff spends the time that convert_tar does not.

Safe-mode ApplyDiff with the process backend runs in this process on INPUT, 9 times in each
of two ways, alternating, with the driver's spare worker ready before each call. One way
lets the call start the next spare, as a running driver does. The other stops the driver
from starting one, which no driver does, and so shows what the next spare's start costs
the call. ``convert_tar`` of INPUT in this process is timed 9 times between them.

Every service VM request and the acquire and release of the worker are timed too, so the
report splits a call into the ``tar2ext4`` request and the driver's steps around it.
"""

import collections
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from bench.profile import resolve
from lcow.driver import Driver
from lcow.layer.tar2ext4 import convert_tar
from lcow.servicevm.base import ServiceVM
from lcow.servicevm.manager import ServiceVMManager

ROUNDS: Final = 9
SPARE_READY_TIMEOUT_S: Final = 60.0
WITH_SPARE: Final = "ApplyDiff, next spare starting"
WITHOUT_SPARE: Final = "ApplyDiff, no next spare"


class _Timers:
    """Timers around ServiceVM.request and ServiceVMManager.acquire in this process."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self._request = ServiceVM.request
        self._acquire = ServiceVMManager.acquire

    def add(self, name: str, seconds: float) -> None:
        self.samples[name].append(seconds)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        timers = self
        real_request, real_acquire = self._request, self._acquire

        def request(service_vm: ServiceVM, op: str, **arguments: Any) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                return real_request(service_vm, op, **arguments)
            finally:
                timers.add(f"request {op}", time.perf_counter() - started)

        @contextlib.contextmanager
        def acquire(manager: ServiceVMManager, operation_id: str) -> Iterator[ServiceVM]:
            started = time.perf_counter()
            with real_acquire(manager, operation_id) as service_vm:
                timers.add("acquire: take the spare, start the next", time.perf_counter() - started)
                yield service_vm
                released = time.perf_counter()
            timers.add("release: stop and reap the worker", time.perf_counter() - released)

        ServiceVM.request = request  # type: ignore[method-assign,assignment]
        ServiceVMManager.acquire = acquire  # type: ignore[assignment]
        try:
            yield
        finally:
            ServiceVM.request = real_request  # type: ignore[method-assign]
            ServiceVMManager.acquire = real_acquire  # type: ignore[method-assign]


def share(name: str, folder: Path) -> str:
    """Time ApplyDiff of INPUT and its parts; return the report to print."""
    layer = resolve(name)
    driver = Driver(folder / "share-store", [])
    timers = _Timers()
    try:
        with timers.installed():
            for number in range(2 * ROUNDS):
                with_spare = number % 2 == 0
                manager = driver.service_vms
                manager.start_spare()
                if not manager.wait_for_spare(SPARE_READY_TIMEOUT_S):
                    raise OSError("the spare service VM did not start")
                if not with_spare:
                    # The call still takes the ready spare, but starts no next one.
                    manager.start_spare = lambda: None  # type: ignore[method-assign]
                layer_id = f"share-{number}"
                driver.create(layer_id)
                with layer.open("rb") as diff:
                    started = time.perf_counter()
                    driver.apply_diff(layer_id, None, diff)
                    timers.add(
                        WITH_SPARE if with_spare else WITHOUT_SPARE, time.perf_counter() - started
                    )
                vars(manager).pop("start_spare", None)
                driver.remove(layer_id)
                if with_spare:
                    started = time.perf_counter()
                    convert_tar(layer, folder / "share.vhd")
                    timers.add("convert_tar in this process", time.perf_counter() - started)
    finally:
        driver.cleanup()

    lines = [f"ApplyDiff of {layer.name}, {ROUNDS} rounds each, medians:"]
    for case, values in sorted(timers.samples.items()):
        lines.append(
            f"  {case}: {1000 * statistics.median(values):.1f} ms "
            f"({1000 * min(values):.1f} - {1000 * max(values):.1f} ms, {len(values)} samples)"
        )
    return "\n".join(lines) + "\n"
