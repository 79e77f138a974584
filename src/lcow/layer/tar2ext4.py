"""Convert a tar layer into a layer image: ext4, optionally followed by a fixed-VHD footer.

The conversion streams: one pass over the tar, file data written as it arrives, metadata at
the end. The output appears under its final name only when it is complete; on any error no
output file is left.

Rules applied to entries (docs/layer-format.md has the full list):

- Names: a leading ``./`` or ``/`` is dropped, ``.`` and empty components are ignored, a
  ``..`` that would leave the layer root rejects the layer. Names are stored as raw bytes.
- Whiteouts: ``DIR/.wh.NAME`` becomes a character device 0/0 named NAME;
  ``DIR/.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on DIR. Both describe lower layers
  only, so a file of this layer with the same name stays. Other ``.wh..wh.`` entries are
  aufs bookkeeping and are dropped.
- Missing parent directories are created with :data:`IMPLICIT_DIRECTORY_PERMISSIONS`, owner
  0:0 and the time :data:`IMPLICIT_DIRECTORY_MTIME_NS`; a later entry for them sets their
  real metadata.
- Times: atime and ctime default to mtime and the creation time to the birth time or mtime,
  so the image never depends on the clock.
"""

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from lcow import gcpause, vhd
from lcow.errors import CorruptInputError, InvalidArgumentError, LcowError, UnsupportedError
from lcow.ext4 import format as fmt
from lcow.ext4 import xattr as xattr_codec
from lcow.ext4.writer import DEFAULT_MAX_SIZE_BYTES, Ext4Writer, Metadata
from lcow.layer.tarstream import LayerStream, ReadAhead, TarEntry, TarReader, open_source

log = logging.getLogger(__name__)

IMPLICIT_DIRECTORY_PERMISSIONS: Final = 0o755
IMPLICIT_DIRECTORY_MTIME_NS: Final = 0  # 1970-01-01T00:00:00Z

WHITEOUT_PREFIX: Final = b".wh."
WHITEOUT_META_PREFIX: Final = b".wh..wh."
WHITEOUT_OPAQUE: Final = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR: Final = b"trusted.overlay.opaque"

OPAQUE_MARKER: Final = xattr_codec.make_xattr(OVERLAY_OPAQUE_XATTR, b"y")
IMPLICIT_METADATA: Final = Metadata(
    permissions=IMPLICIT_DIRECTORY_PERMISSIONS,
    uid=0,
    gid=0,
    mtime_ns=IMPLICIT_DIRECTORY_MTIME_NS,
    atime_ns=IMPLICIT_DIRECTORY_MTIME_NS,
    ctime_ns=IMPLICIT_DIRECTORY_MTIME_NS,
    crtime_ns=IMPLICIT_DIRECTORY_MTIME_NS,
)


@dataclass(frozen=True, slots=True)
class ConversionStats:
    """Statistics of one conversion: what it read and wrote."""

    entries: int
    size_bytes: int  # summed sizes of the tar entries, as Docker's ApplyDiff reports
    image_size_bytes: int  # the ext4 filesystem, without the footer
    tar_bytes: int  # uncompressed tar stream length
    compression: str
    tar_blake3: str  # hex BLAKE3 of the uncompressed tar stream, the content identity


_SPECIAL_COMPONENTS: Final = frozenset((b"", b".", b".."))


def split_path(raw: bytes, *, entry: bytes) -> list[bytes]:
    """Normalise a tar name into components; a ``..`` leaving the root raises."""
    components = raw.split(b"/")
    if components[-1] == b"":
        components.pop()  # the trailing slash of a directory
    # Most names need no normalising: no empty, "." or ".." component, none too long.
    if len(raw) <= fmt.EXT4_NAME_LEN and _SPECIAL_COMPONENTS.isdisjoint(components):
        return components
    return _normalise_components(raw, entry)


def _normalise_components(raw: bytes, entry: bytes) -> list[bytes]:
    components: list[bytes] = []
    for name in raw.split(b"/"):
        if name in (b"", b"."):
            continue
        if name == b"..":
            if not components:
                raise InvalidArgumentError(
                    f"invalid tar entry {_show(entry)}: the path leaves the layer root"
                )
            components.pop()
            continue
        components.append(name)

    for index, name in enumerate(components):
        limit = fmt.EXT4_NAME_LEN
        if index == len(components) - 1 and name.startswith(WHITEOUT_PREFIX):
            # A whiteout names a file of up to 255 bytes, so its own name may be 4 bytes
            # longer. The image stores the file's name without the prefix.
            limit += len(WHITEOUT_PREFIX)
        if len(name) > limit:
            raise InvalidArgumentError(
                f"invalid tar entry {_show(entry)}: a path component is {len(name)} bytes, "
                f"ext4 allows at most {fmt.EXT4_NAME_LEN}"
            )
    return components


