"""Export a layer image, or a sandbox's ``upper/`` directory, as a tar layer.

The tar is what Docker's Diff returns: whiteouts as ``.wh.NAME`` entries, opaque
directories followed by a ``DIR/.wh..wh..opq`` entry, hard links as one regular entry and
link entries to its first name. PAX records carry what ustar cannot: long names and link
targets, xattrs (``SCHILY.xattr.*``), nanosecond mtimes, large sizes and owners. Entries
come depth first with names sorted bytewise, so one image always gives the same tar bytes.

overlayfs bookkeeping (``trusted.overlay.*`` xattrs) never leaves the image: the opaque
marker becomes its ``.wh..wh..opq`` entry and the rest describe the host's mount only.
"""

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from typing import IO, Final

from lcow.ext4 import format as fmt
from lcow.ext4.reader import Ext4Reader, FileDevice, InodeInfo

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX: Final = b"trusted.overlay."
OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
LOST_AND_FOUND: Final = b"lost+found"
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"  # names are bytes; this keeps non-UTF-8 ones exact
_COPY_BUFFER_BYTES: Final = 1 << 20


class _DataReader(io.RawIOBase):
    """A file's logical content, holes read as zeros, for tarfile to copy from."""

    def __init__(self, reader: Ext4Reader, inode: InodeInfo) -> None:
        self._chunks = reader.read_data(inode.number)
        self._size = inode.size
        self._position = 0
        self._pending: tuple[int, memoryview] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._position >= self._size or not len(view):
            return 0
        if self._pending is None:
            chunk = next(self._chunks, None)
            if chunk is not None:
                self._pending = (chunk[0], memoryview(chunk[1]))
        count = min(len(view), self._size - self._position)
        if self._pending is None or self._pending[0] > self._position:
            # A hole up to the next data, or to the end of the file.
            if self._pending is not None:
                count = min(count, self._pending[0] - self._position)
            view[:count] = bytes(count)
        else:
            start, data = self._pending
            skip = self._position - start
            count = min(count, len(data) - skip)
            view[:count] = data[skip : skip + count]
            if skip + count == len(data):
                self._pending = None
        self._position += count
        return count


def _name(path: bytes) -> str:
    return path.decode(_ENCODING, _ERRORS)


def _pax_time(time_ns: int) -> str:
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    if not nanoseconds:
        return str(seconds)
    if seconds < 0 and nanoseconds:
        # PAX times are decimal: -1.5 means 1.5 s before the epoch.
        whole, fraction = seconds + 1, 1_000_000_000 - nanoseconds
        return (
            f"-{abs(whole)}.{fraction:09d}".rstrip("0")
            if whole == 0
            else f"{whole}.{fraction:09d}".rstrip("0")
        )
    return f"{seconds}.{nanoseconds:09d}".rstrip("0")


def _header(path: bytes, inode: InodeInfo, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(_name(path))
    info.type = kind
    info.mode = inode.mode & 0o7777
    info.uid = inode.uid
    info.gid = inode.gid
    info.uname = ""
    info.gname = ""
    seconds = inode.mtime_ns // 1_000_000_000
    info.mtime = seconds if 0 <= seconds < 8**11 else 0
    pax: dict[str, str] = {}
    if inode.mtime_ns % 1_000_000_000 or not 0 <= seconds < 8**11:
        pax["mtime"] = _pax_time(inode.mtime_ns)
    for name, value in sorted(inode.xattrs.items()):
        if name.startswith(OVERLAY_XATTR_PREFIX) or name == b"system.data":
            continue
        pax["SCHILY.xattr." + name.decode(_ENCODING, _ERRORS)] = value.decode(_ENCODING, _ERRORS)
    info.pax_headers = pax
    return info


def _entries(
    reader: Ext4Reader, top: int, skip_lost_and_found: bool
) -> Iterator[tuple[bytes, InodeInfo]]:
    for path, inode in reader.walk(top):
        if skip_lost_and_found and (
            path == LOST_AND_FOUND or path.startswith(LOST_AND_FOUND + b"/")
        ):
            if (
                path == LOST_AND_FOUND and next(reader.iterdir(inode.number), None) is not None
            ) or path != LOST_AND_FOUND:
                yield path, inode
            continue
        yield path, inode


def export_tar(reader: Ext4Reader, output: IO[bytes], *, subdirectory: bytes | None = None) -> int:
    """Write the tree of ``reader`` (or of ``subdirectory`` in it) to ``output`` as a tar.

    ``subdirectory`` is ``b"upper"`` for a sandbox. Returns the number of entries written.
    An image's own empty ``lost+found`` is left out.
    """
    top = fmt.EXT4_ROOT_INO if subdirectory is None else reader.lookup(subdirectory)
    first_names: dict[int, bytes] = {}
    count = 0
    with tarfile.open(
        fileobj=output, mode="w|", format=tarfile.PAX_FORMAT, encoding=_ENCODING, errors=_ERRORS
    ) as archive:
        for path, inode in _entries(reader, top, skip_lost_and_found=subdirectory is None):
            count += 1
            kind = inode.file_type
            directory, _, base = path.rpartition(b"/")
            if kind == fmt.S_IFCHR and inode.rdev_major == 0 and inode.rdev_minor == 0:
                whiteout = (directory + b"/" if directory else b"") + b".wh." + base
                info = _header(whiteout, inode, tarfile.REGTYPE)
                archive.addfile(info)
                continue

            if kind == fmt.S_IFDIR:
                info = _header(path, inode, tarfile.DIRTYPE)
                archive.addfile(info)
                if inode.xattrs.get(OPAQUE_XATTR) == b"y":
                    marker = _header(path + b"/" + OPAQUE_MARKER.encode(), inode, tarfile.REGTYPE)
                    marker.pax_headers = {
                        k: v for k, v in marker.pax_headers.items() if k == "mtime"
                    }
                    archive.addfile(marker)
                continue

            if inode.links > 1:
                first = first_names.get(inode.number)
                if first is not None:
                    info = _header(path, inode, tarfile.LNKTYPE)
                    info.linkname = _name(first)
                    archive.addfile(info)
                    continue
                first_names[inode.number] = path

            if kind == fmt.S_IFREG:
                info = _header(path, inode, tarfile.REGTYPE)
                info.size = inode.size
                archive.addfile(
                    info, io.BufferedReader(_DataReader(reader, inode), _COPY_BUFFER_BYTES)
                )
            elif kind == fmt.S_IFLNK:
                info = _header(path, inode, tarfile.SYMTYPE)
                info.linkname = _name(reader.read_symlink(inode.number))
                archive.addfile(info)
            elif kind in (fmt.S_IFCHR, fmt.S_IFBLK):
                info = _header(
                    path, inode, tarfile.CHRTYPE if kind == fmt.S_IFCHR else tarfile.BLKTYPE
                )
                info.devmajor = inode.rdev_major
                info.devminor = inode.rdev_minor
                archive.addfile(info)
            elif kind == fmt.S_IFIFO:
                archive.addfile(_header(path, inode, tarfile.FIFOTYPE))
            elif kind == fmt.S_IFSOCK:
                # tar has no socket type; GNU tar and Docker skip sockets as well.
                count -= 1
    return count


def open_image(path: str | os.PathLike[str]) -> tuple[Ext4Reader, int]:
    """Open a layer image (raw ext4 or with a VHD footer) for reading; returns (reader, fd)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        return Ext4Reader(FileDevice(fd), size), fd
    except BaseException:
        os.close(fd)
        raise
