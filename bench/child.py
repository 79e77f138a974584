"""One lcow operation in a fresh process, timed from inside: ``python -m bench.child OP …``.

A fresh process per run keeps one run's memory out of the next run's peak RSS. The child
times only the operation itself, after the interpreter has started and lcow is imported,
and prints one JSON object on stdout:

- ``seconds``: wall time of the operation;
- ``self_peak_rss_bytes``: the peak RSS of this process since its exec (``VmHWM``);
- ``children_peak_rss_bytes``: ``ru_maxrss`` over the children this process reaped. For
  ApplyDiff and Diff that is the service VM's worker, the process that converts, because
  safe mode stops and reaps the worker before the call returns.
"""

import argparse
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.spares import ready_spares
from lcow.driver import Driver
from lcow.layer.tar2ext4 import convert_tar

KIB = 1024
PRESTART_HELP = "Time the call with the spare service VM started, as a running driver has it."


def _own_peak_rss() -> int:
    """Return this process's peak RSS since its exec, ``VmHWM`` in /proc/self/status.

    ``ru_maxrss`` would not do: the kernel keeps the peak RSS of the process that spawned
    this one across the exec, and the benchmark's own process grows while it counts the
    entries of large inputs.
    """
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    raise RuntimeError("VmHWM missing in /proc/self/status")


def _usage() -> dict[str, int]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * KIB
    return {"self_peak_rss_bytes": _own_peak_rss(), "children_peak_rss_bytes": children}


def _open_driver(arguments: argparse.Namespace) -> Driver:
    """Open the store with the default options; with --prestart, wait for the spare workers.

    A driver that has been idle for a worker's start time, or a daemon that started its
    spares at Init, finds them ready. The first operation of a new driver starts its own
    worker.
    """
    driver = Driver(arguments.root, [])
    if arguments.prestart:
        ready_spares(driver.service_vms)
    return driver


def _stop_spares(driver: Driver) -> None:
    """Stop the spares before this process exits, after its usage has been read.

    The call's end starts a spare. Left alone, it would go on starting after this process
    ends and take CPU time from the next case of the benchmark.
    """
    driver.service_vms.terminate_all()


def apply_diff(arguments: argparse.Namespace) -> dict[str, Any]:
    """Create a layer and time Driver.apply_diff of the tar into it."""
    driver = _open_driver(arguments)
    driver.create(arguments.layer_id)
    with Path(arguments.input).open("rb") as diff:
        started = time.perf_counter()
        size = driver.apply_diff(arguments.layer_id, None, diff)
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "size_bytes": size, **_usage()}
    if not arguments.keep:
        driver.remove(arguments.layer_id)
    _stop_spares(driver)
    return result


def convert(arguments: argparse.Namespace) -> dict[str, Any]:
    """Time convert_tar of the tar to a layer image, in this process."""
    started = time.perf_counter()
    stats = convert_tar(arguments.input, arguments.output)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "entries": stats.entries,
        "image_size_bytes": stats.image_size_bytes,
        **_usage(),
    }


def export(arguments: argparse.Namespace) -> dict[str, Any]:
    """Time the Diff of a layer into a file: its stream copied, or Driver.write_diff."""
    driver = _open_driver(arguments)
    with Path(arguments.output).open("wb") as output:
        started = time.perf_counter()
        if arguments.to_file:
            driver.write_diff(arguments.layer_id, None, output)
        else:
            stream = driver.diff(arguments.layer_id)
            try:
                shutil.copyfileobj(stream, output, 1 << 20)
            finally:
                stream.close()
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "tar_bytes": Path(arguments.output).stat().st_size, **_usage()}
    _stop_spares(driver)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser("apply-diff")
    apply.add_argument("--root", required=True)
    apply.add_argument("--layer-id", required=True)
    apply.add_argument("--input", required=True)
    apply.add_argument("--keep", action="store_true", help="Keep the layer after the run.")
    apply.add_argument("--prestart", action="store_true", help=PRESTART_HELP)
    apply.set_defaults(handler=apply_diff)

    conversion = commands.add_parser("convert")
    conversion.add_argument("--input", required=True)
    conversion.add_argument("--output", required=True)
    conversion.set_defaults(handler=convert)

    diff = commands.add_parser("export")
    diff.add_argument("--root", required=True)
    diff.add_argument("--layer-id", required=True)
    diff.add_argument("--output", required=True)
    diff.add_argument("--prestart", action="store_true", help=PRESTART_HELP)
    diff.add_argument("--to-file", action="store_true", help="Hand the file to Driver.write_diff.")
    diff.set_defaults(handler=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bench.child: %(levelname)s: %(message)s")
    arguments = _parser().parse_args(argv)
    result = arguments.handler(arguments)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
