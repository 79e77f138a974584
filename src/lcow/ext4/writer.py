"""A streaming writer of compact, read-only ext4 images.

File data is written once, in arrival order, each file in consecutive blocks (split only
where a superblock copy sits in the way). Directories, extent index blocks, xattr blocks,
inode tables, bitmaps, group descriptors and superblocks are written at :meth:`close`,
after the data, because only then are their sizes known. The image has no journal and no
free space beyond what alignment needs.

Memory grows with the number of inodes and directory entries, never with file sizes.

Reference: the kernel's ext4 disk-layout documentation and fs/ext4/ext4.h.
"""

import dataclasses
import functools
import hashlib
import os
import struct
import uuid as uuid_module
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from lcow.clone import set_size
from lcow.errors import InvalidArgumentError, UnsupportedError
from lcow.ext4 import _inode
from lcow.ext4 import format as fmt
from lcow.ext4 import xattr as xattr_codec
from lcow.ext4.checksum import crc32c_raw, filesystem_seed
from lcow.ext4.extents import Extent, build_tree, leaf_root, pack_extents
from lcow.ext4.layout import BlockAllocator, backup_groups, descriptor_blocks

BLOCK: Final = fmt.BLOCK_SIZE_BYTES
DEFAULT_MAX_SIZE_BYTES: Final = 1 << 40  # 1 TiB; reserves 64 blocks per superblock copy
LOST_AND_FOUND: Final = b"lost+found"
# Small files are gathered into writes of this size. A buffer of 256 KiB is likely still in
# the CPU's cache when pwrite copies it out: converting many-small-files took a median of
# 2.205 s against 2.332 s with 1 MiB (5 alternating runs each); L1-base did not change.
_DATA_BUFFER_BYTES: Final = 256 << 10
# A larger piece goes out at once: copying it into the buffer would cost more than a call.
_DIRECT_WRITE_BYTES: Final = 128 << 10
_MAX_FILE_LINKS: Final = fmt.EXT4_LINK_MAX
WHITEOUT_DEVICE: Final = bytes(fmt.INODE_BLOCK_SIZE_BYTES)  # i_block of char device 0/0
_FAST_SYMLINK_MAX_BYTES: Final = fmt.INODE_BLOCK_SIZE_BYTES - 1  # the target keeps a NUL
_ZERO_BLOCK: Final = bytes(BLOCK)

# Bound once for the per-inode and per-entry loops of close().
_EXTENT_LENGTH: Final = struct.Struct("<H")
_EXTENTS_FL: Final = int(fmt.InodeFlags.EXTENTS)
_FILE_TYPE_BY_MODE: Final = {mode: int(kind) for mode, kind in fmt.FILE_TYPE_BY_MODE.items()}
_S_IFMT: Final = fmt.S_IFMT
_S_IFDIR: Final = fmt.S_IFDIR
_S_IFLNK: Final = fmt.S_IFLNK
_DEVICE_KINDS: Final = frozenset((fmt.S_IFCHR, fmt.S_IFBLK))
_EXTENT_KINDS: Final = frozenset((fmt.S_IFREG, fmt.S_IFDIR, fmt.S_IFLNK))  # i_block is a tree


@dataclass(slots=True, init=False, unsafe_hash=True)
class Metadata:
    """The metadata an entry sets on its inode: permission bits, owner, times in ns, xattrs."""

    permissions: Final[int]  # the 12 low mode bits, setuid, setgid and sticky included
    uid: Final[int]
    gid: Final[int]
    mtime_ns: Final[int]
    atime_ns: Final[int]
    ctime_ns: Final[int]
    crtime_ns: Final[int]
    xattrs: Final[tuple[xattr_codec.Xattr, ...]]

    def __init__(
        self,
        permissions: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        atime_ns: int,
        ctime_ns: int,
        crtime_ns: int,
        xattrs: tuple[xattr_codec.Xattr, ...] = (),
    ) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.atime_ns = atime_ns
        self.ctime_ns = ctime_ns
        self.crtime_ns = crtime_ns
        self.xattrs = xattrs


class Inode:
    """An inode in memory until close; ``children`` and ``parent`` are set for directories.

    The metadata fields are stored in the inode itself, not in a :class:`Metadata`, because a
    layer can have 100,000 inodes or more and every extra object costs a header and its fields.
    """

    __slots__ = (
        "children",
        "extents",
        "gid",
        "links",
        "mode",
        "number",
        "parent",
        "payload",
        "size",
        "times_ns",
        "uid",
        "xattrs",
    )

    def __init__(self, number: int, mode: int, meta: Metadata) -> None:
        self.number = number
        self.mode = mode  # file type and permission bits, as i_mode
        self.links = 0
        self.size = 0
        self.extents = b""  # packed ext4_extent entries, see extents.pack_extents
        self.payload = b""  # symlink target, or the encoded i_block of a device
        self.children: dict[bytes, int] | None = None
        self.parent = 0
        self.uid = meta.uid
        self.gid = meta.gid
        self.xattrs = meta.xattrs
        self.times_ns = _times(meta)

    @property
    def meta(self) -> Metadata:
        """The metadata of the inode; the permission bits come from ``mode``."""
        times_ns = self.times_ns
        if isinstance(times_ns, int):
            mtime_ns = atime_ns = ctime_ns = crtime_ns = times_ns
        else:
            mtime_ns, atime_ns, ctime_ns, crtime_ns = times_ns
        return Metadata(
            self.mode & 0o7777,
            self.uid,
            self.gid,
            mtime_ns,
            atime_ns,
            ctime_ns,
            crtime_ns,
            self.xattrs,
        )

    @meta.setter
    def meta(self, meta: Metadata) -> None:
        # The caller sets the permission bits in ``mode``, together with the file type.
        self.uid = meta.uid
        self.gid = meta.gid
        self.xattrs = meta.xattrs
        self.times_ns = _times(meta)

    @property
    def extent_count(self) -> int:
        return len(self.extents) // fmt.EXTENT.size

    @property
    def data_blocks(self) -> int:
        """The number of data blocks, without extent index blocks: the sum of extent lengths."""
        if len(self.extents) == fmt.EXTENT.size:
            length: int = _EXTENT_LENGTH.unpack_from(self.extents, 4)[0]  # ee_len
            return length
        return sum(extent[1] for extent in fmt.EXTENT.iter_unpack(self.extents))

    @property
    def is_dir(self) -> bool:
        return self.mode & fmt.S_IFMT == fmt.S_IFDIR

    def __repr__(self) -> str:
        return f"Inode(number={self.number}, mode={self.mode:#o}, links={self.links})"


