"""Open a disk file for reading, whatever its container: raw, fixed VHD or VHDX.

A fixed VHD is the raw disk followed by a 512-byte footer, so only the size changes. A VHDX
is read through :class:`lcow.vhdx.VhdxFile`, which maps its payload blocks.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from lcow import vhd, vhdx
from lcow.errors import LcowError
from lcow.ext4.reader import BlockDevice, FileDevice

VHDX_SIGNATURE: Final = b"vhdxfile"
VHD_COOKIE: Final = b"conectix"


@dataclass(frozen=True, slots=True)
class OpenDisk:
    """A readable disk: its device, its usable size in bytes and its container format."""

    device: BlockDevice
    size_bytes: int
    container: str  # "raw", "vhd" or "vhdx"


class _VhdxDevice:
    def __init__(self, disk: vhdx.VhdxFile) -> None:
        self._disk = disk

    def pread(self, length: int, offset: int) -> bytes:
        length = max(0, min(length, self._disk.virtual_size - offset))
        return self._disk.read(offset, length)


def _has_vhd_footer(fd: int, size: int) -> bool:
    if size < vhd.FOOTER_SIZE_BYTES:
        return False
    footer = os.pread(fd, vhd.FOOTER_SIZE_BYTES, size - vhd.FOOTER_SIZE_BYTES)
    if not footer.startswith(VHD_COOKIE):
        return False
    try:
        vhd.parse_footer(footer)
    except LcowError:
        return False
    return True


@contextlib.contextmanager
def open_disk(path: str | os.PathLike[str]) -> Iterator[OpenDisk]:
    """Open ``path`` read-only and yield the disk inside its container."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if os.pread(fd, len(VHDX_SIGNATURE), 0) == VHDX_SIGNATURE:
            with vhdx.VhdxFile(path) as disk:
                yield OpenDisk(_VhdxDevice(disk), disk.virtual_size, "vhdx")
            return
        if _has_vhd_footer(fd, size):
            yield OpenDisk(FileDevice(fd), size - vhd.FOOTER_SIZE_BYTES, "vhd")
            return
        yield OpenDisk(FileDevice(fd), size, "raw")
    finally:
        os.close(fd)
