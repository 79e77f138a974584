"""Read tar layers through libarchive: entries with raw byte names, ns times, xattrs, holes.

libarchive parses every tar dialect a registry serves (ustar, GNU with long names and old
sparse files, PAX with all sparse versions, base-256 numbers). ctypes loads it and opens and
frees each archive. The calls made for every header and every data block go through the C
extension ``lcow.layer._libarchive`` instead: through ctypes, decoding one entry took a dozen
calls of about 300 ns each.

Decompression happens before libarchive sees the bytes: gzip through ISA-L (several times
faster than zlib, in a thread of its own), zstd through the zstandard package. A read-ahead
thread reads, decompresses and hashes the stream a few chunks ahead of libarchive, so that
work runs on another core beside the conversion.
"""

import ctypes
import hashlib
import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Final

import blake3
import zstandard
from isal import igzip_threaded

from lcow.errors import CorruptInputError
from lcow.layer import _libarchive as _per_entry

log = logging.getLogger(__name__)

READ_CHUNK_BYTES: Final = 1 << 20
READ_AHEAD_CHUNKS: Final = 4  # chunks in flight: one held by libarchive, the rest read ahead
# The read-ahead thread needs the GIL a few times per chunk, and gets it mostly while the
# converter waits, so larger chunks mean fewer waits. With 1 MiB against 256 KiB, converting
# many-small-files took 2.39-2.49 s against 2.74-2.95 s (3 alternating runs each).
READ_AHEAD_CHUNK_BYTES: Final = 1 << 20
READ_AHEAD_JOIN_S: Final = 5.0
# A layer file's BufferedReader stays smaller than a read-ahead chunk: it then reads whole
# chunks straight into the chunk's buffer, where a larger one copies each through its own.
SOURCE_BUFFER_BYTES: Final = 64 << 10
GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"

ARCHIVE_EOF: Final = 1
ARCHIVE_OK: Final = 0
ARCHIVE_WARN: Final = -20

S_IFMT: Final = 0o170000
END_MARKER_BYTES: Final = 1024  # a tar ends with two 512-byte blocks of zeros


# The soname of the library in Debian's libarchive13. The dynamic loader finds it by this
# name, where ctypes.util.find_library would run ldconfig first. $LIBARCHIVE, which the
# libarchive-c package reads too, names another copy (the service VM's initrd sets it).
LIBARCHIVE_SONAME: Final = "libarchive.so.13"
# la_ssize_t archive_read_callback(struct archive *, void *client_data, const void **buffer)
READ_CALLBACK: Final = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
)


def _load_libarchive() -> ctypes.CDLL:
    p, i, i64, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
    sz = ctypes.c_size_t
    declarations: dict[str, tuple[list[type], type | None]] = {
        "archive_read_new": ([], p),
        "archive_read_support_format_tar": ([p], i),
        "archive_read_open": ([p, p, p, READ_CALLBACK, p], i),
        # The next two are for callers that time libarchive alone, such as the benchmarks.
        "archive_read_next_header": ([p, ctypes.POINTER(p)], i),
        "archive_read_data_block": (
            [p, ctypes.POINTER(p), ctypes.POINTER(sz), ctypes.POINTER(i64)],
            i,
        ),
        "archive_read_free": ([p], i),
        "archive_error_string": ([p], cp),
        "archive_read_header_position": ([p], i64),
        "archive_filter_bytes": ([p, i], i64),
    }

    chosen = os.environ.get("LIBARCHIVE")
    path = chosen or LIBARCHIVE_SONAME
    # PyDLL keeps the GIL during each call, as lcow.layer._libarchive does, so the read
    # callback always runs on the thread that holds it. CDLL releases and retakes the GIL
    # around each call: a call took 721 ns against 296 ns with PyDLL.
    try:
        lib = ctypes.PyDLL(path)
        functions = {name: getattr(lib, name) for name in declarations}
    except (OSError, AttributeError) as err:  # not loadable, or not libarchive
        hint = "Fix or unset LIBARCHIVE" if chosen else "Install libarchive13"
        raise ImportError(f"failed to load libarchive ({path}): {err}. {hint}") from err

    for name, (argtypes, restype) in declarations.items():
        functions[name].argtypes = argtypes
        functions[name].restype = restype
    return lib


_lib: Final = _load_libarchive()


def _bind_per_entry_calls() -> None:
    """Hand lcow.layer._libarchive the addresses of the functions it calls, from ``_lib``."""
    _per_entry.bind(
        {
            name: ctypes.cast(getattr(_lib, name), ctypes.c_void_p).value
            for name in _per_entry.FUNCTION_NAMES
        }
    )


_bind_per_entry_calls()
_read_header: Final = _per_entry.read_header
_read_block: Final = _per_entry.read_block