def _show(raw: bytes) -> str:
    return repr(raw.decode("utf-8", "backslashreplace"))


class _Converter:
    """Apply tar entries to an :class:`Ext4Writer` following the rules in the module doc."""

    def __init__(self, writer: Ext4Writer) -> None:
        self.writer = writer
        self.entries = 0
        self.size_bytes = 0
        self._skipped_xattr_names: set[bytes] = set()

    def metadata(self, entry: TarEntry) -> Metadata:
        mtime_ns = entry.mtime_ns
        atime_ns = entry.atime_ns
        ctime_ns = entry.ctime_ns
        crtime_ns = entry.birthtime_ns
        return Metadata(
            entry.permissions,
            entry.uid,
            entry.gid,
            mtime_ns,
            mtime_ns if atime_ns is None else atime_ns,
            mtime_ns if ctime_ns is None else ctime_ns,
            mtime_ns if crtime_ns is None else crtime_ns,
            self._xattrs(entry) if entry.xattrs else (),
        )

    def _xattrs(self, entry: TarEntry) -> tuple[xattr_codec.Xattr, ...]:
        xattrs: list[xattr_codec.Xattr] = []
        for name, value in entry.xattrs:
            try:
                xattrs.append(xattr_codec.make_xattr(name, value))
            except UnsupportedError as err:
                # Docker's applier skips xattrs the filesystem cannot store. lcow does the
                # same and logs a warning once per name.
                if name not in self._skipped_xattr_names:
                    self._skipped_xattr_names.add(name)
                    log.warning("skipped xattr in entry %s: %s", _show(entry.path), err)
        return tuple(xattrs)

    def apply(self, entry: TarEntry, reader: TarReader) -> None:
        self.entries += 1
        self.size_bytes += entry.size
        raw_path = entry.path
        path = split_path(raw_path, entry=raw_path)
        if uid_or_gid_invalid(entry):
            raise InvalidArgumentError(
                f"invalid tar entry {_show(raw_path)}: owner {entry.uid}:{entry.gid} does "
                "not fit in 32 bits"
            )

        if path and path[-1].startswith(WHITEOUT_PREFIX):
            self._apply_whiteout(entry, path)
            return

        writer = self.writer
        if entry.hardlink is not None:
            self._apply_hard_link(entry, path)
            return

        kind = entry.file_type
        meta = self.metadata(entry)
        if kind == fmt.S_IFREG and path:
            writer.add_regular_file(path, meta, entry.size, reader.data_blocks())
        elif kind == fmt.S_IFDIR:
            writer.add_directory(path, meta)
        elif not path:
            raise InvalidArgumentError(
                f"invalid tar entry {_show(raw_path)}: only a directory may name the root"
            )
        elif kind == fmt.S_IFLNK:
            writer.add_symlink(path, meta, entry.symlink or b"")
        elif kind in (fmt.S_IFCHR, fmt.S_IFBLK, fmt.S_IFIFO, fmt.S_IFSOCK):
            writer.add_special(path, meta, kind, entry.rdev_major, entry.rdev_minor)
        else:
            raise UnsupportedError(
                f"unsupported tar entry {_show(entry.path)}: it is not a file, directory, "
                "link, device or FIFO (for example a GNU multi-volume continuation); "
                "convert a single-volume tar instead"
            )

    def _apply_whiteout(self, entry: TarEntry, path: list[bytes]) -> None:
        base = path[-1]
        parent = path[:-1]
        writer = self.writer
        if base == WHITEOUT_OPAQUE:
            directory = writer.ensure_directory(parent)
            writer.set_xattr(directory, OPAQUE_MARKER)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("dropped aufs metadata entry %s", _show(entry.path))
            return
        target = [*parent, base[len(WHITEOUT_PREFIX) :]]
        if writer.lookup(target) is not None:
            # The whiteout hides lower layers only; this layer's own file stays.
            return
        writer.add_special(target, self.metadata(entry), fmt.S_IFCHR, 0, 0)

    def _apply_hard_link(self, entry: TarEntry, path: list[bytes]) -> None:
        assert entry.hardlink is not None
        try:
            target_path = split_path(entry.hardlink, entry=entry.hardlink)
        except InvalidArgumentError as err:
            raise InvalidArgumentError(
                f"invalid hard link {_show(entry.path)}: its target {_show(entry.hardlink)} "
                "leaves the layer root"
            ) from err
        target = self.writer.lookup(target_path)
        if target is None:
            raise InvalidArgumentError(
                f"invalid hard link {_show(entry.path)}: its target "
                f"{_show(entry.hardlink)} is not an earlier entry of the layer"
            )
        if target.is_dir:
            raise InvalidArgumentError(
                f"invalid hard link {_show(entry.path)}: its target "
                f"{_show(entry.hardlink)} is a directory"
            )
        if not path:
            raise InvalidArgumentError(
                f"invalid hard link {_show(entry.path)}: it names the layer root"
            )
        self.writer.add_hard_link(path, target)


