"""``--floor INPUT``: what the reading side alone costs, against ``tar -xf`` of the same tar.

These cases run interleaved, 5 rounds, in this process:

- ``tar -xf`` into an empty folder of the output folder, as in the suite;
- a bare libarchive loop through ctypes: ``archive_read_next_header`` and then
  ``archive_read_data_block`` until the end of each entry, nothing decoded or written;
- lcow's ``TarReader`` over a ``ReadAhead`` stream hashed with BLAKE3: every entry decoded
  and its data blocks read, nothing written;
- the same with every data block written by ``os.pwrite`` into one file, each file's data
  starting on a 4 KiB boundary as in an image: the copy that any converter makes, with no
  inode, directory or bitmap written;
- the shell route, ``tar -xf`` then ``mkfs.ext4 -d``, whose 0.4 times is the suite's
  goal for ApplyDiff.

For an image of INPUT it also times, against ``tar -c`` of the image loop-mounted
read-only:

- ``Ext4Reader.walk``: every inode read and verified, no tar written;
- the data copy: every regular file's data, listed beforehand in walk order, copied from
  the image into one file by export_tar's own output stream (sendfile from 64 KiB, pread
  into a 1 MiB buffer below), with no walk and no header;
- ``export_tar`` in this process: the walk, the headers and the data, with no service VM.

The walk plus the data copy is what export_tar costs before it writes a single header.
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
from bench.references import SHELL_ROUTE, LoopMount
from lcow.ext4 import format as fmt
from lcow.layer.export import _TarStream, export_tar, open_image  # the stream export_tar uses
from lcow.layer.tar2ext4 import convert_tar
from lcow.layer.tarstream import LayerStream, ReadAhead, TarReader, open_source
from lcow.layer.tarstream import _lib as libarchive  # the handle lcow itself calls

ROUNDS: Final = 5
FILE_BUFFER_BYTES: Final = 1 << 20
BLOCK_BYTES: Final = 4096
SHELL_ROUTE_GOAL: Final = 0.4  # ApplyDiff's goal as a multiple of the shell route


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


def _tar_reader_writing(path: Path, output: Path) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open_source(path) as source:
            ahead = ReadAhead(LayerStream(source, digest="blake3"))
            try:
                with TarReader(ahead) as reader:
                    start = 0
                    for entry in reader:
                        for offset, block in reader.data_blocks():
                            os.pwrite(fd, block, start + offset)
                        start += -(-entry.size // BLOCK_BYTES) * BLOCK_BYTES
            finally:
                ahead.close()
    finally:
        os.close(fd)


def _file_data_runs(image: Path) -> list[tuple[int, int, int]]:
    """List (inode number, device offset, length) of every file data run, in walk order.

    Regular files with inline data have no run and are left out.
    """
    reader, fd = open_image(image)
    try:
        runs = []
        for _path, inode in reader.walk(fmt.EXT4_ROOT_INO):
            if inode.file_type != fmt.S_IFREG:
                continue
            for _offset, device_offset, length in reader.data_runs(inode.number) or ():
                runs.append((inode.number, device_offset, length))
        return runs
    finally:
        os.close(fd)


def _copy_data(image: Path, runs: list[tuple[int, int, int]], output: Path) -> None:
    """Copy the data at ``runs`` of ``image`` into ``output`` through export_tar's stream."""
    reader, fd = open_image(image)
    try:
        with output.open("wb") as target:
            stream = _TarStream(target, reader.device)
            for number, device_offset, length in runs:
                stream.copy_from_device(device_offset, length, number)
            stream.flush()
    finally:
        os.close(fd)


def _shell_route(path: Path, folder: Path) -> None:
    tree = folder / "extracted"
    tree.mkdir()
    image = folder / "shell-route.ext4"
    subprocess.run(
        ["bash", "-c", SHELL_ROUTE, "shell-route", str(path), str(tree), str(image)], check=True
    )


def _tar_extract(path: Path, folder: Path) -> None:
    target = folder / "extracted"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(target)], check=True)


def _interleave(
    cases: dict[str, Callable[[], None]], cleanup: Callable[[], None]
) -> tuple[str, dict[str, float]]:
    """Run ``cases`` in rounds; return the report lines and each case's median."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
            cleanup()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    reference = next(iter(medians.values()))
    lines = []
    for name, values in samples.items():
        median = medians[name]
        lines.append(
            f"  {name}: median {median:.3f} s ({min(values):.3f} - {max(values):.3f} s), "
            f"{median / reference:.2f} x"
        )
    return "\n".join(lines), medians


def floor(name: str, folder: Path, *, shell_route: bool = True) -> str:
    """Time the reading sides of ApplyDiff and Diff on INPUT; return the report to print."""
    layer = resolve(name)
    extracted = folder / "extracted"
    written = folder / "data-written"
    shell_image = folder / "shell-route.ext4"

    def remove_outputs() -> None:
        shutil.rmtree(extracted, ignore_errors=True)
        written.unlink(missing_ok=True)
        shell_image.unlink(missing_ok=True)

    cases: dict[str, Callable[[], None]] = {
        "tar -xf": lambda: _tar_extract(layer, folder),
        "bare libarchive loop": lambda: _bare_loop(layer),
        "TarReader": lambda: _tar_reader(layer),
        "TarReader + data written": lambda: _tar_reader_writing(layer, written),
    }
    if shell_route:
        cases["tar -xf + mkfs.ext4 -d"] = lambda: _shell_route(layer, folder)
    reading, medians = _interleave(cases, remove_outputs)
    if shell_route:
        route = medians["tar -xf + mkfs.ext4 -d"]
        reading += (
            f"\n  {SHELL_ROUTE_GOAL} x tar -xf + mkfs.ext4 -d: {SHELL_ROUTE_GOAL * route:.3f} s"
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

        runs = _file_data_runs(image)

        def copy_data() -> None:
            _copy_data(image, runs, archive)

        def export_in_process() -> None:
            reader, fd = open_image(image)
            try:
                with archive.open("wb") as output:
                    export_tar(reader, output)
            finally:
                os.close(fd)

        walking, medians = _interleave(
            {
                "tar -c of the mounted image": tar_create,
                "Ext4Reader.walk": walk,
                "data copy": copy_data,
                "export_tar in this process": export_in_process,
            },
            lambda: archive.unlink(missing_ok=True),
        )
        before_headers = medians["Ext4Reader.walk"] + medians["data copy"]
        walking += (
            f"\n  walk + data copy: {before_headers:.3f} s, "
            f"{before_headers / medians['tar -c of the mounted image']:.2f} x"
        )
    image.unlink()
    return (
        f"reading side of {layer.name}, {ROUNDS} interleaved rounds, ratios to the first line:\n"
        f"{reading}\nexport floor of {layer.name}:\n{walking}\n"
    )
