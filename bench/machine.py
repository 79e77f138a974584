"""A description of the machine and the output folder, printed with every result."""

import compileall
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lcow
from lcow import compiled


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _mount_of(folder: Path) -> str:
    return _first_line(
        ["findmnt", "--noheadings", "--target", str(folder), "-o", "TARGET,FSTYPE,SOURCE,OPTIONS"]
    )


def compile_lcow() -> str:
    """Write bytecode for lcow's modules where it is missing or stale; return what was done.

    pip writes bytecode when it installs a package, but an editable install run with
    PYTHONDONTWRITEBYTECODE set never gets any. Then every service VM worker compiles lcow
    from source as it starts, a cost that an installed lcow does not have.
    """
    package = Path(lcow.__file__).parent
    stale = compiled.stale_modules()
    if stale:
        raise OSError(
            f"lcow's compiled modules {', '.join(stale)} are older than their sources in "
            f"{package}: rebuild them with `pip install -e .`, or the run measures old code"
        )
    if not compileall.compile_dir(package, quiet=1):
        raise OSError(
            f"failed to write bytecode for lcow in {package}: make that folder writable, "
            "or install lcow with pip, which writes it"
        )
    return f"compiled in {package} before the run, as pip does at install"


def load_average() -> str:
    one_minute, five_minutes, fifteen_minutes = os.getloadavg()
    return f"{one_minute:.2f} {five_minutes:.2f} {fifteen_minutes:.2f}"


def describe(output_folder: Path, input_folders: list[Path], bytecode: str) -> dict[str, Any]:
    """Return the facts that a result depends on, as printable strings."""
    return {
        "cores (nproc)": _first_line(["nproc"]),
        "memory": f"{_memory_bytes() / (1 << 30):.1f} GiB",
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "lcow": lcow.__version__,
        "lcow bytecode": bytecode,
        "lcow build": compiled.describe(),
        "gnu tar": _first_line(["tar", "--version"]),
        "mke2fs": _first_line(["mke2fs", "-V"]),
        "output folder": f"{output_folder}: {_mount_of(output_folder)}",
        "input folders": "; ".join(f"{path}: {_mount_of(path)}" for path in input_folders),
        "load average at start": load_average(),
    }
