"""Read tar layers through libarchive: entries with raw byte names, ns times, xattrs, holes.

libarchive parses every tar dialect a registry serves (ustar, GNU with long names and old
sparse files, PAX with all sparse versions, base-256 numbers). The libarchive-c package loads
it; the few entry fields that package does not expose (extended attributes, nanosecond times
as integers, data blocks with their offsets) are read here through ctypes.

Decompression happens before libarchive sees the bytes: gzip through ISA-L (several times
faster than zlib, in a thread of its own), zstd through the zstandard package.
"""

import ctypes
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

import libarchive.ffi as libarchive_ffi
import zstandard
from isal import igzip_threaded

from lcow.errors import CorruptInputError

log = logging.getLogger(__name__)

READ_CHUNK_BYTES: Final = 1 << 20
GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"

ARCHIVE_EOF: Final = 1
ARCHIVE_OK: Final = 0
ARCHIVE_WARN: Final = -20

S_IFMT: Final = 0o170000
END_MARKER_BYTES: Final = 1024  # a tar ends with two 512-byte blocks of zeros


def _load_libarchive() -> ctypes.CDLL:
    # A handle of our own, so our argtypes never clash with libarchive-c's declarations.
    lib = ctypes.CDLL(libarchive_ffi.libarchive_path)
    p, i, i64, sz, cp, lng = (
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_long,
    )
    declarations: dict[str, tuple[list[type], type | None]] = {
        "archive_read_new": ([], p),
        "archive_read_support_format_tar": ([p], i),
        "archive_read_open": ([p, p, p, libarchive_ffi.READ_CALLBACK, p], i),
        "archive_read_next_header": ([p, ctypes.POINTER(p)], i),
        "archive_read_data_block": (
            [p, ctypes.POINTER(p), ctypes.POINTER(sz), ctypes.POINTER(i64)],
            i,
        ),
        "archive_read_data_skip": ([p], i),
        "archive_read_free": ([p], i),
        "archive_error_string": ([p], cp),
        "archive_read_header_position": ([p], i64),
        "archive_filter_bytes": ([p, i], i64),
        "archive_entry_pathname": ([p], cp),
        "archive_entry_hardlink": ([p], cp),
        "archive_entry_symlink": ([p], cp),
        "archive_entry_filetype": ([p], ctypes.c_uint),
        "archive_entry_mode": ([p], ctypes.c_uint),
        "archive_entry_uid": ([p], i64),
        "archive_entry_gid": ([p], i64),
        "archive_entry_size": ([p], i64),
        "archive_entry_size_is_set": ([p], i),
        "archive_entry_rdevmajor": ([p], ctypes.c_uint),
        "archive_entry_rdevminor": ([p], ctypes.c_uint),
        "archive_entry_mtime": ([p], i64),
        "archive_entry_mtime_nsec": ([p], lng),
        "archive_entry_atime": ([p], i64),
        "archive_entry_atime_nsec": ([p], lng),
        "archive_entry_atime_is_set": ([p], i),
        "archive_entry_ctime": ([p], i64),
        "archive_entry_ctime_nsec": ([p], lng),
        "archive_entry_ctime_is_set": ([p], i),
        "archive_entry_birthtime": ([p], i64),
        "archive_entry_birthtime_nsec": ([p], lng),
        "archive_entry_birthtime_is_set": ([p], i),
        "archive_entry_xattr_reset": ([p], i),
        "archive_entry_xattr_next": (
            [p, ctypes.POINTER(cp), ctypes.POINTER(p), ctypes.POINTER(sz)],
            i,
        ),
    }
    for name, (argtypes, restype) in declarations.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


_lib: Final = _load_libarchive()


@dataclass(slots=True)
class TarEntry:
    """One tar entry as libarchive decoded it; names and link targets are raw bytes."""

    path: bytes
    file_type: int  # S_IF* bits; 0 for a hard link
    permissions: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None
    ctime_ns: int | None
    birthtime_ns: int | None
    hardlink: bytes | None
    symlink: bytes | None
    rdev_major: int
    rdev_minor: int
    header_offset: int
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)


def _time_ns(seconds: int, nanoseconds: int) -> int:
    if seconds < 0 and nanoseconds:
        # libarchive 3.6 parses a PAX time such as "-1.25" into -1 s and +0.25 s, applying
        # the sign to the whole seconds only; the value meant is -1.25 s.
        # NOTE: for "-0.25" the sign is lost entirely (0 s and +0.25 s), so a time within
        # the second before the epoch reads as the same offset after it.
        return seconds * 1_000_000_000 - nanoseconds
    return seconds * 1_000_000_000 + nanoseconds


