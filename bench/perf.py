"""``--perf [MEASUREMENT:]INPUT``: one lcow measurement sampled by Linux perf.

cProfile cannot look inside the modules that mypyc compiled: a compiled function that calls
another compiled function never passes through the interpreter, so ``--profile`` attributes
all of a conversion to convert_tar. perf samples the process at the machine level instead: the
compiled functions (``CPyDef_...`` in ``lcow/native__mypyc``), CPython's own functions,
libarchive, ctypes and the kernel. The measurement runs in a child process, alone under
``perf record``. For ``export`` the image is made beforehand, outside the samples. The
samples include the child's start and imports, which the printed time leaves out.
"""

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from bench.profile import parse_spec, resolve, warm
from lcow.layer.tar2ext4 import convert_tar

SAMPLES_PER_SECOND: Final = 999
TOP_SYMBOLS: Final = 30
TOP_LIBRARIES: Final = 12

# The child: one measurement, timed from its start to its end, for the report's header.
_MEASURE = """
import os, sys, time
from lcow.layer.export import export_tar, open_image
from lcow.layer.tar2ext4 import convert_tar

measurement, layer, image, archive = sys.argv[1:]
started = time.perf_counter()
if measurement == "convert_tar":
    convert_tar(layer, image)
else:
    reader, fd = open_image(image)
    with open(archive, "wb") as output:
        export_tar(reader, output)
    os.close(fd)
print(f"{time.perf_counter() - started:.2f}")
"""


def _report(data: Path, sort: str, top: int) -> str:
    completed = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    )
    # The rows come sorted by share. The padding and the empty columns after the symbol go.
    rows = [
        "  ".join(line.split()).removesuffix("  -  -")
        for line in completed.stdout.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return "\n".join(rows[:top])


def perf(spec: str, folder: Path) -> str:
    """Sample the measurement ``spec`` with perf and return the report to print."""
    if shutil.which("perf") is None:
        raise OSError("perf not found on PATH: install Debian's linux-perf")
    measurement, name = parse_spec(spec)
    layer = resolve(name)
    warm(layer)
    image = folder / "perf.vhd"
    if measurement == "export":
        convert_tar(layer, image)

    data = folder / "perf.data"
    completed = subprocess.run(
        [
            *("perf", "record", "-q", "-F", str(SAMPLES_PER_SECOND), "-o", str(data), "--"),
            *(sys.executable, "-c", _MEASURE, measurement, str(layer), str(image)),
            str(folder / "perf.tar"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        # perf's own message, such as a kernel.perf_event_paranoid refusal, or the child's
        # traceback.
        raise OSError(
            f"perf record of {measurement} failed with exit status {completed.returncode}: "
            f"{completed.stderr.strip()[-2000:]}"
        )
    seconds = completed.stdout.strip().splitlines()[-1]
    return (
        f"{measurement} of {layer.name}: {seconds} s under perf record "
        f"({SAMPLES_PER_SECOND} samples per second, all threads, the child's start "
        "included)\n\n"
        f"share of samples by library:\n{_report(data, 'dso', TOP_LIBRARIES)}\n\n"
        f"top {TOP_SYMBOLS} functions:\n{_report(data, 'dso,symbol', TOP_SYMBOLS)}\n"
    )