def uid_or_gid_invalid(entry: TarEntry) -> bool:
    return not (0 <= entry.uid < 2**32 and 0 <= entry.gid < 2**32)


def _apply_all(converter: _Converter, reader: TarReader) -> None:
    for entry in reader:
        try:
            converter.apply(entry, reader)
        except CorruptInputError:
            raise
        except LcowError as err:
            # Name the entry once, here, for every error the rules raise.
            raise type(err)(
                f"failed to convert entry {_show(entry.path)} at tar byte "
                f"{entry.header_offset}: {err}"
            ) from err


@gcpause.paused()
def convert_stream(
    source: IO[bytes],
    output_fd: int,
    *,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    on_read: Callable[[int], None] | None = None,
) -> tuple[ConversionStats, bytes]:
    """Write the ext4 image of the tar in ``source`` to ``output_fd``.

    Returns the statistics and the BLAKE3 digest of the uncompressed tar stream.
    """
    stream = LayerStream(source, digest="blake3")
    writer = Ext4Writer(
        output_fd,
        implicit_meta=IMPLICIT_METADATA,
        max_size_bytes=max_size_bytes,
        opaque_xattr=OPAQUE_MARKER,
    )
    converter = _Converter(writer)
    ahead = ReadAhead(stream, on_read=on_read)
    try:
        if stream.empty:
            log.info("empty layer stream: writing an empty image")
        else:
            with _open_reader(ahead) as reader:
                if reader is not None:
                    _apply_all(converter, reader)
    finally:
        ahead.close()
        stream.close()

    digest = stream.digest.digest()
    image_size = writer.close(digest)
    stats = ConversionStats(
        entries=converter.entries,
        size_bytes=converter.size_bytes,
        image_size_bytes=image_size,
        tar_bytes=stream.bytes_read,
        compression=stream.compression,
        tar_blake3=digest.hex(),
    )
    return stats, digest


@contextlib.contextmanager
def _open_reader(stream: ReadAhead) -> Iterator[TarReader | None]:
    """Open libarchive on ``stream``; None stands for a compressed stream of zero tar bytes."""
    try:
        reader = TarReader(stream)
    except CorruptInputError:
        if stream.at_eof and stream.bytes_read == 0:
            log.info("empty %s layer stream: writing an empty image", stream.stream.compression)
            yield None
            return
        raise
    with reader:
        yield reader


def convert_tar(
    source: str | os.PathLike[str] | IO[bytes],
    destination: str | os.PathLike[str],
    *,
    vhd_footer: bool = True,
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
    on_read: Callable[[int], None] | None = None,
) -> ConversionStats:
    """Convert the tar layer ``source`` (a path, ``-`` or a binary stream) to ``destination``.

    The image is written to a temporary file beside ``destination``, flushed to disk and
    renamed into place, so ``destination`` is either complete or untouched.
    """
    destination = Path(destination)
    with contextlib.ExitStack() as inputs:
        if isinstance(source, (str, os.PathLike)):
            stream = inputs.enter_context(open_source(source))
        else:
            stream = source

        with atomic_output(destination) as output:
            stats, digest = convert_stream(
                stream, output.fileno(), max_size_bytes=max_size_bytes, on_read=on_read
            )
            if vhd_footer:
                vhd.append_footer(output.fileno(), stats.image_size_bytes, vhd_unique_id(digest))
    return stats


@contextlib.contextmanager
def atomic_output(destination: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a temporary file beside ``destination``; rename it into place on success.

    The file is flushed to disk before the rename and the folder after it, so after a crash
    ``destination`` is either complete or absent. On error the temporary file is removed.
    """
    fd, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    with contextlib.ExitStack() as undo:
        undo.callback(_remove_quietly, temporary)
        with os.fdopen(fd, "r+b", buffering=0) as output:
            yield output
            os.fsync(output.fileno())
            os.fchmod(output.fileno(), mode)
        os.replace(temporary, destination)
        undo.pop_all()
    fsync_directory(destination.parent)


def vhd_unique_id(digest: bytes) -> bytes:
    """Derive the VHD footer's unique id from the BLAKE3 digest of the uncompressed tar."""
    return hashlib.sha256(b"lcow vhd unique id\0" + digest).digest()[:16]


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries to disk, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