def _times(meta: Metadata) -> int | tuple[int, int, int, int]:
    """Return the one time in ns when all four are equal (the usual case), else all four.

    The order of the four is mtime, atime, ctime, crtime.
    """
    mtime_ns = meta.mtime_ns
    if meta.atime_ns == mtime_ns and meta.ctime_ns == mtime_ns and meta.crtime_ns == mtime_ns:
        return mtime_ns
    return mtime_ns, meta.atime_ns, meta.ctime_ns, meta.crtime_ns


def encode_time(time_ns: int) -> tuple[int, int]:
    """Return (seconds field, extra field) for a time in ns, clamped to ext4's range."""
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    if seconds < fmt.EXT4_TIMESTAMP_MIN_S:
        seconds, nanoseconds = fmt.EXT4_TIMESTAMP_MIN_S, 0
    elif seconds > fmt.EXT4_TIMESTAMP_MAX_S:
        seconds, nanoseconds = fmt.EXT4_TIMESTAMP_MAX_S, 999_999_999
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    # ext4_encode_extra_time(): the epoch bits count how many 2**32 s the seconds lie above
    # the signed 32-bit field.
    epoch = ((seconds - signed_low) >> 32) & fmt.EXT4_EPOCH_MASK
    return low, epoch | (nanoseconds << fmt.EXT4_EPOCH_BITS)


def encode_device(major: int, minor: int) -> bytes:
    """Encode a device number into i_block as ext4_encode_dev would."""
    if major < 256 and minor < 256:
        # The old encoding in i_block[0], which the kernel still writes for small numbers.
        return ((major << 8) | minor).to_bytes(4, "little").ljust(fmt.INODE_BLOCK_SIZE_BYTES, b"\0")
    if major >= 1 << 12 or minor >= 1 << 20:
        raise UnsupportedError(
            f"device number {major}:{minor} does not fit the kernel's 12-bit major and 20-bit minor"
        )
    new = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return (bytes(4) + new.to_bytes(4, "little")).ljust(fmt.INODE_BLOCK_SIZE_BYTES, b"\0")


