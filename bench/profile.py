"""``--profile [MEASUREMENT:]INPUT``: one lcow measurement under cProfile, top 20 entries.

MEASUREMENT is ``convert_tar`` (the default) or ``export``. Both run in this process, so
the profile covers the code that the service VM's worker runs for ApplyDiff
(:func:`lcow.layer.tar2ext4.convert_stream`) and for Diff (:func:`lcow.layer.export.export_tar`).
"""

import cProfile
import io
import os
import pstats
import time
from pathlib import Path
from typing import Final

from bench import inputs
from lcow import compiled
from lcow.layer.export import export_tar, open_image
from lcow.layer.tar2ext4 import convert_tar

MEASUREMENTS: Final = ("convert_tar", "export")
TOP_ENTRIES: Final = 20


def resolve(name: str) -> Path:
    """Find an input by file name among the corpus and generated layers, or as a path."""
    for path in inputs.corpus_paths() + inputs.generated_paths():
        if path.name == name:
            inputs.ensure_built(path)
            return path
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"input {name!r} is neither a benchmark layer nor a file")
    return path


def warm(path: Path) -> None:
    # Read the input once so that the profile does not time the disk.
    with path.open("rb") as source:
        while source.read(1 << 20):
            pass


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``[MEASUREMENT:]INPUT`` into the measurement (convert_tar by default) and input."""
    measurement, _, name = spec.rpartition(":")
    measurement = measurement or "convert_tar"
    if measurement not in MEASUREMENTS:
        raise ValueError(
            f"invalid measurement {spec!r}: use {' or '.join(MEASUREMENTS)}, a colon and an input"
        )
    return measurement, name


def profile(spec: str, folder: Path) -> str:
    """Run the measurement ``spec`` once under cProfile and return the report to print."""
    measurement, name = parse_spec(spec)
    layer = resolve(name)
    warm(layer)
    image = folder / "profile.vhd"
    profiler = cProfile.Profile()
    if measurement == "convert_tar":
        started = time.perf_counter()
        profiler.runcall(convert_tar, layer, image)
    else:
        convert_tar(layer, image)
        reader, fd = open_image(image)
        try:
            with (folder / "profile.tar").open("wb") as output:
                started = time.perf_counter()
                profiler.runcall(export_tar, reader, output)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats(pstats.SortKey.TIME).print_stats(TOP_ENTRIES)
    header = (
        f"{measurement} of {layer.name}: {seconds:.2f} s under cProfile "
        f"(top {TOP_ENTRIES} by internal time)\n"
    )
    if compiled.compiled_modules():
        # Calls between compiled functions never reach the profiler.
        header += (
            "lcow runs compiled by mypyc here, so its own functions hardly appear: use --perf, "
            "or profile a build without mypyc (delete src/lcow's mypyc extensions with "
            "find src/lcow -name '*.so' ! -name '_*' -delete, then run "
            "LCOW_MYPYC=0 pip install -e .)\n"
        )
    return header + text.getvalue()