class LayerStream:
    """Pull the (decompressed) tar bytes of a layer, hashing them on the way."""

    def __init__(self, source: IO[bytes], *, on_read: Callable[[int], None] | None = None) -> None:
        self._raw = source
        self._on_read = on_read
        self.compression = "none"
        self.digest = hashlib.sha256()
        self.bytes_read = 0
        self.at_eof = False
        self.tail = b""  # the last END_MARKER_BYTES of the tar stream read so far
        head = _peek(source, 4)
        self.empty = not head  # a 0-byte stream is an empty layer, not a broken tar
        self._stream: IO[bytes]
        if head.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            self._stream = igzip_threaded.open(source, "rb", threads=1)  # type: ignore[no-untyped-call]
        elif head.startswith(ZSTD_MAGIC):
            self.compression = "zstd"
            self._stream = zstandard.ZstdDecompressor().stream_reader(
                source, read_across_frames=True, closefd=False
            )
        else:
            self._stream = source

    def readinto(self, buffer: memoryview) -> int:
        try:
            count = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        except (OSError, EOFError, zstandard.ZstdError) as err:
            raise CorruptInputError(
                f"failed to decompress the {self.compression} layer: {err} (the stream is "
                f"corrupt or truncated; noticed after {self.bytes_read} bytes of tar data, "
                "which can be earlier than the fault because decompression reads ahead)"
            ) from err
        if not count:
            self.at_eof = True
        else:
            self.digest.update(buffer[:count])
            self.bytes_read += count
            self.tail = (self.tail + bytes(buffer[max(0, count - END_MARKER_BYTES) : count]))[
                -END_MARKER_BYTES:
            ]
            if self._on_read is not None:
                self._on_read(count)
        return int(count or 0)

    def drain(self) -> None:
        """Read the rest of the stream, so a compressed stream's trailer is verified."""
        buffer = memoryview(bytearray(READ_CHUNK_BYTES))
        while self.readinto(buffer):
            pass

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()


def _peek(source: IO[bytes], count: int) -> bytes:
    peek = getattr(source, "peek", None)
    if peek is not None:
        return bytes(peek(count)[:count])
    if source.seekable():
        position = source.tell()
        head = source.read(count)
        source.seek(position)
        return head
    raise TypeError("the layer source must be a buffered or seekable binary stream")


