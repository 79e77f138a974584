"""Export a layer image, or a sandbox's ``upper/`` directory, as a tar layer.

The tar is what Docker's Diff returns: whiteouts as ``.wh.NAME`` entries, opaque
directories followed by a ``DIR/.wh..wh..opq`` entry, hard links as one regular entry and
link entries to its first name. PAX records carry what ustar cannot: long names and link
targets, xattrs (``SCHILY.xattr.*``), nanosecond mtimes, large sizes and owners. Entries
come depth first with names sorted bytewise, so one image always gives the same tar bytes.

overlayfs bookkeeping (``trusted.overlay.*`` xattrs) never leaves the image: the opaque
marker becomes its ``.wh..wh..opq`` entry and the rest describe the host's mount only.

The headers are the bytes that Python 3.11's ``tarfile`` writes in ``PAX_FORMAT`` with
``encoding="utf-8", errors="surrogateescape"``, built here without its per-member objects.
Reference: POSIX.1-2008, pax "ustar Interchange Format" and "pax Extended Header".
"""

import dataclasses
import errno
import io
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Final

from lcow import gcpause
from lcow.errors import CorruptInputError
from lcow.ext4 import format as fmt
from lcow.ext4.reader import BlockDevice, Ext4Reader, FileDevice, InodeInfo

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
XHDTYPE: Final = b"x"  # a PAX extended header for the entry that follows

USTAR_MAGIC: Final = b"ustar\x0000"  # magic "ustar\0", then version "00"
PAX_HEADER_NAME: Final = b"././@PaxHeader"  # the name tarfile (and star) gives PAX headers
NAME_FIELD_BYTES: Final = 100  # name and linkname
OCTAL_7_LIMIT: Final = 8**7  # mode, uid, gid, devmajor, devminor: 7 octal digits and a NUL
OCTAL_11_LIMIT: Final = 8**11  # size, mtime: 11 octal digits and a NUL

# The ustar header with mode, uid, gid, size and mtime as one 48-byte run of octal fields:
# name, (mode uid gid size mtime), chksum, typeflag, linkname, magic and version, uname,
# gname, devmajor, devminor, prefix, then 12 bytes of padding. Short values end in NULs.
_USTAR_HEADER: Final = struct.Struct("100s48s8s1s100s8s32s32s8s8s155s12x")
assert _USTAR_HEADER.size == BLOCK_SIZE_BYTES
_NUMERIC_FIELDS: Final = b"%07o\0%07o\0%07o\0%011o\0%011o\0"
# The checksum sums every header byte with the chksum field read as 8 spaces.
_CHECKSUM_BASE: Final = 8 * ord(" ") + sum(USTAR_MAGIC)
_BINARY_CHARSET_RECORD: Final = b"21 hdrcharset=BINARY\n"
# The low 16 bits of Adler-32 hold 1 plus the byte sum modulo 65521. 256 bytes sum to at
# most 65,280, so there the modulo never applies. zlib sums in C, where sum() steps an
# iterator and adds Python ints for every byte.
_ADLER_EXACT_BYTES: Final = 256

_PADDING: Final = bytes(BLOCK_SIZE_BYTES)
_COPY_BUFFER_BYTES: Final = 1 << 20
_ZEROS: Final = bytes(_COPY_BUFFER_BYTES)
# Files from this size up go from the image to the output by sendfile. A smaller file costs
# less as one pread into the output buffer than as a flush and a sendfile call.
_SENDFILE_MIN_BYTES: Final = 64 << 10
# sendfile rejects some outputs, such as a file opened with O_APPEND, so their data goes
# through pread and write.
_SENDFILE_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


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


def _byte_sum(data: bytes) -> int:
    """Return the sum of the bytes of ``data``, as the ustar checksum adds them."""
    if len(data) <= _ADLER_EXACT_BYTES:
        return (zlib.adler32(data) & 0xFFFF) - 1
    return sum(data)


