"""``--share INPUT``: where ApplyDiff spends the time that convert_tar does not.

Safe-mode ApplyDiff with the process backend runs in this process on INPUT, 9 times in each
of two ways, alternating. In one, the driver's spare workers are ready before the call,
as in a driver whose operations are further apart than a worker's start, so nothing
starts during the call. In the other, the call follows another ApplyDiff at once. The
spare that the first call's end started is then starting while the second call runs, and
only the second call is timed. The difference is what a spare's start costs a call.
``convert_tar`` of INPUT in this process is timed 9 times between them, with the spares
ready.

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
from bench.spares import ready_spares
from lcow.driver import Driver
from lcow.layer.tar2ext4 import convert_tar
from lcow.servicevm.base import ServiceVM
from lcow.servicevm.manager import ServiceVMManager

ROUNDS: Final = 9
SPARES_READY: Final = "ApplyDiff, spares ready"
RIGHT_AFTER: Final = "ApplyDiff right after another, a spare starting"


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
                timers.add("acquire: take a spare", time.perf_counter() - started)
                yield service_vm
                released = time.perf_counter()
            timers.add(
                "release: stop and reap the worker, start a spare", time.perf_counter() - released
            )

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
                right_after = number % 2 == 1
                manager = driver.service_vms
                ready_spares(manager)
                layer_ids = [f"share-{number}-{call}" for call in range(1 + right_after)]
                for layer_id in layer_ids:
                    driver.create(layer_id)
                for layer_id in layer_ids:
                    # Only the last call is timed. With right_after, the first call's end
                    # leaves a spare starting.
                    with layer.open("rb") as diff:
                        started = time.perf_counter()
                        driver.apply_diff(layer_id, None, diff)
                        seconds = time.perf_counter() - started
                timers.add(RIGHT_AFTER if right_after else SPARES_READY, seconds)
                for layer_id in layer_ids:
                    driver.remove(layer_id)
                if not right_after:
                    # The call's end started a spare, which would slow convert_tar too.
                    ready_spares(manager)
                    # Replacing the last round's image would time the freeing of its pages.
                    (folder / "share.vhd").unlink(missing_ok=True)
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
