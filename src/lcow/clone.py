"""Copy disk files in time that depends on their data, not on their virtual size.

A reflink (FICLONE) shares the blocks where the filesystem supports it (XFS, btrfs). Other
filesystems get a sparse-aware copy: only the ranges SEEK_DATA finds are copied, with
copy_file_range, and the holes stay holes.
"""

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

FICLONE: Final = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_COPY_CHUNK_BYTES: Final = 64 << 20


def _reflink(source_fd: int, destination_fd: int) -> bool:
    try:
        fcntl.ioctl(destination_fd, FICLONE, source_fd)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def _copy_chunk(source_fd: int, destination_fd: int, position: int, length: int) -> int:
    """Copy up to ``length`` bytes at ``position``; return how many were copied."""
    try:
        copied = os.copy_file_range(source_fd, destination_fd, length, position, position)
    except OSError as err:
        # Linux 5.19 and later refuse copies between different filesystem types (EXDEV).
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        data = os.pread(source_fd, min(length, 1 << 20), position)
        copied = len(data)
        view = memoryview(data)
        while view:
            written = os.pwrite(destination_fd, view, position + copied - len(view))
            view = view[written:]
    if copied == 0:
        raise OSError(errno.EIO, f"the copy stopped at byte {position}")
    return copied


def set_size(fd: int, size_bytes: int) -> None:
    """Give the file at ``fd`` the size ``size_bytes``, as ftruncate does.

    A block device cannot change size: for one, check that it holds ``size_bytes`` and leave
    it as it is. Inside the qemu backend's utility VM every output is such a disk.
    """
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        os.ftruncate(fd, size_bytes)
        return
    capacity_bytes = os.lseek(fd, 0, os.SEEK_END)
    if capacity_bytes < size_bytes:
        raise OSError(
            errno.ENOSPC,
            f"the output disk holds {capacity_bytes} bytes, {size_bytes} bytes are needed",
        )


def copy_data_ranges(source_fd: int, destination_fd: int, size: int) -> None:
    """Copy what SEEK_DATA finds in the first ``size`` bytes; leave the holes as holes."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(source_fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        hole = os.lseek(source_fd, data, os.SEEK_HOLE)
        position = data
        while position < hole:
            position += _copy_chunk(
                source_fd, destination_fd, position, min(_COPY_CHUNK_BYTES, hole - position)
            )
        offset = hole
    set_size(destination_fd, size)


def clone_file(source: Path, destination: Path, *, mode: int = 0o600) -> None:
    """Copy ``source`` to ``destination`` through a temporary name; the result is complete."""
    source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    # A unique temporary name: several processes may clone to the same folder at once.
    destination_fd, temporary_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".clone.tmp", dir=destination.parent
    )
    temporary = Path(temporary_name)
    os.fchmod(destination_fd, mode)
    # The lock tells the store's Init that a live process still writes this file.
    fcntl.flock(destination_fd, fcntl.LOCK_EX)
    try:
        try:
            if not _reflink(source_fd, destination_fd):
                copy_data_ranges(source_fd, destination_fd, os.fstat(source_fd).st_size)
            os.fsync(destination_fd)
        finally:
            os.close(destination_fd)
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    finally:
        os.close(source_fd)