def _ustar_header(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: bytes = b"",
    devminor: bytes = b"",
) -> bytes:
    """Pack one ustar header block; name and linkname must fit their 100-byte fields."""
    numbers = _NUMERIC_FIELDS % (mode, uid, gid, size, mtime)
    checksum = (
        _CHECKSUM_BASE
        + typeflag[0]
        + _byte_sum(name)
        + _byte_sum(numbers)
        + _byte_sum(linkname)
        + _byte_sum(devmajor)
        + _byte_sum(devminor)
    )
    return _USTAR_HEADER.pack(
        name,
        numbers,
        b"%06o\0 " % checksum,
        typeflag,
        linkname,
        USTAR_MAGIC,
        b"",
        b"",
        devmajor,
        devminor,
        b"",
    )


def _ustar_text(value: bytes) -> bytes:
    """Return the ustar field form of a name that a PAX record carries in full.

    tarfile writes the first 100 characters, each non-ASCII character (an undecodable byte
    counts as one) as "?".
    """
    return value.decode("utf-8", "surrogateescape").encode("ascii", "replace")[:NAME_FIELD_BYTES]


def _is_utf8(value: bytes) -> bool:
    if value.isascii():
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """Format "LENGTH KEYWORD=VALUE\\n", where LENGTH counts the whole record and itself."""
    length_without_digits = len(keyword) + len(value) + 3  # " ", "=" and "\n"
    length = 0
    while True:
        candidate = length_without_digits + len(str(length))
        if candidate == length:
            break
        length = candidate
    return b"%d %s=%s\n" % (length, keyword, value)


def _pax_header(records: list[tuple[bytes, bytes]]) -> bytes:
    """Build the extended header block and its padded records.

    Values are the raw bytes of the image. When one is not UTF-8, POSIX requires
    ``hdrcharset=BINARY`` ahead of the records, so readers do not decode them.
    """
    payload = bytearray()
    if not all(_is_utf8(value) for _, value in records):
        payload += _BINARY_CHARSET_RECORD
    for keyword, value in records:
        payload += _pax_record(keyword, value)
    header = _ustar_header(PAX_HEADER_NAME, XHDTYPE, 0, 0, 0, len(payload), 0)
    return header + payload + _PADDING[: -len(payload) % BLOCK_SIZE_BYTES]


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
    records: list[tuple[bytes, bytes]] = []

    seconds, nanoseconds = divmod(inode.mtime_ns, 1_000_000_000)
    mtime = seconds
    if nanoseconds or not 0 <= seconds < OCTAL_11_LIMIT:
        records.append((b"mtime", _pax_time(inode.mtime_ns).encode("ascii")))
        if not 0 <= seconds < OCTAL_11_LIMIT:
            mtime = 0

    if with_xattrs and inode.xattrs:
        records += _xattr_records(inode.xattrs)

    if not name.isascii() or len(name) > NAME_FIELD_BYTES:
        records.append((b"path", name))
        name = _ustar_text(name)
    if not linkname.isascii() or len(linkname) > NAME_FIELD_BYTES:
        records.append((b"linkpath", linkname))
        linkname = _ustar_text(linkname)

    uid, gid = inode.uid, inode.gid
    if uid >= OCTAL_7_LIMIT:
        records.append((b"uid", b"%d" % uid))
        uid = 0
    if gid >= OCTAL_7_LIMIT:
        records.append((b"gid", b"%d" % gid))
        gid = 0
    if size >= OCTAL_11_LIMIT:
        records.append((b"size", b"%d" % size))
        size = 0

    # ext4 device numbers have at most 12 major and 20 minor bits, below OCTAL_7_LIMIT.
    devmajor = devminor = b""
    if device is not None:
        devmajor, devminor = b"%07o\0" % device[0], b"%07o\0" % device[1]

    header = _ustar_header(
        name, typeflag, inode.mode & 0o7777, uid, gid, size, mtime, linkname, devmajor, devminor
    )
    if records:
        return _pax_header(records) + header
    return header


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