@dataclass(slots=True, init=False)
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
    xattrs: list[tuple[bytes, bytes]]

    def __init__(
        self,
        path: bytes,
        file_type: int,
        permissions: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        atime_ns: int | None,
        ctime_ns: int | None,
        birthtime_ns: int | None,
        hardlink: bytes | None,
        symlink: bytes | None,
        rdev_major: int,
        rdev_minor: int,
        header_offset: int,
        xattrs: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.path = path
        self.file_type = file_type
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.atime_ns = atime_ns
        self.ctime_ns = ctime_ns
        self.birthtime_ns = birthtime_ns
        self.hardlink = hardlink
        self.symlink = symlink
        self.rdev_major = rdev_major
        self.rdev_minor = rdev_minor
        self.header_offset = header_offset
        self.xattrs = [] if xattrs is None else xattrs


def _time_ns(seconds: int, nanoseconds: int) -> int:
    if seconds < 0 and nanoseconds:
        # libarchive 3.6 parses a PAX time such as "-1.25" into -1 s and +0.25 s, applying
        # the sign to the whole seconds only; the value meant is -1.25 s.
        # NOTE: for "-0.25" the sign is lost entirely (0 s and +0.25 s), so a time within
        # the second before the epoch reads as the same offset after it.
        return seconds * 1_000_000_000 - nanoseconds
    return seconds * 1_000_000_000 + nanoseconds


class LayerStream:
    """Pull the (decompressed) tar bytes of a layer, hashing them on the way.

    ``digest`` names the hash. ``sha256`` gives the layer's diff id as image configs list
    it. ``blake3`` serves where only a content identity is needed, because it is about 4
    times faster. It hashed 7.9 GB/s against 1.9 GB/s on one core of a Xeon with SHA
    extensions and AVX-512 (blake3 1.0.11 and OpenSSL through hashlib, 1 GiB in 1 MiB
    updates).
    """

    def __init__(
        self,
        source: IO[bytes],
        *,
        digest: str = "sha256",
    ) -> None:
        self._raw = source
        self.compression = "none"
        self.digest: Any = blake3.blake3() if digest == "blake3" else hashlib.new(digest)
        self.bytes_read = 0
        self.at_eof = False
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
        return int(count or 0)

    def drain(self) -> None:
        """Read the rest of the stream, so a compressed stream's trailer is verified."""
        buffer = memoryview(bytearray(READ_CHUNK_BYTES))
        while self.readinto(buffer):
            pass

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()


class ReadAhead:
    """Read a :class:`LayerStream` in a thread of its own, up to a few chunks ahead.

    Reading, decompressing and hashing release the GIL, so they run on another core while
    libarchive and the converter work on the chunk before. Each chunk is a ctypes buffer
    that libarchive parses in place. A chunk stays valid until the next call of
    :meth:`next_chunk`, as libarchive's read callback contract requires.
    ``bytes_read`` and ``tail`` count the chunks handed out, not the ones read ahead.
    """

    def __init__(
        self,
        stream: LayerStream,
        *,
        on_read: Callable[[int], None] | None = None,
        chunks: int = READ_AHEAD_CHUNKS,
    ) -> None:
        self.stream = stream
        self._on_read = on_read
        self._buffers = [ctypes.create_string_buffer(READ_AHEAD_CHUNK_BYTES) for _ in range(chunks)]
        self._views = [memoryview(buffer).cast("B") for buffer in self._buffers]
        self._addresses = [ctypes.addressof(buffer) for buffer in self._buffers]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[int, int] | BaseException] = queue.SimpleQueue()
        for index in range(chunks):
            self._free.put(index)
        self._held_index: int | None = None
        self._failure: BaseException | None = None
        self._stopping = False
        self._read_thread = threading.Thread(target=self._run, name="lcow-read-ahead", daemon=True)
        self._started = False
        self.bytes_read = 0
        self.at_eof = False
        self.tail = b""  # the last END_MARKER_BYTES handed out
        self.chunk_address = 0  # the chunk most recently handed out, for libarchive

    def _run(self) -> None:
        try:
            while True:
                index = self._free.get()
                if self._stopping:
                    return
                count = self.stream.readinto(self._views[index])
                self._full.put((index, count))
                if not count:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._full.put(err)

    def next_chunk(self) -> memoryview:
        """Return the next chunk of tar bytes, empty at the end of the stream."""
        if not self._started:
            self._started = True
            self._read_thread.start()
        if self._held_index is not None:
            self._free.put(self._held_index)
            self._held_index = None
        if self._failure is not None:
            raise self._failure
        if self.at_eof:
            return memoryview(b"")

        item = self._full.get()
        if isinstance(item, BaseException):
            self._failure = item  # the thread has stopped; every later call raises it again
            raise item
        index, count = item
        if not count:
            self.at_eof = True
            return memoryview(b"")

        self._held_index = index
        self.chunk_address = self._addresses[index]
        chunk = self._views[index][:count]
        self.bytes_read += count
        self.tail = (self.tail + bytes(chunk[-END_MARKER_BYTES:]))[-END_MARKER_BYTES:]
        if self._on_read is not None:
            self._on_read(count)
        return chunk

    def drain(self) -> None:
        """Read the rest of the stream, so a compressed stream's trailer is verified."""
        while self.next_chunk():
            pass

    def close(self) -> None:
        """Stop the thread; a read that blocks on a pipe ends when its writer closes."""
        self._stopping = True
        self._free.put(-1)
        if self._started:
            self._read_thread.join(READ_AHEAD_JOIN_S)
            if self._read_thread.is_alive():
                log.info("the layer stream still blocks; its read-ahead thread ends with it")


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

    def __init__(self, stream: ReadAhead) -> None:
        self._stream = stream
        self._archive = _lib.archive_read_new()
        self._error: BaseException | None = None
        self._callback = READ_CALLBACK(self._read)
        self._current: TarEntry | None = None
        _lib.archive_read_support_format_tar(self._archive)
        if _lib.archive_read_open(self._archive, None, None, self._callback, None) != ARCHIVE_OK:
            self._raise("open the tar stream")

    def _read(self, _archive: Any, _context: Any, pointer: Any) -> int:
        # libarchive calls this for more input; exceptions cannot cross the C frames, so
        # they are kept and raised again after libarchive returns.
        try:
            count = len(self._stream.next_chunk())
        except BaseException as err:  # noqa: BLE001 - re-raised by _raise()
            self._error = err
            return -1
        pointer[0] = self._stream.chunk_address  # READ_CALLBACK types it as void **
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
        while True:
            fields = _read_header(self._archive)
            result: int = fields[0]
            if result == ARCHIVE_EOF:
                if self._error is not None:
                    self._raise("read the tar stream")
                self._check_end_marker()
                self._stream.drain()
                return
            if result not in (ARCHIVE_OK, ARCHIVE_WARN):
                self._current = None
                # libarchive records where a header starts before it parses it.
                position = _lib.archive_read_header_position(self._archive)
                self._raise(f"read the tar header at byte {position}")
            self._current = _decode(fields)
            if result == ARCHIVE_WARN:
                log.warning(
                    "libarchive warning at tar byte %d: %s",
                    self._current.header_offset,
                    (_lib.archive_error_string(self._archive) or b"").decode("utf-8", "replace"),
                )
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

    def data_blocks(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (offset, data) of the current entry; the gaps between blocks are holes.

        Each view points into the current chunk or into libarchive's own buffer, and is
        valid until the next block: it holds no reference that keeps those bytes.
        """
        archive = self._archive
        while True:
            result, offset, block = _read_block(archive)
            if result == ARCHIVE_EOF:
                return
            if result not in (ARCHIVE_OK, ARCHIVE_WARN):
                self._raise("read the data")
            if block is not None:
                yield offset, block


def _decode(fields: tuple[Any, ...]) -> TarEntry:
    """Make the entry from the fields of ``_read_header``, in the order of _libarchive.c."""
    (
        _result,
        path,
        hardlink,
        symlink,
        mode,
        uid,
        gid,
        size,
        rdev_major,
        rdev_minor,
        mtime_s,
        mtime_ns,
        atime_s,
        atime_ns,
        ctime_s,
        ctime_ns,
        birthtime_s,
        birthtime_ns,
        header_offset,
        xattrs,
    ) = fields
    file_type = mode & S_IFMT
    return TarEntry(
        path=path or b"",
        file_type=0 if hardlink is not None else file_type,
        permissions=mode & 0o7777,
        uid=uid,
        gid=gid,
        size=size,
        mtime_ns=_time_ns(mtime_s, mtime_ns),
        atime_ns=None if atime_s is None else _time_ns(atime_s, atime_ns),
        ctime_ns=None if ctime_s is None else _time_ns(ctime_s, ctime_ns),
        birthtime_ns=None if birthtime_s is None else _time_ns(birthtime_s, birthtime_ns),
        hardlink=hardlink,
        symlink=symlink if file_type == 0o120000 else None,
        rdev_major=rdev_major,
        rdev_minor=rdev_minor,
        header_offset=header_offset,
        xattrs=xattrs,
    )


def open_source(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a layer file (or ``-`` for stdin) for :class:`LayerStream`."""
    if os.fspath(path) == "-":
        return io.BufferedReader(io.FileIO(os.dup(0), "rb"), buffer_size=SOURCE_BUFFER_BYTES)
    return open(path, "rb", buffering=SOURCE_BUFFER_BYTES)