class _DataSink:
    """Gather writes that continue each other into large pwrite calls.

    A write that lies within the gathered bytes replaces them there, so the writes reach the
    file with the same result as if each were written at once, in order.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._start = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        buffer = self._buffer
        end = self._start + len(buffer)
        if offset != end and buffer:
            if self._start <= offset and offset + len(data) <= end:
                position = offset - self._start
                buffer[position : position + len(data)] = data
                return
            self.flush()
            buffer = self._buffer
        if not buffer:
            self._start = offset
        if len(data) >= _DIRECT_WRITE_BYTES:
            self.flush()
            _pwrite_all(self._fd, data, offset)
            return
        buffer += data
        if len(buffer) >= _DATA_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            _pwrite_all(self._fd, self._buffer, self._start)
            self._buffer = bytearray()


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _add_extent(extents: list[list[int]], logical: int, physical: int, length: int) -> None:
    """Append a run to ``extents`` ([logical, physical, length] lists), merging when it follows."""
    while length:
        last = extents[-1] if extents else None
        if (
            last is not None
            and last[0] + last[2] == logical
            and last[1] + last[2] == physical
            and last[2] < fmt.EXT_INIT_MAX_LEN
        ):
            grow = min(length, fmt.EXT_INIT_MAX_LEN - last[2])
            last[2] += grow
        else:
            grow = min(length, fmt.EXT_INIT_MAX_LEN)
            extents.append([logical, physical, grow])
        logical += grow
        physical += grow
        length -= grow


def _write_runs(
    write: Callable[[int, bytes | bytearray | memoryview], None],
    runs: list[tuple[int, int]],
    within: int,
    data: memoryview,
    extents: list[list[int]],
    logical: int,
) -> None:
    """Write ``within`` zeros, ``data`` and zeros up to a block boundary across ``runs``."""
    position = -within  # the index in ``data`` of the first byte of the current run
    for start, length in runs:
        offset = start * BLOCK
        run_end = position + length * BLOCK
        if position < 0:
            write(offset, _ZERO_BLOCK[:-position])
            offset -= position
            position = 0
        piece = data[position:run_end]
        write(offset, piece)
        padding = run_end - position - len(piece)
        if padding:
            write(offset + len(piece), _ZERO_BLOCK[:padding])
        _add_extent(extents, logical, start, length)
        logical += length
        position = run_end


class Ext4Writer:
    """Build an ext4 image on ``fd`` from entries added in any order.

    Paths are sequences of name components (bytes, no ``/``), relative to the root.
    A missing parent directory is created with ``implicit_meta``. ``opaque_xattr`` is the
    overlayfs opaque marker, set on a directory that replaces a whiteout. Call :meth:`close` once,
    with bytes that identify the content; it derives the UUID and hash seed from them.
    """

    def __init__(
        self,
        fd: int,
        *,
        implicit_meta: Metadata,
        max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
        opaque_xattr: xattr_codec.Xattr | None = None,
    ) -> None:
        self.fd = fd
        self.implicit_meta = implicit_meta
        self.opaque_xattr = opaque_xattr
        self._unlinks = 0  # counts unlinks, which end the validity of the parent cache
        self._last_parent_path: tuple[bytes, ...] | None = None
        self._last_parent: Inode | None = None
        self._last_parent_unlinks = -1
        self.allocator = BlockAllocator.for_max_size(max_size_bytes)
        self.sink = _DataSink(fd)
        self._inodes: list[Inode | None] = [None] * fmt.EXT4_GOOD_OLD_FIRST_INO
        self._shared_ints: dict[int, int] = {}
        self._last_times_ns: int | tuple[int, int, int, int] = 0
        self._closed = False

        root = Inode(fmt.EXT4_ROOT_INO, fmt.S_IFDIR | 0o755, implicit_meta)
        root.children = {}
        root.parent = fmt.EXT4_ROOT_INO
        root.links = 2
        self._inodes[fmt.EXT4_ROOT_INO] = root

        # e2fsck wants lost+found as a directory in the root; mke2fs gives it inode 11.
        lost_meta = Metadata(0o700, 0, 0, *(implicit_meta.mtime_ns,) * 4)
        lost = self._new_inode(fmt.S_IFDIR | 0o700, lost_meta)
        self._link_directory(root, LOST_AND_FOUND, lost)

    # -- lookups -------------------------------------------------------------------------

    @property
    def root(self) -> Inode:
        root = self._inodes[fmt.EXT4_ROOT_INO]
        assert root is not None
        return root

    def inode(self, number: int) -> Inode:
        inode = self._inodes[number]
        assert inode is not None
        return inode

    def lookup(self, path: Sequence[bytes]) -> Inode | None:
        """Return the inode at ``path``, or None. Symlinks are not followed."""
        node = self.root
        for name in path:
            if node.children is None:
                return None
            number = node.children.get(name)
            if number is None:
                return None
            node = self.inode(number)
        return node

    # -- adding entries ------------------------------------------------------------------

    def add_directory(self, path: Sequence[bytes], meta: Metadata) -> Inode:
        """Create a directory, or give an existing one ``meta`` (two entries merge).

        A merge keeps the opaque marker: it describes the lower layers, whatever the order
        of the entries. A directory that replaces a whiteout becomes opaque, because the
        whiteout marked the lower layers' directory as deleted.
        """
        parent, name = self._parent_of(path)
        existing = self.root if parent is None else self._child(parent, name)
        if existing is not None and existing.is_dir:
            existing.meta = self._keep_opaque(existing.meta, meta)
            existing.mode = fmt.S_IFDIR | meta.permissions
            return existing
        assert parent is not None
        replaces_whiteout = existing is not None and self.is_whiteout(existing)
        if existing is not None:
            self._unlink(parent, name)
        inode = self._new_inode(fmt.S_IFDIR | meta.permissions, meta)
        self._link_directory(parent, name, inode)
        if replaces_whiteout and self.opaque_xattr is not None:
            self.set_xattr(inode, self.opaque_xattr)
        return inode

    def _keep_opaque(self, old: Metadata, new: Metadata) -> Metadata:
        marker = self.opaque_xattr
        if marker is None or marker not in old.xattrs or marker in new.xattrs:
            return new
        return dataclasses.replace(new, xattrs=(*new.xattrs, marker))

    @staticmethod
    def is_whiteout(inode: Inode) -> bool:
        """Tell whether ``inode`` is an overlayfs whiteout: a character device 0/0."""
        return inode.mode & fmt.S_IFMT == fmt.S_IFCHR and inode.payload == WHITEOUT_DEVICE

    def add_regular_file(
        self,
        path: Sequence[bytes],
        meta: Metadata,
        size: int,
        chunks: Iterable[tuple[int, bytes | bytearray | memoryview]],
    ) -> Inode:
        """Create a regular file of logical ``size`` from (offset, data) chunks.

        Chunks come in increasing offset order; the gaps between them are holes.
        """
        parent, name = self._require_parent(path)
        extents = self._write_data(chunks)

        inode = self._new_inode(fmt.S_IFREG | meta.permissions, meta)
        inode.size = size
        inode.extents = extents
        self._replace(parent, name, inode)
        return inode

    def _write_data(self, chunks: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> bytes:
        """Write a file's data to new blocks; return its packed extents.

        Every block that a chunk touches is allocated, in logical order, and written at once:
        zeros before a chunk that starts inside a new block, zeros after one that ends inside
        a block. A chunk that starts inside the block placed last overwrites its zeros.
        """
        allocate = self.allocator.allocate
        write = self.sink.write
        extents: list[list[int]] = []
        next_logical = 0  # the logical block after the last one placed
        last_physical = 0  # the physical block of the last one placed

        for offset, chunk in chunks:
            data = chunk
            length = len(data)
            if not length:
                continue
            logical, within = divmod(offset, BLOCK)
            if logical < next_logical:
                if logical != next_logical - 1:
                    raise InvalidArgumentError(
                        f"invalid file data at byte {offset}: chunks must come in increasing "
                        "offset order"
                    )
                count = min(BLOCK - within, length)
                view = memoryview(data)
                write(last_physical * BLOCK + within, view[:count])
                if count == length:
                    continue
                data = view[count:]
                length -= count
                logical += 1
                within = 0

            count = (within + length + BLOCK - 1) // BLOCK
            runs = allocate(count)
            if len(runs) == 1 and not within:
                # The common case: one run from a block boundary.
                start = runs[0][0]
                write(start * BLOCK, data)
                padding = count * BLOCK - length
                if padding:
                    write(start * BLOCK + length, _ZERO_BLOCK[:padding])
                _add_extent(extents, logical, start, count)
            else:
                _write_runs(write, runs, within, memoryview(data), extents, logical)
            last_run_start, last_run_length = runs[-1]
            last_physical = last_run_start + last_run_length - 1
            next_logical = logical + count

        return pack_extents([Extent(lo, ph, ln) for lo, ph, ln in extents])

    def add_symlink(self, path: Sequence[bytes], meta: Metadata, target: bytes) -> Inode:
        """Create a symlink; short targets live in i_block, longer ones in a data block."""
        if not target:
            raise InvalidArgumentError(f"invalid symlink {_show(path)}: empty target")
        if len(target) >= BLOCK:
            raise UnsupportedError(
                f"symlink {_show(path)} has a {len(target)}-byte target; ext4 allows "
                f"at most {BLOCK - 1}"
            )
        parent, name = self._require_parent(path)
        inode = self._new_inode(fmt.S_IFLNK | meta.permissions, meta)
        inode.size = len(target)
        if len(target) <= _FAST_SYMLINK_MAX_BYTES:
            inode.payload = target
        else:
            inode.extents = self._write_data([(0, target)])
        self._replace(parent, name, inode)
        return inode

    def add_special(
        self, path: Sequence[bytes], meta: Metadata, file_type: int, major: int = 0, minor: int = 0
    ) -> Inode:
        """Create a character or block device, a FIFO or a socket (``file_type`` is S_IF*)."""
        if file_type not in (fmt.S_IFCHR, fmt.S_IFBLK, fmt.S_IFIFO, fmt.S_IFSOCK):
            raise InvalidArgumentError(f"invalid special file type {file_type:#o}")
        parent, name = self._require_parent(path)
        inode = self._new_inode(file_type | meta.permissions, meta)
        if file_type in (fmt.S_IFCHR, fmt.S_IFBLK):
            inode.payload = encode_device(major, minor)
        self._replace(parent, name, inode)
        return inode

    def add_hard_link(self, path: Sequence[bytes], target: Inode) -> None:
        """Give ``target`` (not a directory) one more name."""
        if target.is_dir:
            raise InvalidArgumentError(
                f"invalid hard link {_show(path)}: its target is a directory"
            )
        if target.links >= _MAX_FILE_LINKS:
            raise UnsupportedError(
                f"hard link {_show(path)} would give inode {target.number} more than "
                f"{_MAX_FILE_LINKS} links, the ext4 maximum"
            )
        parent, name = self._require_parent(path)
        if self._child(parent, name) is target:
            return
        self._replace(parent, name, target)

    def set_xattr(self, inode: Inode, xattr: xattr_codec.Xattr) -> None:
        """Set one attribute on ``inode``, replacing one of the same name."""
        kept = tuple(
            x for x in inode.xattrs if (x.name_index, x.name) != (xattr.name_index, xattr.name)
        )
        xattrs = (*kept, xattr)
        xattr_codec.split_inode_and_block(xattrs)  # raises now if they cannot be stored
        inode.xattrs = xattrs

    def ensure_directory(self, path: Sequence[bytes], *, entry: Sequence[bytes] = ()) -> Inode:
        """Return the directory at ``path``, creating it and its parents implicitly.

        A whiteout in the way is replaced by an opaque directory. A symlink in the way is
        never followed, and any other file in the way rejects the path, as Docker's own
        applier fails on it.
        """
        node = self.root
        for index, name in enumerate(path):
            child = self._child(node, name)
            if child is not None and self.is_whiteout(child):
                self._unlink(node, name)
                child = None
                replaced_whiteout = True
            else:
                replaced_whiteout = False
            if child is None:
                _check_name(name, entry or path)
                child = self._new_inode(
                    fmt.S_IFDIR | self.implicit_meta.permissions, self.implicit_meta
                )
                self._link_directory(node, name, child)
                if replaced_whiteout and self.opaque_xattr is not None:
                    self.set_xattr(child, self.opaque_xattr)
            elif child.mode & fmt.S_IFMT == fmt.S_IFLNK:
                raise InvalidArgumentError(
                    f"invalid path {_show(entry or path)}: {_show(path[: index + 1])} is a "
                    "symlink of this layer, and lcow does not follow symlinks; put the entry "
                    "under the symlink's target"
                )
            elif not child.is_dir:
                raise InvalidArgumentError(
                    f"invalid path {_show(entry or path)}: {_show(path[: index + 1])} is "
                    "not a directory"
                )
            node = child
        return node

    # -- tree plumbing -------------------------------------------------------------------

    def _new_inode(self, mode: int, meta: Metadata) -> Inode:
        for xattr in meta.xattrs:
            if len(xattr.name) > fmt.EXT4_NAME_LEN:
                raise InvalidArgumentError(f"invalid xattr name {xattr.name!r}: too long")
        if meta.xattrs:
            xattr_codec.split_inode_and_block(meta.xattrs)  # raises if they cannot be stored
        number = len(self._inodes)
        # Inodes share the int objects of repeated values, because in CPython each int above
        # 256 is a separate object of about 32 bytes. A layer has few distinct modes and
        # owners, and consecutive entries often have the same times.
        shared = self._shared_ints.setdefault
        inode = Inode(number, shared(mode, mode), meta)
        inode.uid = shared(meta.uid, meta.uid)
        inode.gid = shared(meta.gid, meta.gid)
        if inode.times_ns == self._last_times_ns:
            inode.times_ns = self._last_times_ns
        else:
            self._last_times_ns = inode.times_ns
        self._inodes.append(inode)
        return inode

    def _child(self, parent: Inode, name: bytes) -> Inode | None:
        assert parent.children is not None
        number = parent.children.get(name)
        return None if number is None else self.inode(number)

    def _parent_of(self, path: Sequence[bytes]) -> tuple[Inode | None, bytes]:
        if not path:
            return None, b""
        _check_name(path[-1], path)
        parent_path = tuple(path[:-1])
        # Tar entries come grouped by folder, so the last parent is usually the next one.
        # Any unlink may remove that folder, so the cache holds only until the next unlink.
        if parent_path == self._last_parent_path and self._unlinks == self._last_parent_unlinks:
            assert self._last_parent is not None
            return self._last_parent, path[-1]
        parent = self.ensure_directory(parent_path, entry=path)
        self._last_parent_path = parent_path
        self._last_parent = parent
        self._last_parent_unlinks = self._unlinks
        return parent, path[-1]

    def _require_parent(self, path: Sequence[bytes]) -> tuple[Inode, bytes]:
        parent, name = self._parent_of(path)
        if parent is None:
            raise InvalidArgumentError("invalid entry: only a directory may stand for the root")
        return parent, name

    def _link_directory(self, parent: Inode, name: bytes, inode: Inode) -> None:
        assert parent.children is not None
        inode.children = {}
        inode.parent = parent.number
        inode.links = 2
        parent.children[name] = inode.number
        parent.links += 1

    def _replace(self, parent: Inode, name: bytes, inode: Inode) -> None:
        """Link ``inode`` at ``name``; a later entry for a name replaces the earlier one."""
        assert parent.children is not None
        if name in parent.children:
            self._unlink(parent, name)
        parent.children[name] = inode.number
        inode.links += 1

    def _unlink(self, parent: Inode, name: bytes) -> None:
        """Remove ``name`` from ``parent``; a directory goes with its whole subtree."""
        assert parent.children is not None
        self._unlinks += 1
        inode = self.inode(parent.children.pop(name))
        if inode.is_dir:
            parent.links -= 1
            assert inode.children is not None
            for child_name in list(inode.children):
                self._unlink(inode, child_name)
            self._free(inode)
            return
        inode.links -= 1
        if inode.links == 0:
            self._free(inode)

    def _free(self, inode: Inode) -> None:
        runs = [
            (physical, length)
            for _, physical, length in _iter_extents(inode.extents, inode.extent_count)
        ]
        self.allocator.release(runs)
        self._inodes[inode.number] = None

    # -- close ---------------------------------------------------------------------------

    def close(self, content_identity: bytes) -> int:
        """Write all metadata and return the image size in bytes.

        ``content_identity`` is a digest of the input (for example the BLAKE3 digest of the tar
        stream); the filesystem UUID and directory hash seed derive from it so that the same
        input always gives the same image.
        """
        if self._closed:
            raise RuntimeError("Ext4Writer.close() called twice")
        self._closed = True
        self.sink.flush()
        return _Finisher(self, content_identity).run()

    def iter_inodes(self) -> Iterable[Inode]:
        return (inode for inode in self._inodes if inode is not None)

    @property
    def inode_slots(self) -> int:
        """The highest inode number in use plus one."""
        return len(self._inodes)


def _show(path: Sequence[bytes]) -> str:
    """Render a path for a message: UTF-8 where it is, escapes for other bytes."""
    return repr(b"/".join(path).decode("utf-8", "backslashreplace"))


def _check_name(name: bytes, path: Sequence[bytes]) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgumentError(f"invalid path component {name!r} in {_show(path)}")
    if len(name) > fmt.EXT4_NAME_LEN:
        raise InvalidArgumentError(
            f"invalid path {_show(path)}: the component {name[:40]!r}... is "
            f"{len(name)} bytes, ext4 allows at most {fmt.EXT4_NAME_LEN}"
        )


def _iter_extents(packed: bytes, count: int) -> Iterable[tuple[int, int, int]]:
    for offset in range(0, count * fmt.EXTENT.size, fmt.EXTENT.size):
        logical, length, start_hi, start_lo = fmt.EXTENT.unpack_from(packed, offset)
        yield logical, (start_hi << 32) | start_lo, length


def _dir_entry_size(name_length: int) -> int:
    return (fmt.DIR_ENTRY_HEADER.size + name_length + 3) & ~3


class _Finisher:
    """Lay out and write everything that follows the data, in one pass."""

    def __init__(self, writer: Ext4Writer, content_identity: bytes) -> None:
        self.writer = writer
        self.allocator = writer.allocator
        digest = hashlib.sha256(b"lcow ext4 uuid\0" + content_identity).digest()
        self.uuid = uuid_module.UUID(bytes=digest[:16], version=4).bytes
        self.hash_seed = uuid_module.UUID(
            bytes=hashlib.sha256(b"lcow ext4 hash seed\0" + content_identity).digest()[:16],
            version=4,
        ).bytes
        self.seed = filesystem_seed(self.uuid)
        self.extra_blocks: dict[int, int] = {}  # inode number -> tree and xattr blocks
        self.tree_roots: dict[int, bytes] = {}  # i_block of inodes with extent index blocks
        self._time_cache = (0, encode_time(0))  # the last time in ns and its encoding
        self.xattr_block: dict[int, int] = {}
        self.inline_xattrs: dict[int, bytes] = {}

    def run(self) -> int:
        self._write_directories()
        self._write_extent_trees()
        self._write_xattr_blocks()
        self.writer.sink.flush()
        return self._write_tables()

    def _inode_seed(self, number: int) -> int:
        # ext4_inode_csum_seed: the fs seed, then the inode number, then i_generation (0).
        return crc32c_raw(self.seed, number.to_bytes(4, "little") + bytes(4))

    # Directories ------------------------------------------------------------------------

    def _write_directories(self) -> None:
        writer = self.writer
        tail_offset = BLOCK - fmt.DIR_ENTRY_TAIL.size
        for inode in list(writer.iter_inodes()):
            if inode.children is None:
                continue
            blocks = self._directory_blocks(inode, inode.children)

            seed = self._inode_seed(inode.number)
            runs = self.allocator.allocate(len(blocks))
            extents: list[Extent] = []
            index = 0
            for start, length in runs:
                extents.append(Extent(index, start, length))
                for offset in range(length):
                    data = blocks[index + offset]
                    checksum = crc32c_raw(seed, data[:tail_offset])
                    fmt.DIR_ENTRY_TAIL.pack_into(
                        data,
                        tail_offset,
                        0,
                        fmt.DIR_ENTRY_TAIL.size,
                        0,
                        fmt.EXT4_DIR_TAIL_FILE_TYPE,
                        checksum,
                    )
                    writer.sink.write((start + offset) * BLOCK, data)
                index += length
            inode.size = len(blocks) * BLOCK
            inode.extents = pack_extents(extents)

    def _directory_blocks(self, inode: Inode, children: dict[bytes, int]) -> list[bytearray]:
        """Pack ".", ".." and the children into linear directory blocks, without tails."""
        tail_offset = BLOCK - fmt.DIR_ENTRY_TAIL.size
        pack_header = fmt.DIR_ENTRY_HEADER.pack_into
        inodes = self.writer._inodes
        file_types = _FILE_TYPE_BY_MODE

        # "." and ".." always fit the first block.
        block = bytearray(BLOCK)
        dot_size = _dir_entry_size(1)
        pack_header(block, 0, inode.number, dot_size, 1, fmt.FileType.DIR)
        block[8:9] = b"."
        pack_header(block, dot_size, inode.parent, _dir_entry_size(2), 2, fmt.FileType.DIR)
        block[dot_size + 8 : dot_size + 10] = b".."
        last_entry = dot_size
        used = dot_size + _dir_entry_size(2)

        blocks: list[bytearray] = []
        for name, number in children.items():
            name_length = len(name)
            size = (fmt.DIR_ENTRY_HEADER.size + name_length + 3) & ~3
            if used + size > tail_offset:
                self._close_dir_block(block, last_entry)
                blocks.append(block)
                block = bytearray(BLOCK)
                used = 0
            child = inodes[number]
            assert child is not None
            pack_header(block, used, number, size, name_length, file_types[child.mode & _S_IFMT])
            block[used + 8 : used + 8 + name_length] = name
            last_entry = used
            used += size
        self._close_dir_block(block, last_entry)
        blocks.append(block)
        return blocks

    @staticmethod
    def _close_dir_block(block: bytearray, last_entry: int) -> None:
        # The last real entry's rec_len reaches the checksum tail, as e2fsck requires.
        tail_offset = BLOCK - fmt.DIR_ENTRY_TAIL.size
        record_length = tail_offset - last_entry
        block[last_entry + 4 : last_entry + 6] = record_length.to_bytes(2, "little")

    # Extent trees and xattr blocks --------------------------------------------------------

    def _write_extent_trees(self) -> None:
        """Write the index and leaf blocks of inodes with more extents than i_block holds.

        The roots of other inodes are built when their inode is packed, see :func:`leaf_root`.
        """
        writer = self.writer
        max_root_bytes = fmt.INODE_EXTENT_SLOTS * fmt.EXTENT.size
        allocate_block = functools.partial(self.allocator.allocate_contiguous, 1)
        for inode in writer.iter_inodes():
            if len(inode.extents) <= max_root_bytes:
                continue
            tree = build_tree(inode.extent_count, inode.extents, allocate_block)
            self.tree_roots[inode.number] = tree.root
            if tree.node_blocks:
                self.extra_blocks[inode.number] = len(tree.node_blocks)
                for block_number, data in tree.finish(self._inode_seed(inode.number)):
                    writer.sink.write(block_number * BLOCK, data)

    def _write_xattr_blocks(self) -> None:
        writer = self.writer
        for inode in writer.iter_inodes():
            if not inode.xattrs:
                continue
            in_inode, in_block = xattr_codec.split_inode_and_block(inode.xattrs)
            self.inline_xattrs[inode.number] = xattr_codec.encode_inode_area(in_inode)
            if in_block:
                block_number = self.allocator.allocate_contiguous(1)
                writer.sink.write(
                    block_number * BLOCK,
                    xattr_codec.encode_block(in_block, block_number, self.seed),
                )
                self.xattr_block[inode.number] = block_number
                self.extra_blocks[inode.number] = self.extra_blocks.get(inode.number, 0) + 1

    # Inode tables, bitmaps, descriptors, superblocks --------------------------------------

    def _plan_groups(self) -> tuple[int, int, list[int], list[int], list[int], int]:
        """Find the group count, inodes per group and where each group's tables go."""
        allocator = self.allocator
        inode_count = self.writer.inode_slots - 1
        saved_next, saved_free = allocator.next_block, list(allocator.free_runs)
        groups = max(
            -(-allocator.next_block // fmt.BLOCKS_PER_GROUP),
            -(-inode_count // fmt.MAX_INODES_PER_GROUP),
            1,
        )
        while True:
            allocator.next_block, allocator.free_runs = saved_next, list(saved_free)
            per_group = -(-inode_count // groups)
            inodes_per_group = -(-per_group // fmt.INODES_PER_BLOCK) * fmt.INODES_PER_BLOCK
            table_blocks = inodes_per_group // fmt.INODES_PER_BLOCK
            block_bitmaps = [allocator.allocate_contiguous(1) for _ in range(groups)]
            inode_bitmaps = [allocator.allocate_contiguous(1) for _ in range(groups)]
            inode_tables = [allocator.allocate_contiguous(table_blocks) for _ in range(groups)]
            end = allocator.next_block
            needed = -(-end // fmt.BLOCKS_PER_GROUP)
            if needed <= groups:
                break
            groups = needed

        # Every group must exist: the last one has at least one block, and a superblock copy
        # at its head must fit whole.
        blocks_count = max(end, (groups - 1) * fmt.BLOCKS_PER_GROUP + 1)
        last_group_start = (groups - 1) * fmt.BLOCKS_PER_GROUP
        if groups - 1 in backup_groups(groups) or groups == 1:
            blocks_count = max(blocks_count, last_group_start + 1 + descriptor_blocks(groups))
        return groups, inodes_per_group, block_bitmaps, inode_bitmaps, inode_tables, blocks_count

    def _write_tables(self) -> int:
        writer = self.writer
        (
            groups,
            inodes_per_group,
            block_bitmaps,
            inode_bitmaps,
            inode_tables,
            blocks_count,
        ) = self._plan_groups()
        gdt_blocks = descriptor_blocks(groups)
        sb_groups = [0, *(g for g in backup_groups(groups) if g < groups)]

        # Used blocks: everything below blocks_count except the free runs and the unused
        # tail of each superblock region.
        free_runs = list(self.allocator.free_runs)
        for region in self.allocator.regions:
            if region.group in sb_groups:
                free_runs.append(
                    (region.start + 1 + gdt_blocks, region.end - region.start - 1 - gdt_blocks)
                )
            elif region.start < blocks_count:
                free_runs.append((region.start, region.end - region.start))
        if self.allocator.next_block < blocks_count:
            free_runs.append((self.allocator.next_block, blocks_count - self.allocator.next_block))

        block_bitmap_data = self._block_bitmaps(groups, blocks_count, free_runs)
        free_blocks_total = 0
        free_blocks: list[int] = []
        for group in range(groups):
            group_blocks = min(fmt.BLOCKS_PER_GROUP, blocks_count - group * fmt.BLOCKS_PER_GROUP)
            used = _count_bits(block_bitmap_data[group], group_blocks)
            free_blocks.append(group_blocks - used)
            free_blocks_total += group_blocks - used

        # Inode tables and inode bitmaps, one group at a time.
        inode_count = groups * inodes_per_group
        used_inodes = 0
        descriptors = bytearray(gdt_blocks * BLOCK)
        for group in range(groups):
            table, bitmap, used_here, used_dirs = self._inode_table(group, inodes_per_group)
            used_inodes += used_here
            _pwrite_all(writer.fd, table, inode_tables[group] * BLOCK)
            _pwrite_all(writer.fd, bitmap, inode_bitmaps[group] * BLOCK)
            _pwrite_all(writer.fd, block_bitmap_data[group], block_bitmaps[group] * BLOCK)

            block_bitmap_csum = crc32c_raw(
                self.seed, block_bitmap_data[group][: fmt.BLOCKS_PER_GROUP // 8]
            )
            inode_bitmap_csum = crc32c_raw(self.seed, bitmap[: inodes_per_group // 8])
            descriptor = bytearray(
                fmt.GROUP_DESC.pack(
                    block_bitmaps[group],
                    inode_bitmaps[group],
                    inode_tables[group],
                    free_blocks[group],
                    inodes_per_group - used_here,
                    used_dirs,
                    fmt.BgFlags.INODE_ZEROED,
                    0,
                    block_bitmap_csum & 0xFFFF,
                    inode_bitmap_csum & 0xFFFF,
                    0,
                    0,
                )
            )
            checksum = crc32c_raw(self.seed, group.to_bytes(4, "little"))
            checksum = crc32c_raw(checksum, descriptor)
            descriptor[fmt.GROUP_DESC_CHECKSUM_OFFSET :] = (checksum & 0xFFFF).to_bytes(2, "little")
            offset = group * fmt.GROUP_DESC.size
            descriptors[offset : offset + fmt.GROUP_DESC.size] = descriptor

        superblock = self._superblock(
            blocks_count,
            inode_count,
            inodes_per_group,
            free_blocks_total,
            inode_count - used_inodes,
        )
        for group in sb_groups:
            start = group * fmt.BLOCKS_PER_GROUP
            copy = self._with_group_number(superblock, group)
            if group == 0:
                _pwrite_all(writer.fd, copy, fmt.SUPERBLOCK_OFFSET_BYTES)
            else:
                _pwrite_all(writer.fd, copy, start * BLOCK)
            _pwrite_all(writer.fd, descriptors, (start + 1) * BLOCK)

        size_bytes = blocks_count * BLOCK
        set_size(writer.fd, size_bytes)
        return size_bytes

    def _block_bitmaps(
        self, groups: int, blocks_count: int, free_runs: list[tuple[int, int]]
    ) -> list[bytearray]:
        # Bits past the end of the filesystem stay set: e2fsck requires that padding.
        bitmaps = [bytearray(b"\xff" * BLOCK) for _ in range(groups)]
        for start, length in free_runs:
            for block in range(start, min(start + length, blocks_count)):
                group, index = divmod(block, fmt.BLOCKS_PER_GROUP)
                bitmaps[group][index >> 3] &= ~(1 << (index & 7)) & 0xFF
        return bitmaps

    def _inode_table(
        self, group: int, inodes_per_group: int
    ) -> tuple[bytearray, bytearray, int, int]:
        """Encode a group's inode table and inode bitmap; also count used inodes and dirs."""
        inodes = self.writer._inodes
        first = group * inodes_per_group + 1
        table = bytearray(inodes_per_group * fmt.INODE_SIZE_BYTES)
        bitmap = bytearray(BLOCK)
        used_here = 0
        used_dirs = 0

        # The inodes below EXT4_GOOD_OLD_FIRST_INO are reserved: in use even when empty.
        for index in range(max(0, min(inodes_per_group, fmt.EXT4_GOOD_OLD_FIRST_INO - first))):
            bitmap[index >> 3] |= 1 << (index & 7)
            used_here += 1

        pack_inode = self._pack_inode
        last = min(first + inodes_per_group, len(inodes))
        for number in range(first, last):
            inode = inodes[number]
            if inode is None:
                continue
            index = number - first
            if number >= fmt.EXT4_GOOD_OLD_FIRST_INO:
                bitmap[index >> 3] |= 1 << (index & 7)
                used_here += 1
            if inode.mode & _S_IFMT == _S_IFDIR:
                used_dirs += 1
            pack_inode(table, index * fmt.INODE_SIZE_BYTES, inode)

        # e2fsck requires the bits past the last inode of the bitmap block to be set.
        full_bytes_from = -(-inodes_per_group // 8)
        for index in range(inodes_per_group, full_bytes_from * 8):
            bitmap[index >> 3] |= 1 << (index & 7)
        bitmap[full_bytes_from:] = b"\xff" * (BLOCK - full_bytes_from)
        return table, bitmap, used_here, used_dirs

    def _pack_inode(self, table: bytearray, offset: int, inode: Inode) -> None:
        """Encode ``inode`` into the zeroed slot at ``offset`` of ``table``, checksum included."""
        number = inode.number
        mode = inode.mode
        kind = mode & _S_IFMT
        flags = 0
        if kind == _S_IFLNK and inode.payload:
            i_block = inode.payload  # "60s" pads the target with NULs
        elif kind in _DEVICE_KINDS:
            i_block = inode.payload
        elif kind in _EXTENT_KINDS:
            i_block = self.tree_roots.get(number) or leaf_root(inode.extents)
            flags = _EXTENTS_FL
        else:
            i_block = b""

        links = inode.links
        if kind == _S_IFDIR and links > fmt.EXT4_LINK_MAX:
            links = 1  # dir_nlink: a count that no longer fits is stored as 1
        sectors = (inode.data_blocks + self.extra_blocks.get(number, 0)) * (BLOCK // 512)

        # Most inodes have one time for all four fields, often the time of the last inode.
        times_ns = inode.times_ns
        if isinstance(times_ns, int):
            if times_ns != self._time_cache[0]:
                self._time_cache = (times_ns, encode_time(times_ns))
            mtime, mtime_extra = self._time_cache[1]
            atime, atime_extra = ctime, ctime_extra = crtime, crtime_extra = mtime, mtime_extra
        else:
            mtime_ns, atime_ns, ctime_ns, crtime_ns = times_ns
            mtime, mtime_extra = encode_time(mtime_ns)
            atime, atime_extra = encode_time(atime_ns)
            ctime, ctime_extra = encode_time(ctime_ns)
            crtime, crtime_extra = encode_time(crtime_ns)

        _inode.pack_inode(
            table,
            offset,
            number,
            self.seed,
            mode,
            inode.uid,
            inode.gid,
            inode.size,
            links,
            sectors,
            flags,
            i_block,
            self.xattr_block.get(number, 0),
            mtime,
            mtime_extra,
            atime,
            atime_extra,
            ctime,
            ctime_extra,
            crtime,
            crtime_extra,
            self.inline_xattrs.get(number),
        )

    def _superblock(
        self,
        blocks_count: int,
        inode_count: int,
        inodes_per_group: int,
        free_blocks: int,
        free_inodes: int,
    ) -> bytes:
        values = {name: (b"" if code.endswith("s") else 0) for name, code in fmt.SUPERBLOCK_FIELDS}
        values.update(
            s_inodes_count=inode_count,
            s_blocks_count_lo=blocks_count,
            s_free_blocks_count_lo=free_blocks,
            s_free_inodes_count=free_inodes,
            s_first_data_block=0,
            s_log_block_size=fmt.LOG_BLOCK_SIZE,
            s_log_cluster_size=fmt.LOG_BLOCK_SIZE,
            s_blocks_per_group=fmt.BLOCKS_PER_GROUP,
            s_clusters_per_group=fmt.BLOCKS_PER_GROUP,
            s_inodes_per_group=inodes_per_group,
            s_max_mnt_count=-1,
            s_magic=fmt.EXT4_SUPER_MAGIC,
            s_state=fmt.FsState.VALID_FS,
            s_errors=fmt.ErrorsBehaviour.CONTINUE,
            s_creator_os=fmt.EXT4_OS_LINUX,
            s_rev_level=fmt.EXT4_DYNAMIC_REV,
            s_first_ino=fmt.EXT4_GOOD_OLD_FIRST_INO,
            s_inode_size=fmt.INODE_SIZE_BYTES,
            s_feature_compat=fmt.FeatureCompat.EXT_ATTR,
            s_feature_incompat=(
                fmt.FeatureIncompat.FILETYPE
                | fmt.FeatureIncompat.EXTENTS
                | fmt.FeatureIncompat.FLEX_BG
            ),
            s_feature_ro_compat=(
                fmt.FeatureRoCompat.SPARSE_SUPER
                | fmt.FeatureRoCompat.LARGE_FILE
                | fmt.FeatureRoCompat.HUGE_FILE
                | fmt.FeatureRoCompat.DIR_NLINK
                | fmt.FeatureRoCompat.EXTRA_ISIZE
                | fmt.FeatureRoCompat.METADATA_CSUM
            ),
            s_uuid=self.uuid,
            s_hash_seed=self.hash_seed,
            s_def_hash_version=fmt.DX_HASH_HALF_MD4,
            s_default_mount_opts=fmt.EXT4_DEFM_XATTR_USER | fmt.EXT4_DEFM_ACL,
            s_min_extra_isize=fmt.EXTRA_ISIZE_BYTES,
            s_want_extra_isize=fmt.EXTRA_ISIZE_BYTES,
            s_flags=fmt.SuperFlags.UNSIGNED_HASH,
            s_log_groups_per_flex=4,
            s_checksum_type=fmt.EXT4_CRC32C_CHKSUM,
        )
        return fmt.SUPERBLOCK.pack(*(values[name] for name, _ in fmt.SUPERBLOCK_FIELDS))

    @staticmethod
    def _with_group_number(superblock: bytes, group: int) -> bytes:
        copy = bytearray(superblock)
        copy[0x5A:0x5C] = group.to_bytes(2, "little")  # s_block_group_nr
        checksum = crc32c_raw(0xFFFFFFFF, copy[: fmt.SUPERBLOCK_CHECKSUM_OFFSET])
        copy[fmt.SUPERBLOCK_CHECKSUM_OFFSET :] = checksum.to_bytes(4, "little")
        return bytes(copy)


def _count_bits(bitmap: bytearray, bit_count: int) -> int:
    whole = bit_count // 8
    total = int.from_bytes(bitmap[:whole], "little").bit_count()
    for index in range(whole * 8, bit_count):
        total += (bitmap[index >> 3] >> (index & 7)) & 1
    return total
