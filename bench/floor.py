"""``--floor INPUT``: what the reading side alone costs, against ``tar -xf`` of the same tar.

Three cases run interleaved, 5 rounds, in this process:

- ``tar -xf`` into an empty folder of the output folder, as in the suite;
- a bare libarchive loop through ctypes: ``archive_read_next_header`` and then
  ``archive_read_data_block`` until the end of each entry, nothing decoded or written;
- lcow's ``TarReader`` over a ``ReadAhead`` stream hashed with BLAKE3: every entry decoded
  and its data blocks read, nothing written.

For an image of INPUT it also times ``Ext4Reader.walk`` (every inode read and verified, no
tar written) against ``tar -c`` of the image loop-mounted read-only, the export's floor.
The conversion of INPUT that the walk needs is not timed.
"""

import ctypes
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench.profile import resolve
from bench.references import LoopMount
from lcow.ext4 import format as fmt
from lcow.layer.export import open_image
from lcow.layer.tar2ext4 import convert_tar
from lcow.layer.tarstream import LayerStream, ReadAhead, TarReader, open_source
from lcow.layer.tarstream import _lib as libarchive  # the handle lcow itself calls

ROUNDS: Final = 5
FILE_BUFFER_BYTES: Final = 1 << 20


def _bare_loop(path: Path) -> None:
    archive = libarchive.archive_read_new()
    try:
        libarchive.archive_read_support_format_tar(archive)
        open_filename = libarchive.archive_read_open_filename
        open_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        if open_filename(archive, bytes(path), FILE_BUFFER_BYTES) != 0:
            raise OSError(f"libarchive failed to open {path}")
        entry = ctypes.c_void_p()
        block, size, offset = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_int64()
        arguments = (ctypes.byref(block), ctypes.byref(size), ctypes.byref(offset))
        while libarchive.archive_read_next_header(archive, ctypes.byref(entry)) == 0:
            while libarchive.archive_read_data_block(archive, *arguments) == 0:
                pass
    finally:
        libarchive.archive_read_free(archive)


def _tar_reader(path: Path) -> None:
    with open_source(path) as source:
        ahead = ReadAhead(LayerStream(source, digest="blake3"))
        try:
            with TarReader(ahead) as reader:
                for _entry in reader:
                    for _block in reader.data_blocks():
                        pass
        finally:
            ahead.close()


def _tar_extract(path: Path, folder: Path) -> None:
    target = folder / "extracted"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(target)], check=True)


def _interleave(cases: dict[str, Callable[[], None]], cleanup: Callable[[], None]) -> str:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
            cleanup()
    reference = statistics.median(next(iter(samples.values())))
    lines = []
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(
            f"  {name}: median {median:.3f} s ({min(values):.3f} - {max(values):.3f} s), "
            f"{median / reference:.2f} x"
        )
    return "\n".join(lines)


def floor(name: str, folder: Path) -> str:
    """Time the reading sides of ApplyDiff and Diff on INPUT; return the report to print."""
    layer = resolve(name)
    extracted = folder / "extracted"

    def remove_extracted() -> None:
        shutil.rmtree(extracted, ignore_errors=True)

    reading = _interleave(
        {
            "tar -xf": lambda: _tar_extract(layer, folder),
            "bare libarchive loop": lambda: _bare_loop(layer),
            "TarReader": lambda: _tar_reader(layer),
        },
        remove_extracted,
    )

    image = folder / "floor.vhd"
    convert_tar(layer, image)
    with LoopMount(image, folder / "mnt") as mount_point:
        archive = folder / "floor.tar"

        def tar_create() -> None:
            subprocess.run(["tar", "-cf", str(archive), "-C", str(mount_point), "."], check=True)

        def walk() -> None:
            reader, fd = open_image(image)
            try:
                for _entry in reader.walk(fmt.EXT4_ROOT_INO):
                    pass
            finally:
                os.close(fd)

        walking = _interleave(
            {"tar -c of the mounted image": tar_create, "Ext4Reader.walk": walk},
            lambda: archive.unlink(missing_ok=True),
        )
    image.unlink()
    return (
        f"reading side of {layer.name}, {ROUNDS} interleaved rounds, ratios to the first line:\n"
        f"{reading}\nexport floor of {layer.name}:\n{walking}\n"
    )