class TarReader:
    """Iterate the entries of a tar stream; read each regular file's data before moving on."""

    def __init__(self, stream: LayerStream) -> None:
        self._stream = stream
        self._archive = _lib.archive_read_new()
        self._buffer = ctypes.create_string_buffer(READ_CHUNK_BYTES)
        self._view = memoryview(self._buffer).cast("B")
        self._buffer_address = ctypes.cast(self._buffer, ctypes.c_void_p)
        self._error: BaseException | None = None
        self._callback = libarchive_ffi.READ_CALLBACK(self._read)
        self._current: TarEntry | None = None
        _lib.archive_read_support_format_tar(self._archive)
        if _lib.archive_read_open(self._archive, None, None, self._callback, None) != ARCHIVE_OK:
            self._raise("open the tar stream")

    def _read(self, _archive: int, _context: int, pointer: Any) -> int:
        # libarchive calls this for more input; exceptions cannot cross the C frames, so
        # they are kept and raised again after libarchive returns.
        try:
            count = self._stream.readinto(self._view)
        except BaseException as err:  # noqa: BLE001 - re-raised by _raise()
            self._error = err
            return -1
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_void_p))[0] = self._buffer_address
        return count

    def _raise(self, action: str) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        message = (_lib.archive_error_string(self._archive) or b"unknown error").decode(
            "utf-8", "replace"
        )
        where = ""
        if self._current is not None:
            where = (
                f" in entry {self._current.path.decode('utf-8', 'replace')!r} "
                f"(header at byte {self._current.header_offset})"
            )
        raise CorruptInputError(f"failed to {action}{where}: {message}")

    def close(self) -> None:
        if self._archive:
            _lib.archive_read_free(self._archive)
            self._archive = None

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[TarEntry]:
        entry_pointer = ctypes.c_void_p()
        while True:
            result = _lib.archive_read_next_header(self._archive, ctypes.byref(entry_pointer))
            if result == ARCHIVE_EOF:
                if self._error is not None:
                    self._raise("read the tar stream")
                self._check_end_marker()
                self._stream.drain()
                return
            if result not in (ARCHIVE_OK, ARCHIVE_WARN):
                self._current = None
                self._raise(f"read the tar header at byte {self._stream.bytes_read}")
            if result == ARCHIVE_WARN:
                log.warning(
                    "libarchive warning at tar byte %d: %s",
                    _lib.archive_read_header_position(self._archive),
                    (_lib.archive_error_string(self._archive) or b"").decode("utf-8", "replace"),
                )
            self._current = self._decode(entry_pointer.value)
            yield self._current

    def _check_end_marker(self) -> None:
        # libarchive also returns EOF when the stream stops at an entry boundary, as a cut
        # stream does. It stops reading early only after the zero blocks; when it consumed
        # everything, the stream's last two blocks must be those zeros.
        consumed = _lib.archive_filter_bytes(self._archive, 0)
        if consumed < self._stream.bytes_read:
            return
        if len(self._stream.tail) == END_MARKER_BYTES and not any(self._stream.tail):
            return
        self._current = None
        raise CorruptInputError(
            f"failed to read the tar stream: it ends at byte {self._stream.bytes_read} "
            "without the end-of-archive marker (two zero blocks); the layer is truncated"
        )

    def _decode(self, entry: int | None) -> TarEntry:
        lib = _lib
        hardlink = lib.archive_entry_hardlink(entry)
        mode = lib.archive_entry_mode(entry)
        file_type = lib.archive_entry_filetype(entry) & S_IFMT
        atime = ctime = birthtime = None
        if lib.archive_entry_atime_is_set(entry):
            atime = _time_ns(lib.archive_entry_atime(entry), lib.archive_entry_atime_nsec(entry))
        if lib.archive_entry_ctime_is_set(entry):
            ctime = _time_ns(lib.archive_entry_ctime(entry), lib.archive_entry_ctime_nsec(entry))
        if lib.archive_entry_birthtime_is_set(entry):
            birthtime = _time_ns(
                lib.archive_entry_birthtime(entry), lib.archive_entry_birthtime_nsec(entry)
            )
        decoded = TarEntry(
            path=lib.archive_entry_pathname(entry) or b"",
            file_type=0 if hardlink is not None else file_type,
            permissions=mode & 0o7777,
            uid=lib.archive_entry_uid(entry),
            gid=lib.archive_entry_gid(entry),
            size=lib.archive_entry_size(entry) if lib.archive_entry_size_is_set(entry) else 0,
            mtime_ns=_time_ns(lib.archive_entry_mtime(entry), lib.archive_entry_mtime_nsec(entry)),
            atime_ns=atime,
            ctime_ns=ctime,
            birthtime_ns=birthtime,
            hardlink=hardlink,
            symlink=lib.archive_entry_symlink(entry) if file_type == 0o120000 else None,
            rdev_major=lib.archive_entry_rdevmajor(entry),
            rdev_minor=lib.archive_entry_rdevminor(entry),
            header_offset=lib.archive_read_header_position(self._archive),
        )
        if lib.archive_entry_xattr_reset(entry):
            name = ctypes.c_char_p()
            value = ctypes.c_void_p()
            size = ctypes.c_size_t()
            while (
                lib.archive_entry_xattr_next(
                    entry, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)
                )
                == ARCHIVE_OK
            ):
                data = ctypes.string_at(value.value or 0, size.value) if size.value else b""
                decoded.xattrs.append((name.value or b"", data))
        return decoded

    def data_blocks(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (offset, data) of the current entry; the gaps between blocks are holes.

        Each view points into libarchive's buffer and is valid until the next block.
        """
        buffer = ctypes.c_void_p()
        size = ctypes.c_size_t()
        offset = ctypes.c_int64()
        while True:
            result = _lib.archive_read_data_block(
                self._archive, ctypes.byref(buffer), ctypes.byref(size), ctypes.byref(offset)
            )
            if result == ARCHIVE_EOF:
                return
            if result not in (ARCHIVE_OK, ARCHIVE_WARN):
                self._raise("read the data")
            if size.value:
                array = (ctypes.c_char * size.value).from_address(buffer.value or 0)
                yield offset.value, memoryview(array).cast("B")


def open_source(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a layer file (or ``-`` for stdin) for :class:`LayerStream`."""
    if os.fspath(path) == "-":
        return io.BufferedReader(io.FileIO(os.dup(0), "rb"), buffer_size=READ_CHUNK_BYTES)
    return open(path, "rb", buffering=READ_CHUNK_BYTES)
