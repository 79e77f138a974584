"""Interleaved timing: every case of a group runs once per round, rounds repeat.

Running the reference and lcow alternately (A B A B …) spreads the effects of other load on
the machine, of page-cache state and of CPU frequency over both sides instead of letting
them fall on one.
"""

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lcow.errors import LcowError

KIB: int = 1024
GNU_TIME: str = "/usr/bin/time"  # Debian package time
STOP_TIMEOUT_S: float = 10.0  # for the members of an interrupted command's session to exit
# Exceptions of a failing case: lcow's errors, a command's exit status, the file system.
CASE_ERRORS = (LcowError, OSError, RuntimeError, subprocess.SubprocessError, ValueError)


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run: wall time, and the peak RSS of the process that did the work."""

    seconds: float
    peak_rss_bytes: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Case:
    """One thing to time in a group; ``run`` gets an empty scratch folder of its own."""

    name: str
    is_reference: bool
    run: Callable[[Path], Sample]


@dataclass(slots=True)
class CaseResult:
    """Every sample of one case, the warm-up excluded, or the error that stopped it."""

    name: str
    is_reference: bool
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(sample.seconds for sample in self.samples)

    @property
    def min_s(self) -> float:
        return min(sample.seconds for sample in self.samples)

    @property
    def max_s(self) -> float:
        return max(sample.seconds for sample in self.samples)

    @property
    def peak_rss_bytes(self) -> int | None:
        """The largest peak RSS over the runs, or None when it was not measured."""
        values = [s.peak_rss_bytes for s in self.samples if s.peak_rss_bytes is not None]
        return max(values) if values else None


def run_interleaved(
    cases: Sequence[Case], runs: int, scratch: Path, *, warmup_rounds: int = 1
) -> list[CaseResult]:
    """Run ``warmup_rounds`` discarded rounds, then ``runs`` timed rounds of every case.

    A case that raises is reported with its error and left out of later rounds; the other
    cases go on.
    """
    results = [CaseResult(case.name, case.is_reference) for case in cases]
    for round_number in range(warmup_rounds + runs):
        timed = round_number >= warmup_rounds
        for case, result in zip(cases, results, strict=True):
            if result.error is not None:
                continue
            folder = scratch / f"run-{round_number}-{len(result.samples)}"
            folder.mkdir(parents=True)
            try:
                sample = case.run(folder)
            except CASE_ERRORS as err:
                result.error = f"{type(err).__name__}: {err}"
                print(f"  {case.name}: failed: {result.error}", file=sys.stderr, flush=True)
                continue
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if timed:
                result.samples.append(sample)
            label = "warm-up" if not timed else f"run {round_number - warmup_rounds + 1}"
            print(f"  {label}: {case.name} {sample.seconds:.3f} s", file=sys.stderr, flush=True)
    return results


def stop_process_group(process: "subprocess.Popen[Any]") -> None:
    """Kill the session that ``process`` leads and wait until every member has exited.

    The output folder can be unmounted only when no process has a file open in it, and the
    members (a shell's children, a service VM worker) are not children of this process.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def run_command(
    command: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    cwd: Path | None = None,
    measure_rss: bool = False,
) -> Sample:
    """Run ``command`` and time it from fork to reap; raise when it fails.

    With ``measure_rss`` the command runs under GNU time, which reports the peak RSS of the
    command alone. ``ru_maxrss`` of a child that this process forks would also count this
    process's own RSS at the fork, because the kernel keeps the larger of the two.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        prefix: list[str] = []
        if measure_rss:
            prefix = [GNU_TIME, "--format=%M", f"--output={rss_file.name}"]
        with tempfile.TemporaryFile() as errors:
            # A file, not a pipe, so a command that writes much to stderr cannot block on it.
            started = time.perf_counter()
            # A session of its own lets an interrupted run stop the command's children too.
            process = subprocess.Popen(
                [*prefix, *command],
                stdout=stdout,
                stderr=errors,
                cwd=cwd,
                start_new_session=True,
            )
            try:
                _, status, _ = os.wait4(process.pid, 0)
            except BaseException:
                # Interrupted (SIGTERM, Ctrl-C): stop the command so its outputs can be removed.
                stop_process_group(process)
                raise
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            errors.seek(0)
            error_text = errors.read().decode(errors="replace").strip()
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed with exit status {process.returncode}: {error_text}"
            )
        peak_kib = Path(rss_file.name).read_text().strip() if prefix else ""
    return Sample(seconds, int(peak_kib) * KIB if peak_kib else None)
