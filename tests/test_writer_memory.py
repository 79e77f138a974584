"""Memory of a conversion grows with the number of entries only, never with file sizes."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from lcow.ext4 import writer as writer_module
from lcow.layer.tar2ext4 import convert_tar

# The benchmark's goal allows 400 bytes of peak RSS per entry on top of 64 MB.
MAX_BYTES_PER_ENTRY = 400
SMALL_LAYER_ENTRIES = 10_000
LARGE_LAYER_ENTRIES = 20_000


def write_many_files_tar(path: Path, count: int) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for index in range(count):
            info = tarfile.TarInfo(f"pkg{index // 500:03d}/lib/file-{index:06d}.js")
            info.mtime = 1_700_000_000 + index
            archive.addfile(info)


def held_at_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: int) -> int:
    """Convert a tar of ``entries`` empty files; return the bytes held at the writer's close."""
    source = tmp_path / f"many-{entries}.tar"
    write_many_files_tar(source, entries)
    held: list[int] = []
    original_close = writer_module.Ext4Writer.close

    def measuring_close(self: writer_module.Ext4Writer, content_identity: bytes) -> int:
        held.append(tracemalloc.get_traced_memory()[0])
        return original_close(self, content_identity)

    monkeypatch.setattr(writer_module.Ext4Writer, "close", measuring_close)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        stats = convert_tar(source, tmp_path / f"many-{entries}.vhd")
    finally:
        tracemalloc.stop()
        monkeypatch.setattr(writer_module.Ext4Writer, "close", original_close)
    assert stats.entries == entries
    return held[0] - baseline


def test_memory_per_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the memory allocated per entry, as the growth between two layer sizes.

    The growth leaves out what every conversion allocates whatever its size (the read-ahead
    chunks and the write buffers), which dividing one total by its entries would count.
    """
    held_at_close(tmp_path, monkeypatch, 100)  # imports and first-use caches, not counted
    small = held_at_close(tmp_path, monkeypatch, SMALL_LAYER_ENTRIES)
    large = held_at_close(tmp_path, monkeypatch, LARGE_LAYER_ENTRIES)

    per_entry = (large - small) / (LARGE_LAYER_ENTRIES - SMALL_LAYER_ENTRIES)
    assert per_entry > 0, f"{small} bytes held for the small layer, {large} for the large one"
    assert per_entry < MAX_BYTES_PER_ENTRY, f"{per_entry:.0f} bytes per entry"


# Streams one file of the given size through a pipe into the converter and prints the peak
# RSS in KiB, so that nothing of the file is ever held by the test itself.
_STREAM_ONE_FILE = textwrap.dedent(
    """
    import io, os, resource, sys, tarfile, threading
    from lcow.layer.tar2ext4 import convert_tar

    size = int(sys.argv[1])
    read_fd, write_fd = os.pipe()

    def produce():
        with os.fdopen(write_fd, "wb") as pipe:
            info = tarfile.TarInfo("big.bin")
            info.size = size
            pipe.write(info.tobuf(format=tarfile.GNU_FORMAT))
            chunk = b"\\xa5" * (1 << 20)
            left = size
            while left:
                pipe.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
            pipe.write(bytes(-size % 512 + 1024))

    threading.Thread(target=produce, daemon=True).start()
    with io.BufferedReader(io.FileIO(read_fd, "rb"), buffer_size=1 << 20) as source:
        convert_tar(source, sys.argv[2])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss_kib(size: int, output: Path) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", _STREAM_ONE_FILE, str(size), str(output)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(completed.stdout.strip())


def test_memory_independent_of_file_size(tmp_path: Path) -> None:
    small = peak_rss_kib(16 << 20, tmp_path / "small.vhd")
    large = peak_rss_kib(512 << 20, tmp_path / "large.vhd")

    assert (tmp_path / "large.vhd").stat().st_size > 512 << 20
    assert large - small < 16 << 10, f"peak RSS {small} KiB for 16 MiB, {large} KiB for 512 MiB"
