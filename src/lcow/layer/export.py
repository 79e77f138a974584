"""Export a layer image, or a sandbox's ``upper/`` directory, as a tar layer.

The tar is what Docker's Diff returns: whiteouts as ``.wh.NAME`` entries, opaque
directories followed by a ``DIR/.wh..wh..opq`` entry, hard links as one regular entry and
link entries to its first name. PAX records carry what ustar cannot: long names and link
targets, xattrs (``SCHILY.xattr.*``), nanosecond mtimes, large sizes and owners. Entries
come depth first with names sorted bytewise, so one image always gives the same tar bytes.

overlayfs bookkeeping (``trusted.overlay.*`` xattrs) never leaves the image: the opaque
marker becomes its ``.wh..wh..opq`` entry and the rest describe the host's mount only.

The headers are the bytes that Python 3.11's ``tarfile`` writes in ``PAX_FORMAT`` with
``encoding="utf-8", errors="surrogateescape"``, built by the C extension
:mod:`lcow.layer._ustar` without tarfile's per-member objects.
Reference: POSIX.1-2008, pax "ustar Interchange Format" and "pax Extended Header".
"""

import dataclasses
import errno
import io
import os
import stat
from collections.abc import Iterator
from typing import IO, Final

from lcow import gcpause
from lcow.errors import CorruptInputError
from lcow.ext4 import format as fmt
from lcow.ext4.reader import BlockDevice, Ext4Reader, FileDevice, InodeInfo
from lcow.layer import _ustar

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX: Final = b"trusted.overlay."
OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
LOST_AND_FOUND: Final = b"lost+found"
INLINE_DATA_XATTR: Final = b"system.data"  # the tail of an inline file, not a user xattr

# --- ustar headers and PAX records -----------------------------------------------------------

BLOCK_SIZE_BYTES: Final = 512
# tarfile and GNU tar end an archive on a whole record of 20 blocks.
RECORD_SIZE_BYTES: Final = 20 * BLOCK_SIZE_BYTES
END_OF_ARCHIVE: Final = bytes(2 * BLOCK_SIZE_BYTES)

REGTYPE: Final = b"0"
LNKTYPE: Final = b"1"
SYMTYPE: Final = b"2"
CHRTYPE: Final = b"3"
BLKTYPE: Final = b"4"
DIRTYPE: Final = b"5"
FIFOTYPE: Final = b"6"

_PADDING: Final = bytes(BLOCK_SIZE_BYTES)
_COPY_BUFFER_BYTES: Final = 1 << 20
_ZEROS: Final = bytes(_COPY_BUFFER_BYTES)
# Files from this size up go from the image to the output by sendfile. A smaller file costs
# less as one pread into the output buffer than as a flush and a sendfile call.
_SENDFILE_MIN_BYTES: Final = 64 << 10
# sendfile rejects some outputs, such as a file opened with O_APPEND, so their data goes
# through pread and write.
_SENDFILE_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def _xattr_records(xattrs: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b"SCHILY.xattr." + name, value)
        for name, value in sorted(xattrs.items())
        if not name.startswith(OVERLAY_XATTR_PREFIX) and name != INLINE_DATA_XATTR
    ]


def _header(
    name: bytes,
    typeflag: bytes,
    inode: InodeInfo,
    *,
    size: int = 0,
    linkname: bytes = b"",
    device: tuple[int, int] | None = None,
    with_xattrs: bool = True,
) -> bytes:
    """Build an entry's header blocks: a PAX extended header when needed, then ustar.

    The records come in tarfile's order: mtime, xattrs by name, path, linkpath, uid, gid,
    size. A value out of its ustar field's range leaves 0 in the field.
    """
    records = _xattr_records(inode.xattrs) if with_xattrs and inode.xattrs else None
    return _ustar.header(
        name,
        typeflag,
        inode.mode,
        inode.uid,
        inode.gid,
        size,
        inode.mtime_ns,
        linkname,
        device,
        records,
    )


