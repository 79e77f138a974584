"""Benchmark inputs: the corpus layers and two generated layers, built once and cached.

The corpus is read from ``$LCOW_CORPUS/out/layers`` (default ``/var/cache/lcow-corpus``).
The generated layers live in ``$LCOW_BENCH_CACHE`` (default ``/var/cache/lcow-bench``),
outside the repository, and are built the first time a run selects them:

- ``many-small-files.tar`` (and ``.tar.gz``): a Python installation, that is the
  interpreter's standard library plus a virtual environment with large scientific packages
  installed by pip, copied under ``copy-1/``, ``copy-2/``, … until the tar has at least
  :data:`MANY_SMALL_MIN_ENTRIES` entries and :data:`MANY_SMALL_MIN_BYTES` bytes.
- ``huge-files.tar``: :data:`HUGE_FILE_COUNT` files of :data:`HUGE_FILE_BYTES` bytes of
  pseudo-random data from a fixed seed, so the data does not compress and every build
  writes the same bytes.

Each build writes ``<name>.build.json`` beside the layer with how it was made and how long
it took.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

CORPUS_LAYERS: Final = ("L1-base", "L2-umoci", "L2-buildah", "L3-node-modules", "L4-big-files")
PIP_PACKAGES: Final = ("numpy", "scipy", "pandas", "matplotlib", "sympy", "scikit-learn")
MANY_SMALL_MIN_ENTRIES: Final = 100_000
MANY_SMALL_MIN_BYTES: Final = 2 << 30  # of tar, estimated as file bytes plus 2 % for headers
GENERATED_NAMES: Final = ("many-small-files.tar", "huge-files.tar", "many-small-files.tar.gz")
HUGE_FILE_COUNT: Final = 3
HUGE_FILE_BYTES: Final = 720 << 20  # 3 x 720 MiB = 2.11 GiB
HUGE_SEED: Final = 20240601
RANDOM_CHUNK_BYTES: Final = 1 << 20
# GNU tar options that make the generated tars independent of the build time and host users.
TAR_REPRODUCIBLE: Final = (
    "--sort=name",
    "--owner=0",
    "--group=0",
    "--numeric-owner",
    "--mtime=2024-01-01 00:00:00Z",
    "--format=posix",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
)


@dataclass(frozen=True, slots=True)
class Layer:
    """One input tar and what it contains."""

    name: str  # file name, for example L3-node-modules.tar
    path: Path
    kind: str  # "many-small", "huge" or "mixed": selects the goals that apply
    gzip: bool
    entries: int
    file_bytes: int  # summed sizes of the regular files
    tar_bytes: int  # uncompressed tar stream length


def corpus_folder() -> Path:
    return Path(os.environ.get("LCOW_CORPUS", "/var/cache/lcow-corpus")) / "out" / "layers"


def cache_folder() -> Path:
    return Path(os.environ.get("LCOW_BENCH_CACHE", "/var/cache/lcow-bench"))


def _kind(name: str) -> str:
    # L3-node-modules is about 56,000 entries of 1.6 KB on average: a many-small-files input.
    if name.startswith(("L3-", "many-small")):
        return "many-small"
    if name.startswith("huge"):
        return "huge"
    return "mixed"


def describe(path: Path) -> Layer:
    """Count the entries and bytes of a layer, building it first when it is generated.

    The counts are cached in the benchmark's cache folder, keyed by path, size and mtime.
    """
    ensure_built(path)
    info = path.stat()
    key = f"{path}:{info.st_size}:{info.st_mtime_ns}"
    counts_file = cache_folder() / "counts.json"
    counts: dict[str, list[int]] = {}
    if counts_file.exists():
        counts = json.loads(counts_file.read_text())
    if key not in counts:
        entries = file_bytes = 0
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                entries += 1
                if member.isreg():
                    file_bytes += member.size
        tar_bytes = _uncompressed_size(path)
        counts[key] = [entries, file_bytes, tar_bytes]
        counts_file.parent.mkdir(parents=True, exist_ok=True)
        counts_file.write_text(json.dumps(counts, indent=1))
    entries, file_bytes, tar_bytes = counts[key]
    return Layer(
        name=path.name,
        path=path,
        kind=_kind(path.name),
        gzip=path.name.endswith(".gz"),
        entries=entries,
        file_bytes=file_bytes,
        tar_bytes=tar_bytes,
    )


def _uncompressed_size(path: Path) -> int:
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    # The gzip trailer stores the size modulo 2**32 only, so count the bytes instead.
    with subprocess.Popen(["gzip", "-dc", str(path)], stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        total = 0
        while chunk := process.stdout.read(1 << 20):
            total += len(chunk)
    if process.returncode != 0:
        raise RuntimeError(f"gzip -dc {path} failed with exit status {process.returncode}")
    return total


def corpus_paths() -> list[Path]:
    """Return the corpus layer files, plain then gzip, whether they exist or not."""
    folder = corpus_folder()
    paths = [folder / f"{name}.tar" for name in CORPUS_LAYERS]
    return paths + [folder / f"{name}.tar.gz" for name in CORPUS_LAYERS]


def generated_paths() -> list[Path]:
    """Return the generated layer files; :func:`ensure_built` builds a missing one."""
    return [cache_folder() / name for name in GENERATED_NAMES]


def ensure_built(path: Path) -> None:
    """Build ``path`` if it is a generated layer that is missing; raise if it is not."""
    if path.exists():
        return
    builders = {
        "many-small-files.tar": _build_many_small,
        "many-small-files.tar.gz": _build_gzip,
        "huge-files.tar": _build_huge,
    }
    if path.parent != cache_folder() or path.name not in builders:
        raise FileNotFoundError(
            f"layer {path} not found; build the corpus as docs/corpus.md says, or set "
            "LCOW_CORPUS to its folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        ensure_built(path.with_suffix(""))
    _timed_build(path, builders[path.name])


def _timed_build(destination: Path, build: Callable[[Path, Path], dict[str, object]]) -> None:
    print(f"building {destination} (once; it is cached)", file=sys.stderr, flush=True)
    started = time.monotonic()
    temporary = destination.with_name(destination.name + ".partial")
    record = build(destination, temporary)
    temporary.replace(destination)
    record["build_seconds"] = round(time.monotonic() - started, 1)
    record["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    destination.with_name(destination.name + ".build.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )
    print(f"built {destination} in {record['build_seconds']} s", file=sys.stderr, flush=True)


def _run(command: list[str], **options: object) -> None:
    subprocess.run(command, check=True, **options)  # type: ignore[call-overload]


def _tree_size(folder: Path) -> tuple[int, int]:
    """Return (entries, regular file bytes) below ``folder``, ``folder`` itself included."""
    entries, file_bytes = 1, 0
    for directory, subdirectories, files in os.walk(folder):
        entries += len(subdirectories) + len(files)
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                file_bytes += path.lstat().st_size
    return entries, file_bytes


def _build_many_small(destination: Path, temporary: Path) -> dict[str, object]:
    work = destination.with_name("many-small-files.work")
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    venv = base / "opt" / "venv"

    # A virtual environment from the system interpreter, with the packages from PyPI.
    _run(["/usr/bin/python3", "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "--quiet", "--upgrade", "pip"])
    _run([str(venv / "bin" / "pip"), "install", "--quiet", *PIP_PACKAGES])
    frozen = subprocess.run(
        [str(venv / "bin" / "pip"), "freeze"], check=True, capture_output=True, text=True
    ).stdout.split()

    # The interpreter's standard library completes the installed prefix.
    version = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(sys.version_info.minor)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stdlib = Path(f"/usr/lib/python3.{version}")
    _run(["cp", "-a", str(stdlib), str(base / "opt" / stdlib.name)])
    base_entries, base_bytes = _tree_size(base)

    # Real copies, not hard links, so the tar contains every file in full.
    stage = work / "stage"
    stage.mkdir()
    copies = 0
    while (
        copies * base_entries < MANY_SMALL_MIN_ENTRIES
        or copies * base_bytes * 1.02 < MANY_SMALL_MIN_BYTES
    ):
        copies += 1
        _run(["cp", "-a", str(base), str(stage / f"copy-{copies}")])
    _run(["tar", *TAR_REPRODUCIBLE, "-C", str(stage), "-cf", str(temporary), "."])
    shutil.rmtree(work)
    return {
        "construction": (
            "a virtual environment of /usr/bin/python3 with pip packages, plus a copy of "
            f"{stdlib}, copied {copies} times under copy-N/ and packed with GNU tar"
        ),
        "pip_packages": frozen,
        "copies": copies,
        "entries_per_copy": base_entries,
        "file_bytes_per_copy": base_bytes,
        "tar_bytes": temporary.stat().st_size,
    }


def _build_gzip(destination: Path, temporary: Path) -> dict[str, object]:
    source = destination.with_suffix("")  # many-small-files.tar
    with temporary.open("wb") as output:
        _run(["gzip", "-6", "-n", "-c", str(source)], stdout=output)
    return {"construction": f"gzip -6 -n of {source.name}", "bytes": temporary.stat().st_size}


def _build_huge(destination: Path, temporary: Path) -> dict[str, object]:
    work = destination.with_name("huge-files.work")
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    data.mkdir(parents=True)
    generator = random.Random(HUGE_SEED)  # noqa: S311 - test data, not secrets
    for number in range(1, HUGE_FILE_COUNT + 1):
        with (data / f"blob-{number}.bin").open("wb") as output:
            for _ in range(HUGE_FILE_BYTES // RANDOM_CHUNK_BYTES):
                output.write(generator.randbytes(RANDOM_CHUNK_BYTES))
    _run(["tar", *TAR_REPRODUCIBLE, "-C", str(work), "-cf", str(temporary), "."])
    shutil.rmtree(work)
    return {
        "construction": (
            f"{HUGE_FILE_COUNT} files of {HUGE_FILE_BYTES} bytes from Python's "
            f"random.Random({HUGE_SEED}).randbytes, packed with GNU tar"
        ),
        "tar_bytes": temporary.stat().st_size,
    }
