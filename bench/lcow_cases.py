"""The lcow cases: ApplyDiff, tar2vhd, Diff, CreateReadWrite, service VM start, Changes."""

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from bench.inputs import Layer
from bench.spares import ready_spares
from bench.timing import Case, Sample, run_command, stop_process_group
from lcow.driver import Driver
from lcow.servicevm.manager import ServiceVMManager

REPOSITORY: Final = Path(__file__).resolve().parent.parent
LCOW_COMMAND: Final = Path(sys.executable).parent / "lcow"
APPLY_DIFF: Final = "ApplyDiff"
APPLY_DIFF_COLD: Final = "ApplyDiff, cold start"
DIFF: Final = "Diff"
DIFF_COLD: Final = "Diff, cold start"
DIFF_TO_FILE: Final = "Diff to a file"
_layer_numbers = itertools.count(1)


def run_child(arguments: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.child`` with ``arguments``; return the JSON it prints."""
    # A session of its own lets an interrupted run stop the child and its service VM too.
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.child", *arguments],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        output, errors = process.communicate()
    except BaseException:
        stop_process_group(process)
        raise
    if process.returncode != 0:
        raise RuntimeError(
            f"bench.child {arguments[0]} failed with exit status {process.returncode}: "
            f"{errors.strip()[-2000:]}"
        )
    answer: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return answer


def apply_diff(layer: Layer, store: Path, *, prestart: bool) -> Case:
    """Time Driver.apply_diff in safe mode (a new worker per call), process backend.

    With ``prestart`` the driver's spare workers are ready before the timer starts, as in a
    running driver. Without it, the call is a new driver's first and starts its worker.
    The peak RSS is the worker's, because the child process reads ``ru_maxrss`` of its
    reaped children after the call and the worker is the only large one.
    """
    # NOTE: the kernel also counts the driver process's RSS at the moment it forks unshare
    # (about 33 MB here), so a worker smaller than that reads as the driver's size.

    def run(scratch: Path) -> Sample:
        del scratch  # the store lives outside, so its scratch-disk template is made once
        answer = run_child(
            [
                "apply-diff",
                "--root",
                str(store),
                "--layer-id",
                f"apply-{next(_layer_numbers)}",
                "--input",
                str(layer.path),
                *(["--prestart"] if prestart else []),
            ]
        )
        return Sample(answer["seconds"], answer["children_peak_rss_bytes"], answer)

    return Case(APPLY_DIFF if prestart else APPLY_DIFF_COLD, is_reference=False, run=run)


def keep_layer(layer: Layer, store: Path, layer_id: str) -> Path:
    """Apply ``layer`` once into ``store`` and keep it; return its ``layer.vhd``."""
    run_child(
        [
            "apply-diff",
            "--root",
            str(store),
            "--layer-id",
            layer_id,
            "--input",
            str(layer.path),
            "--keep",
        ]
    )
    return store / layer_id / "layer.vhd"


def convert_in_process(layer: Layer) -> Case:
    """Time lcow.layer.tar2ext4.convert_tar in a fresh Python process, around the call."""

    def run(scratch: Path) -> Sample:
        answer = run_child(
            ["convert", "--input", str(layer.path), "--output", str(scratch / "layer.vhd")]
        )
        return Sample(answer["seconds"], answer["self_peak_rss_bytes"], answer)

    return Case("convert_tar", is_reference=False, run=run)


def convert_command(layer: Layer) -> Case:
    """Time ``lcow tar2vhd`` from fork to exit, interpreter start-up included."""

    def run(scratch: Path) -> Sample:
        return run_command(
            [
                str(LCOW_COMMAND),
                "tar2vhd",
                "--no-progress",
                str(layer.path),
                str(scratch / "layer.vhd"),
            ],
            measure_rss=True,
        )

    return Case("lcow tar2vhd", is_reference=False, run=run)


def export(store: Path, layer_id: str, *, prestart: bool, to_file: bool = False) -> Case:
    """Time the Diff of a kept layer into a file on the tmpfs.

    By default the caller reads Driver.diff's stream and writes it to the file, as a
    Docker daemon consumes Diff. With ``to_file``, Driver.write_diff gets the file and the
    worker writes it, as ``lcow diff --output`` does. ``prestart`` is as for
    :func:`apply_diff`.
    """

    def run(scratch: Path) -> Sample:
        answer = run_child(
            [
                "export",
                "--root",
                str(store),
                "--layer-id",
                layer_id,
                "--output",
                str(scratch / "export.tar"),
                *(["--prestart"] if prestart else []),
                *(["--to-file"] if to_file else []),
            ]
        )
        return Sample(answer["seconds"], answer["children_peak_rss_bytes"], answer)

    if to_file:
        name = DIFF_TO_FILE
    elif prestart:
        name = DIFF
    else:
        name = DIFF_COLD
    return Case(name, is_reference=False, run=run)


def create_read_write(driver: Driver) -> Case:
    """Time Driver.create_read_write with the cached sandbox made; the removal is untimed."""

    def run(scratch: Path) -> Sample:
        del scratch
        layer_id = f"sandbox-{next(_layer_numbers)}"
        started = time.perf_counter()
        driver.create_read_write(layer_id)
        seconds = time.perf_counter() - started
        driver.remove(layer_id)
        return Sample(seconds)

    return Case("CreateReadWrite", is_reference=False, run=run)


def service_vm_start(manager: ServiceVMManager, name: str) -> Case:
    """Time a safe-mode service VM from ServiceVMManager.acquire to its terminate.

    With prestart, the spares are ready before the timer starts, as in a driver whose
    operations are further apart than a worker's start time, and acquire takes one. Without
    prestart, acquire starts the worker and waits for its hello. The end of the ``with``
    block stops the worker.
    """

    def run(scratch: Path) -> Sample:
        del scratch
        if manager.prestart:
            ready_spares(manager)
        started = time.perf_counter()
        with manager.acquire(f"start-{next(_layer_numbers)}"):
            pass
        return Sample(time.perf_counter() - started)

    return Case(name, is_reference=False, run=run)


def changes(driver: Driver, layer_id: str, parent: str) -> list[Case]:
    """Time Driver.changes and Driver.diff_size of ``layer_id`` against its parent.

    The driver's spares are ready before the timer starts, as for ApplyDiff: each call is
    short, so back to back they would wait for the spare that the call before started.
    """

    def run_changes(scratch: Path) -> Sample:
        del scratch
        ready_spares(driver.service_vms)
        started = time.perf_counter()
        listed = driver.changes(layer_id, parent)
        return Sample(time.perf_counter() - started, detail={"changes": len(listed)})

    def run_diff_size(scratch: Path) -> Sample:
        del scratch
        ready_spares(driver.service_vms)
        started = time.perf_counter()
        size = driver.diff_size(layer_id, parent)
        return Sample(time.perf_counter() - started, detail={"size_bytes": size})

    return [
        Case("Changes", is_reference=False, run=run_changes),
        Case("DiffSize", is_reference=False, run=run_diff_size),
    ]