# --- the output stream -----------------------------------------------------------------------


def output_descriptor(output: IO[bytes]) -> int | None:
    """Return the file descriptor under ``output`` when writing to it directly is safe.

    That holds for a FileIO and for a BufferedWriter over one, flushed here first. Other
    objects (BytesIO, compressors) may transform or hold the bytes, so they get write().
    """
    if isinstance(output, io.BufferedWriter) and isinstance(output.raw, io.FileIO):
        output.flush()
        return output.raw.fileno()
    if isinstance(output, io.FileIO):
        return output.fileno()
    return None


class _TarStream:
    """The archive's bytes on their way to ``output``.

    Headers and small files gather in a buffer that leaves in writes of about 1 MiB. When
    the image and the output are both file descriptors, large file data goes from one to
    the other with sendfile and never enters Python.
    """

    def __init__(self, output: IO[bytes], device: BlockDevice) -> None:
        self._output = output
        self._device = device
        self._fd = output_descriptor(output)
        self._source_fd = (
            device.fd if self._fd is not None and isinstance(device, FileDevice) else None
        )
        self._buffer = bytearray()
        self._written = 0  # bytes that left the buffer

    @property
    def position(self) -> int:
        """The archive's length so far, buffered bytes included."""
        return self._written + len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        if len(self._buffer) >= _COPY_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._write_out(self._buffer)
            self._buffer = bytearray()

    def write_zeros(self, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length > 0:
            count = min(length, len(zeros))
            self.write(zeros[:count])
            length -= count

    def copy_from_device(self, offset: int, length: int, number: int) -> None:
        """Copy ``length`` bytes of inode ``number``'s data at device ``offset``."""
        if self._fd is not None and self._source_fd is not None and length >= _SENDFILE_MIN_BYTES:
            copied = self._sendfile(self._fd, self._source_fd, offset, length, number)
            offset += copied
            length -= copied

        while length > 0:
            count = min(length, _COPY_BUFFER_BYTES)
            chunk = self._device.pread(count, offset)
            if len(chunk) != count:
                raise _cut_short(number)
            if count >= _COPY_BUFFER_BYTES:
                # A whole buffer's worth skips the copy into the buffer.
                self.flush()
                self._write_out(chunk)
            else:
                self.write(chunk)
            offset += count
            length -= count

    def close(self) -> None:
        """Write the end-of-archive blocks, pad to a whole record and flush."""
        self.write(END_OF_ARCHIVE)
        self.write_zeros(-self.position % RECORD_SIZE_BYTES)
        self.flush()

    def _sendfile(self, fd: int, source_fd: int, offset: int, length: int, number: int) -> int:
        """Copy up to ``length`` bytes in the kernel; return how many it copied."""
        self.flush()
        copied = 0
        while copied < length:
            try:
                sent = os.sendfile(fd, source_fd, offset + copied, length - copied)
            except OSError as err:
                if err.errno not in _SENDFILE_UNSUPPORTED:
                    raise
                self._source_fd = None
                break
            if sent == 0:
                raise _cut_short(number)
            copied += sent
        self._written += copied
        return copied

    def _write_out(self, data: bytes | bytearray) -> None:
        self._written += len(data)
        if self._fd is None:
            # A file object's write() takes all of the data or raises.
            self._output.write(data)
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


def _cut_short(number: int) -> CorruptInputError:
    return CorruptInputError(
        f"corrupt ext4 filesystem: inode {number}'s data is cut short by the end of the disk"
    )


# --- entries ---------------------------------------------------------------------------------


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


def _write_file_data(stream: _TarStream, reader: Ext4Reader, inode: InodeInfo) -> None:
    """Write a regular file's content, holes as zeros, and pad it to a whole block."""
    size = inode.size
    position = 0
    runs = reader.data_runs(inode.number)
    if runs is None:
        for offset, data in reader.read_data(inode.number):
            if offset > position:
                stream.write_zeros(offset - position)
            stream.write(data)
            position = offset + len(data)
    else:
        for offset, device_offset, length in runs:
            if offset > position:
                stream.write_zeros(offset - position)
            stream.copy_from_device(device_offset, length, inode.number)
            position = offset + length
    if size > position:
        stream.write_zeros(size - position)
    if size % BLOCK_SIZE_BYTES:
        stream.write(_PADDING[: -size % BLOCK_SIZE_BYTES])


def _write_entry(
    stream: _TarStream,
    reader: Ext4Reader,
    path: bytes,
    inode: InodeInfo,
    first_names: dict[int, bytes],
) -> bool:
    """Write the entries for one file; returns False for a socket, which tar cannot hold."""
    kind = inode.mode & fmt.S_IFMT

    if kind == fmt.S_IFCHR and inode.rdev_major == 0 and inode.rdev_minor == 0:
        directory, _, base = path.rpartition(b"/")
        whiteout = (directory + b"/" if directory else b"") + WHITEOUT_PREFIX.encode() + base
        stream.write(_header(whiteout, REGTYPE, inode))
        return True

    if kind == fmt.S_IFDIR:
        stream.write(_header(path + b"/", DIRTYPE, inode))
        if inode.xattrs.get(OPAQUE_XATTR) == b"y":
            # The marker keeps the directory's owner, mode and mtime, and no xattrs.
            marker = path + b"/" + OPAQUE_MARKER.encode()
            stream.write(_header(marker, REGTYPE, inode, with_xattrs=False))
        return True

    if inode.links > 1:
        first = first_names.get(inode.number)
        if first is not None:
            stream.write(_header(path, LNKTYPE, inode, linkname=first))
            return True
        first_names[inode.number] = path

    if kind == fmt.S_IFREG:
        stream.write(_header(path, REGTYPE, inode, size=inode.size))
        _write_file_data(stream, reader, inode)
    elif kind == fmt.S_IFLNK:
        target = reader.read_symlink(inode.number)
        stream.write(_header(path, SYMTYPE, inode, linkname=target))
    elif kind in (fmt.S_IFCHR, fmt.S_IFBLK):
        typeflag = CHRTYPE if kind == fmt.S_IFCHR else BLKTYPE
        device = (inode.rdev_major, inode.rdev_minor)
        stream.write(_header(path, typeflag, inode, device=device))
    elif kind == fmt.S_IFIFO:
        stream.write(_header(path, FIFOTYPE, inode))
    else:
        # tar has no socket type; GNU tar and Docker skip sockets as well.
        return False
    return True


@dataclasses.dataclass(frozen=True)
class ExportStats:
    """The entry count and length of an exported tar."""

    entries: int
    tar_bytes: int


@gcpause.paused()
def export_tar(
    reader: Ext4Reader, output: IO[bytes], *, subdirectory: bytes | None = None
) -> ExportStats:
    """Write the tree of ``reader`` (or of ``subdirectory`` in it) to ``output`` as a tar.

    ``subdirectory`` is ``b"upper"`` for a sandbox.
    An image's own empty ``lost+found`` is left out. When ``output`` is a file object over a
    file descriptor (FileIO, or a BufferedWriter over one), it is flushed and the archive is
    written to the descriptor directly, so nothing waits in its buffer afterwards.
    """
    top = fmt.EXT4_ROOT_INO if subdirectory is None else reader.lookup(subdirectory)
    stream = _TarStream(output, reader.device)
    first_names: dict[int, bytes] = {}
    count = 0
    for path, inode in _entries(reader, top, skip_lost_and_found=subdirectory is None):
        if _write_entry(stream, reader, path, inode, first_names):
            count += 1
    stream.close()
    return ExportStats(entries=count, tar_bytes=stream.position)


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
