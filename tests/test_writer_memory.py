"""Memory of a conversion grows with the number of entries only, never with file sizes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

from lcow.ext4.writer import Ext4Writer, Metadata

# The benchmark's goal allows 400 bytes of peak RSS per entry on top of 64 MB.
MAX_BYTES_PER_ENTRY = 400
SMALL_LAYER_ENTRIES = 10_000
LARGE_LAYER_ENTRIES = 20_000


def allocated_before_close(tmp_path: Path, entries: int) -> int:
    """Add ``entries`` empty files to a writer and return the bytes it keeps before close().

    The writer is driven directly, not through convert_tar: the test reads what the writer
    holds just before close(), and a compiled writer's close() cannot be wrapped from a test.
    """
    meta = Metadata(0o644, 0, 0, 1_700_000_000 * 10**9, 0, 0, 0)
    with (tmp_path / f"many-{entries}.ext4").open("wb") as output:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            writer = Ext4Writer(output.fileno(), implicit_meta=meta)
            for index in range(entries):
                path = [b"pkg%03d" % (index // 500), b"lib", b"file-%06d.js" % index]
                writer.add_regular_file(path, meta, 0, iter(()))
            allocated = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        writer.close(bytes(32))
    return allocated


def test_memory_per_entry(tmp_path: Path) -> None:
    """Check the memory allocated per entry, as the growth between two layer sizes.

    The growth leaves out what every writer allocates whatever its size (the write
    buffers), which dividing one total by its entries would count.
    """
    allocated_before_close(tmp_path, 100)  # first-use caches, not counted
    small = allocated_before_close(tmp_path, SMALL_LAYER_ENTRIES)
    large = allocated_before_close(tmp_path, LARGE_LAYER_ENTRIES)

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
