"""A read-only ext4 reader for layer images and kernel-written sandboxes.

It reads what mke2fs 1.47 and the kernel write by default (64bit, flex_bg, metadata_csum,
extent trees of any depth, htree directories read as plain ones, inline data, huge files,
xattrs in the inode and in a block) and what lcow's writer produces. Every checksum is
verified, and every offset, length and count is checked against the filesystem before it
is used, so a corrupt or hostile image raises :class:`CorruptInputError` in time and memory
bounded by the image's size, never a crash or a hang.

A filesystem whose journal needs recovery is rejected: its metadata on disk is not the
metadata the kernel would show. Replay the journal first with ``e2fsck -fy IMAGE``.

Reference: the kernel's ext4 disk-layout documentation and fs/ext4/ext4.h.
"""

import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from lcow.errors import CorruptInputError, LcowError, UnsupportedError
from lcow.ext4 import _inode
from lcow.ext4 import format as fmt
from lcow.ext4.checksum import crc32c_raw, filesystem_seed

_READ_CHUNK_BYTES: Final = 1 << 20
_BLOCK_CACHE_ENTRIES: Final = 1024
# Verified inodes kept for the calls that follow a walk() step: read_data(), iterdir() and
# read_symlink() of the entry just yielded read the same inode again.
_INODE_CACHE_ENTRIES: Final = 256
_INLINE_DATA_XATTR: Final = (fmt.XattrIndex.SYSTEM, b"data")
_GROUP_DESC_64_SIZE: Final = 64
DX_DOT_ENTRY_BYTES: Final = 12  # the "." entry that starts an htree root block
DX_ROOT_INFO_OFFSET: Final = 24  # dx_root_info follows the "." and ".." entries
DX_ENTRY_BYTES: Final = 8  # struct dx_entry: hash and block
DX_TAIL_BYTES: Final = 8  # struct dx_tail: dt_reserved and dt_checksum
JBD2_MAGIC: Final = 0xC03B3998  # journal superblock magic (jbd2, big-endian)

# Incompatible features this reader understands; anything else is refused, because an
# unknown incompatible feature changes how the metadata must be read.
_KNOWN_INCOMPAT: Final = (
    fmt.FeatureIncompat.FILETYPE
    | fmt.FeatureIncompat.EXTENTS
    | fmt.FeatureIncompat.INCOMPAT_64BIT
    | fmt.FeatureIncompat.FLEX_BG
    | fmt.FeatureIncompat.MMP
    | fmt.FeatureIncompat.CSUM_SEED
    | fmt.FeatureIncompat.LARGEDIR
    | fmt.FeatureIncompat.INLINE_DATA
    | fmt.FeatureIncompat.CASEFOLD
    | fmt.FeatureIncompat.RECOVER
)


class BlockDevice(Protocol):
    """Random read access to a disk: a file, a fixed VHD or a VHDX."""

    def pread(self, length: int, offset: int) -> bytes: ...


class FileDevice:
    """A plain file or block device read with ``os.pread``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)


@dataclass(slots=True, init=False)
class InodeInfo:
    """A decoded inode, with times in ns since the epoch."""

    number: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int
    flags: int
    rdev_major: int
    rdev_minor: int
    xattrs: dict[bytes, bytes]

    def __init__(
        self,
        number: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        links: int,
        atime_ns: int,
        mtime_ns: int,
        ctime_ns: int,
        crtime_ns: int,
        flags: int,
        rdev_major: int = 0,
        rdev_minor: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.number = number
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.links = links
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.crtime_ns = crtime_ns
        self.flags = flags
        self.rdev_major = rdev_major
        self.rdev_minor = rdev_minor
        self.xattrs = {} if xattrs is None else xattrs

    @property
    def file_type(self) -> int:
        return self.mode & fmt.S_IFMT


# An extent as (ee_block, physical block, length in blocks, initialized). A plain tuple is
# cheaper to build than a dataclass, which matters because most files have one extent.
_Extent = tuple[int, int, int, bool]

# The struct ext4_inode fields that locate a file's data (little-endian): i_mode, i_size_lo,
# i_flags, i_generation and i_size_high at offsets 0x0, 0x4, 0x20, 0x64 and 0x6C.
_INODE_DATA_FIELDS: Final = struct.Struct("<H2xI24xI64xI4xI")
assert _INODE_DATA_FIELDS.size == 0x70
# The kernel seeds an inode's checksum with its number and i_generation, both 32-bit.
_INODE_SEED_FIELDS: Final = struct.Struct("<II")
_I_EXTRA_ISIZE_OFFSET: Final = 0x80
_EH_DEPTH_OFFSET: Final = 6  # eh_depth in the extent header
# i_flags bits as plain ints, because a test on an IntFlag member runs Python code in enum.
_EXT4_EXTENTS_FL: Final = int(fmt.InodeFlags.EXTENTS)
_EXT4_INLINE_DATA_FL: Final = int(fmt.InodeFlags.INLINE_DATA)
_EXT4_INDEX_FL: Final = int(fmt.InodeFlags.INDEX)


_XATTR_NAME_PREFIX: Final[dict[int, bytes]] = {
    fmt.XattrIndex.USER: b"user.",
    fmt.XattrIndex.POSIX_ACL_ACCESS: b"system.posix_acl_access",
    fmt.XattrIndex.POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    fmt.XattrIndex.TRUSTED: b"trusted.",
    fmt.XattrIndex.SECURITY: b"security.",
    fmt.XattrIndex.SYSTEM: b"system.",
    fmt.XattrIndex.RICHACL: b"system.richacl",
}


class Ext4Reader:
    """Read an ext4 filesystem from ``device`` whose usable size is ``device_size`` bytes."""

    def __init__(self, device: BlockDevice, device_size: int) -> None:
        self.device = device
        self.device_size = device_size
        self._read_block = functools.lru_cache(maxsize=_BLOCK_CACHE_ENTRIES)(
            self._read_block_uncached
        )
        # Only inodes whose checksum matched enter the cache. A failed check raises every time.
        self._raw_inode = functools.lru_cache(maxsize=_INODE_CACHE_ENTRIES)(
            self._raw_inode_uncached
        )
        self._parse_superblock()
        self._parse_group_descriptors()
        if self._needs_recovery and not self._journal_is_empty():
            raise UnsupportedError(
                "the ext4 filesystem needs journal recovery (it was not unmounted cleanly); "
                "replay the journal with 'e2fsck -fy IMAGE' and read it again"
            )

    # Superblock and group descriptors --------------------------------------------------------

    def _corrupt(self, what: str) -> CorruptInputError:
        return CorruptInputError(f"corrupt ext4 filesystem: {what}")

    def _parse_superblock(self) -> None:
        raw = self.device.pread(fmt.SUPERBLOCK_SIZE_BYTES, fmt.SUPERBLOCK_OFFSET_BYTES)
        if len(raw) < fmt.SUPERBLOCK_SIZE_BYTES:
            raise self._corrupt(
                f"the disk ends at byte {fmt.SUPERBLOCK_OFFSET_BYTES + len(raw)}, "
                "before the superblock"
            )
        values = dict(
            zip(
                (name for name, _ in fmt.SUPERBLOCK_FIELDS), fmt.SUPERBLOCK.unpack(raw), strict=True
            )
        )
        if values["s_magic"] != fmt.EXT4_SUPER_MAGIC:
            raise CorruptInputError(
                f"not an ext4 filesystem: magic {values['s_magic']:#06x} at byte 1080, "
                f"expected {fmt.EXT4_SUPER_MAGIC:#06x}"
            )
        self.sb = values
        incompat = values["s_feature_incompat"]
        ro_compat = values["s_feature_ro_compat"]
        self.metadata_csum = bool(ro_compat & fmt.FeatureRoCompat.METADATA_CSUM)
        if self.metadata_csum:
            if values["s_checksum_type"] != fmt.EXT4_CRC32C_CHKSUM:
                raise self._corrupt(f"unknown s_checksum_type {values['s_checksum_type']}")
            expected = crc32c_raw(0xFFFFFFFF, raw[: fmt.SUPERBLOCK_CHECKSUM_OFFSET])
            if expected != values["s_checksum"]:
                raise self._corrupt(
                    f"superblock checksum {values['s_checksum']:#010x} does not match "
                    f"{expected:#010x}"
                )
        self._needs_recovery = bool(incompat & fmt.FeatureIncompat.RECOVER)
        unknown = incompat & ~_KNOWN_INCOMPAT
        if unknown:
            raise UnsupportedError(
                f"unsupported ext4 incompatible features {fmt.FeatureIncompat(unknown)!r}"
            )
        self.incompat = incompat

        log_block_size = values["s_log_block_size"]
        if log_block_size > 6:
            raise self._corrupt(f"s_log_block_size {log_block_size} (blocks above 64 KiB)")
        self.block_size = 1024 << log_block_size
        self.is_64bit = bool(incompat & fmt.FeatureIncompat.INCOMPAT_64BIT)
        self.blocks_count = values["s_blocks_count_lo"]
        if self.is_64bit:
            self.blocks_count |= values["s_blocks_count_hi"] << 32
        if self.blocks_count * self.block_size > self.device_size:
            raise self._corrupt(
                f"{self.blocks_count} blocks of {self.block_size} bytes do not fit on the "
                f"{self.device_size}-byte disk"
            )
        self.inodes_per_group = values["s_inodes_per_group"]
        self.blocks_per_group = values["s_blocks_per_group"]
        self.inode_size = values["s_inode_size"] if values["s_rev_level"] else 128
        if (
            self.inode_size < fmt.GOOD_OLD_INODE_SIZE_BYTES
            or self.inode_size > self.block_size
            or self.inode_size & (self.inode_size - 1)
        ):
            raise self._corrupt(f"s_inode_size {self.inode_size}")
        if not 0 < self.inodes_per_group <= 8 * self.block_size or not (
            0 < self.blocks_per_group <= 8 * self.block_size
        ):
            raise self._corrupt(
                f"{self.inodes_per_group} inodes or {self.blocks_per_group} blocks per group"
            )
        self.first_data_block = values["s_first_data_block"]
        self.group_count = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        self.inodes_count = values["s_inodes_count"]
        if self.inodes_count > self.group_count * self.inodes_per_group:
            raise self._corrupt(f"s_inodes_count {self.inodes_count} exceeds the groups' inodes")
        if incompat & fmt.FeatureIncompat.CSUM_SEED:
            self.seed = values["s_checksum_seed"]
        else:
            self.seed = filesystem_seed(values["s_uuid"])
        self.desc_size = values["s_desc_size"] if self.is_64bit else fmt.GROUP_DESC.size
        if self.desc_size < fmt.GROUP_DESC.size or self.desc_size > self.block_size:
            raise self._corrupt(f"s_desc_size {self.desc_size}")
        if incompat & fmt.FeatureIncompat.META_BG:
            raise UnsupportedError("unsupported ext4 feature meta_bg")

    def _parse_group_descriptors(self) -> None:
        table_start = (self.first_data_block + 1) * self.block_size
        raw = self.device.pread(self.group_count * self.desc_size, table_start)
        if len(raw) < self.group_count * self.desc_size:
            raise self._corrupt("the group descriptor table runs past the end of the disk")
        self.inode_tables: list[int] = []
        for group in range(self.group_count):
            descriptor = raw[group * self.desc_size : (group + 1) * self.desc_size]
            table = int.from_bytes(descriptor[8:12], "little")
            if self.desc_size >= _GROUP_DESC_64_SIZE:
                table |= int.from_bytes(descriptor[0x28:0x2C], "little") << 32
            if self.metadata_csum:
                zeroed = bytearray(descriptor)
                zeroed[fmt.GROUP_DESC_CHECKSUM_OFFSET : fmt.GROUP_DESC_CHECKSUM_OFFSET + 2] = (
                    b"\0\0"
                )
                expected = crc32c_raw(crc32c_raw(self.seed, group.to_bytes(4, "little")), zeroed)
                stored = int.from_bytes(descriptor[0x1E:0x20], "little")
                if expected & 0xFFFF != stored:
                    raise self._corrupt(
                        f"group descriptor {group} checksum {stored:#06x} does not match "
                        f"{expected & 0xFFFF:#06x}"
                    )
            table_blocks = -(-self.inodes_per_group * self.inode_size // self.block_size)
            if not (table > 0 and table + table_blocks <= self.blocks_count):
                raise self._corrupt(f"group {group}'s inode table at block {table}")
            self.inode_tables.append(table)

    def _journal_is_empty(self) -> bool:
        """Tell whether the journal holds no transactions (s_start is 0), as e2fsck checks.

        A mounted filesystem keeps the recovery flag set; once frozen or synced to an empty
        journal, its blocks on disk are consistent and safe to read.
        """
        journal_inode = self.sb["s_journal_inum"]
        if not journal_inode:
            return False
        try:
            first = next(iter(self.read_data(journal_inode)), None)
        except (LcowError, StopIteration):
            return False
        if first is None or first[0] != 0 or len(first[1]) < 0x20:
            return False
        header = first[1]
        magic = int.from_bytes(header[0:4], "big")
        start = int.from_bytes(header[0x1C:0x20], "big")
        return magic == JBD2_MAGIC and start == 0

    # Blocks and inodes -----------------------------------------------------------------------

    def _read_block_uncached(self, number: int) -> bytes:
        if not 0 <= number < self.blocks_count:
            raise self._corrupt(
                f"block {number} lies outside the {self.blocks_count}-block filesystem"
            )
        data = self.device.pread(self.block_size, number * self.block_size)
        if len(data) != self.block_size:
            raise self._corrupt(f"block {number} is cut short by the end of the disk")
        return data

    def read_block(self, number: int) -> bytes:
        return self._read_block(number)

    def _raw_inode_uncached(self, number: int) -> bytes:
        if not 1 <= number <= self.inodes_count:
            raise self._corrupt(f"inode number {number} is outside 1..{self.inodes_count}")
        group, index = divmod(number - 1, self.inodes_per_group)
        offset = self.inode_tables[group] * self.block_size + index * self.inode_size
        block, within = divmod(offset, self.block_size)
        raw = self.read_block(block)[within : within + self.inode_size]
        if self.metadata_csum:
            self._verify_inode(number, raw)
        return raw

    def _inode_seed(self, number: int, generation: int) -> int:
        return crc32c_raw(self.seed, _INODE_SEED_FIELDS.pack(number, generation))

    def _verify_inode(self, number: int, raw: bytes) -> None:
        stored, expected = _inode.checksums(raw, number, self.seed, self.inode_size)
        if expected != stored:
            raise self._corrupt(f"inode {number} checksum {stored:#x} does not match {expected:#x}")

    def inode(self, number: int) -> InodeInfo:
        """Decode inode ``number``, xattrs included."""
        raw = self._raw_inode(number)
        fields = _inode.decode(raw, self.inode_size)
        if fields is None:
            extra_isize = int.from_bytes(
                raw[_I_EXTRA_ISIZE_OFFSET : _I_EXTRA_ISIZE_OFFSET + 2], "little"
            )
            raise self._corrupt(f"inode {number} i_extra_isize {extra_isize}")
        (
            mode,
            uid,
            gid,
            size,
            links,
            atime_ns,
            mtime_ns,
            ctime_ns,
            crtime_ns,
            flags,
            extra_isize,
            has_inode_xattrs,
            xattr_block,
        ) = fields
        info = InodeInfo(
            number, mode, uid, gid, size, links, atime_ns, mtime_ns, ctime_ns, crtime_ns, flags
        )
        kind = mode & fmt.S_IFMT
        if kind in (fmt.S_IFCHR, fmt.S_IFBLK):
            block = raw[fmt.INODE_BLOCK_OFFSET : fmt.INODE_BLOCK_OFFSET + 8]
            old = int.from_bytes(block[0:4], "little")
            new = int.from_bytes(block[4:8], "little")
            if old:
                info.rdev_major, info.rdev_minor = (old >> 8) & 0xFF, old & 0xFF
            else:
                info.rdev_major = (new & 0xFFF00) >> 8
                info.rdev_minor = (new & 0xFF) | ((new >> 12) & 0xFFF00)
        elif kind not in fmt.FILE_TYPE_BY_MODE:
            raise self._corrupt(f"inode {number} has the unknown file type {kind:#o}")
        if has_inode_xattrs or xattr_block:
            info.xattrs = self._read_xattrs(number, raw, extra_isize, has_inode_xattrs, xattr_block)
        return info

    # Extended attributes -----------------------------------------------------------------

    def _read_xattrs(
        self, number: int, raw: bytes, extra_isize: int, in_inode: bool, block_number: int
    ) -> dict[bytes, bytes]:
        """Read the xattrs in the inode (when its area starts with the magic) and its block."""
        xattrs: dict[bytes, bytes] = {}
        if in_inode:
            start = fmt.GOOD_OLD_INODE_SIZE_BYTES + extra_isize
            area = raw[start + 4 : self.inode_size]
            self._parse_xattr_entries(number, area, 0, area, xattrs, "in-inode")

        if block_number:
            block = self.read_block(block_number)
            magic, _refcount, blocks, _hash, stored = fmt.XATTR_BLOCK_HEADER.unpack_from(block)[:5]
            if magic != fmt.EXT4_XATTR_MAGIC or blocks != 1:
                raise self._corrupt(f"inode {number}'s xattr block {block_number} has a bad header")
            if self.metadata_csum:
                zeroed = bytearray(block)
                zeroed[0x10:0x14] = bytes(4)
                expected = crc32c_raw(
                    crc32c_raw(self.seed, block_number.to_bytes(8, "little")), zeroed
                )
                if expected != stored:
                    raise self._corrupt(f"xattr block {block_number} checksum mismatch")
            self._parse_xattr_entries(
                number, block, fmt.XATTR_BLOCK_HEADER.size, block, xattrs, "block"
            )
        return xattrs

    def _parse_xattr_entries(
        self,
        number: int,
        area: bytes,
        offset: int,
        values: bytes,
        out: dict[bytes, bytes],
        where: str,
    ) -> None:
        while offset + 4 <= len(area) and area[offset : offset + 4] != b"\0\0\0\0":
            if offset + fmt.XATTR_ENTRY.size > len(area):
                raise self._corrupt(
                    f"inode {number}'s {where} xattr entry at {offset} is cut short"
                )
            name_len, index, value_offset, value_inum, value_size, _hash = (
                fmt.XATTR_ENTRY.unpack_from(area, offset)
            )
            name_start = offset + fmt.XATTR_ENTRY.size
            name = area[name_start : name_start + name_len]
            if len(name) != name_len:
                raise self._corrupt(f"inode {number}'s {where} xattr name runs past its area")
            if value_inum:
                raise UnsupportedError(
                    f"inode {number} stores an xattr value in inode {value_inum} (ea_inode)"
                )
            if value_offset + value_size > len(values):
                raise self._corrupt(
                    f"inode {number}'s {where} xattr {name!r} value at {value_offset} "
                    f"({value_size} bytes) runs past its area"
                )
            prefix = _XATTR_NAME_PREFIX.get(index)
            if prefix is None:
                raise self._corrupt(f"inode {number} has xattr name index {index}")
            out[prefix + name] = bytes(values[value_offset : value_offset + value_size])
            offset = name_start + ((name_len + 3) & ~3)

    # Extents and data ----------------------------------------------------------------------

    def _extents(
        self, number: int, raw: bytes, size: int, flags: int, generation: int
    ) -> list[_Extent]:
        if not flags & _EXT4_EXTENTS_FL:
            if size == 0:
                return []
            raise UnsupportedError(
                f"inode {number} maps its data with indirect blocks; lcow reads extent-mapped "
                "files only"
            )
        i_block = raw[fmt.INODE_BLOCK_OFFSET : fmt.INODE_BLOCK_OFFSET + fmt.INODE_BLOCK_SIZE_BYTES]
        extents: list[_Extent] = []
        if int.from_bytes(i_block[_EH_DEPTH_OFFSET : _EH_DEPTH_OFFSET + 2], "little") == 0:
            # A tree of depth 0 lies entirely in the inode, whose checksum is already verified,
            # so it needs no seed for extent block checksums.
            seed = 0
        else:
            seed = self._inode_seed(number, generation)
        visited: set[int] = set()
        self._walk_node(number, i_block, None, seed, fmt.EXT_MAX_DEPTH, visited, extents)

        previous_end = 0
        blocks_count = self.blocks_count
        for logical, physical, length, _initialized in extents:
            if logical < previous_end:
                raise self._corrupt(f"inode {number}'s extents overlap or are out of order")
            if physical + length > blocks_count or physical == 0:
                raise self._corrupt(f"inode {number} has an extent outside the filesystem")
            previous_end = logical + length
        return extents

    def _walk_node(
        self,
        number: int,
        node: bytes,
        block_number: int | None,
        seed: int,
        depth_left: int,
        visited: set[int],
        out: list[_Extent],
    ) -> None:
        parsed = _inode.extent_node(node)
        if parsed is None:
            raise self._corrupt(f"inode {number} has a bad extent node header")
        depth, max_entries, items = parsed
        if depth > depth_left:
            raise self._corrupt(f"inode {number}'s extent tree is deeper than {fmt.EXT_MAX_DEPTH}")
        if block_number is not None and self.metadata_csum:
            tail = fmt.EXTENT_HEADER.size + max_entries * fmt.EXTENT.size
            if tail + 4 > len(node):
                raise self._corrupt(f"inode {number}'s extent block {block_number} has no tail")
            expected = crc32c_raw(seed, node[:tail])
            if expected != int.from_bytes(node[tail : tail + 4], "little"):
                raise self._corrupt(
                    f"inode {number}'s extent block {block_number} checksum mismatch"
                )
        if depth == 0:
            out.extend(items)
            return
        for child in items:
            if child in visited:
                raise self._corrupt(f"inode {number}'s extent tree visits block {child} twice")
            visited.add(child)
            child_node = self.read_block(child)
            child_depth = int.from_bytes(
                child_node[_EH_DEPTH_OFFSET : _EH_DEPTH_OFFSET + 2], "little"
            )
            if child_depth != depth - 1:
                raise self._corrupt(f"inode {number}'s extent tree has inconsistent depths")
            self._walk_node(number, child_node, child, seed, depth - 1, visited, out)

    def _inline_data(self, number: int, raw: bytes, info: InodeInfo) -> bytes:
        data = raw[fmt.INODE_BLOCK_OFFSET : fmt.INODE_BLOCK_OFFSET + fmt.INODE_BLOCK_SIZE_BYTES]
        data += info.xattrs.get(b"system.data", b"")
        if info.size > len(data):
            raise self._corrupt(f"inode {number}'s inline data is shorter than its size")
        return data[: info.size]

    def data_runs(self, number: int) -> list[tuple[int, int, int]] | None:
        """Return where a file's or symlink's content lies on the disk.

        Each run is (offset in the file, offset on the device, length), all in bytes, in file
        order and cut at the file's size. Gaps between runs are holes and read as zeros.
        Returns None when the content is inline data in the inode, which read_data() reads.
        """
        raw = self._raw_inode(number)
        runs = _inode.inode_runs(raw, self.block_size, self.blocks_count)
        if runs is not None:
            return runs  # most files: a valid leaf of extents in the inode

        _mode, size_lo, flags, generation, size_high = _INODE_DATA_FIELDS.unpack_from(raw)
        if flags & _EXT4_INLINE_DATA_FL:
            return None
        size = size_lo | size_high << 32
        block_size = self.block_size
        runs = []
        for logical, physical, length, initialized in self._extents(
            number, raw, size, flags, generation
        ):
            if not initialized:
                continue
            start = logical * block_size
            if start >= size:
                break
            runs.append((start, physical * block_size, min(length * block_size, size - start)))
        return runs

    def read_data(self, number: int) -> Iterator[tuple[int, bytes]]:
        """Yield (offset, data) of a file's or symlink's content; gaps are holes."""
        info = self.inode(number)
        runs = self.data_runs(number)
        if runs is None:
            data = self._inline_data(number, self._raw_inode(number), info)
            if data:
                yield 0, data
            return
        for start, physical, length in runs:
            position = 0
            while position < length:
                count = min(_READ_CHUNK_BYTES, length - position)
                chunk = self.device.pread(count, physical + position)
                if len(chunk) != count:
                    raise self._corrupt(
                        f"inode {number}'s data is cut short by the end of the disk"
                    )
                yield start + position, chunk
                position += count

    def read_symlink(self, number: int) -> bytes:
        """Return a symlink's target."""
        raw = self._raw_inode(number)
        info = self.inode(number)
        if info.file_type != fmt.S_IFLNK:
            raise self._corrupt(f"inode {number} is not a symlink")
        flags = info.flags
        if info.size < fmt.INODE_BLOCK_SIZE_BYTES and not flags & (
            fmt.InodeFlags.EXTENTS | fmt.InodeFlags.INLINE_DATA
        ):
            return raw[fmt.INODE_BLOCK_OFFSET : fmt.INODE_BLOCK_OFFSET + info.size]
        if info.size >= self.block_size:
            raise self._corrupt(f"symlink inode {number} has a {info.size}-byte target")
        return b"".join(data for _, data in self.read_data(number))

    # Directories ---------------------------------------------------------------------------

    def iterdir(self, number: int) -> Iterator[tuple[bytes, int, int]]:
        """Iterate over (name, inode number, file type) of a directory, without . and ..

        The directory is read whole before the first entry comes.
        """
        return iter(self._entries_of(number, self.inode(number)))

    def _entries_of(self, number: int, info: InodeInfo) -> list[tuple[bytes, int, int]]:
        """Return the entries of directory ``number``, whose inode ``info`` is decoded."""
        raw = self._raw_inode(number)
        size, flags = info.size, info.flags
        if info.file_type != fmt.S_IFDIR:
            raise self._corrupt(f"inode {number} is not a directory")
        if flags & _EXT4_INLINE_DATA_FL:
            data = self._inline_data(number, raw, info)
            # Inline directories start with the parent's inode number instead of "." and "..".
            return self._parse_dirents(number, data, 4, len(data))
        generation = int.from_bytes(raw[0x64:0x68], "little")
        seed = self._inode_seed(number, generation)
        block_size = self.block_size
        entries: list[tuple[bytes, int, int]] = []
        for logical, physical, length, initialized in self._extents(
            number, raw, size, flags, generation
        ):
            if not initialized:
                continue
            for index in range(length):
                if (logical + index) * block_size >= size:
                    return entries
                block = self.read_block(physical + index)
                if self._is_index_block(block, logical + index, flags):
                    # htree index blocks hold no names; entry blocks follow as plain ones.
                    self._verify_index_block(number, block, seed, logical + index)
                    continue
                entries += self._dir_block(number, block, seed, flags)
        return entries

    def _is_index_block(self, block: bytes, logical: int, flags: int) -> bool:
        """Tell an htree index block: the root at block 0, or a node that looks empty."""
        if not flags & _EXT4_INDEX_FL:
            return False
        inode, rec_len, _name_len, _type = fmt.DIR_ENTRY_HEADER.unpack_from(block, 0)
        if logical == 0:
            dotdot_rec_len = int.from_bytes(block[16:18], "little")
            return bool(dotdot_rec_len == self.block_size - DX_DOT_ENTRY_BYTES)
        return bool(inode == 0 and rec_len in (self.block_size, 0, 65535))

    def _verify_index_block(self, number: int, block: bytes, seed: int, logical: int) -> None:
        """Check an htree block's dx_tail checksum, as ext4_dx_csum() computes it."""
        if logical == 0:
            info_length = block[DX_ROOT_INFO_OFFSET + 5]
            count_offset = DX_ROOT_INFO_OFFSET + info_length
        else:
            count_offset = fmt.DIR_ENTRY_HEADER.size
        if count_offset + 4 > self.block_size:
            raise self._corrupt(f"directory inode {number} has a bad htree block {logical}")
        limit = int.from_bytes(block[count_offset : count_offset + 2], "little")
        count = int.from_bytes(block[count_offset + 2 : count_offset + 4], "little")
        tail = count_offset + limit * DX_ENTRY_BYTES
        if count > limit or tail + DX_TAIL_BYTES > self.block_size:
            raise self._corrupt(f"directory inode {number} has a bad htree block {logical}")
        if not self.metadata_csum:
            return
        checksum = crc32c_raw(seed, block[: count_offset + count * DX_ENTRY_BYTES])
        checksum = crc32c_raw(checksum, block[tail : tail + 4] + bytes(4))
        if checksum != int.from_bytes(block[tail + 4 : tail + 8], "little"):
            raise self._corrupt(f"directory inode {number} has an htree block with a bad checksum")

    def _dir_block(
        self, number: int, block: bytes, seed: int, flags: int
    ) -> list[tuple[bytes, int, int]]:
        block_size = self.block_size
        tail_offset = block_size - fmt.DIR_ENTRY_TAIL.size
        has_tail = False
        if self.metadata_csum:
            inode, rec_len, name_len, file_type, stored = fmt.DIR_ENTRY_TAIL.unpack_from(
                block, tail_offset
            )
            has_tail = (inode, rec_len, name_len, file_type) == (
                0,
                fmt.DIR_ENTRY_TAIL.size,
                0,
                fmt.EXT4_DIR_TAIL_FILE_TYPE,
            )
            if has_tail:
                if crc32c_raw(seed, block[:tail_offset]) != stored:
                    raise self._corrupt(f"directory inode {number} has a block with a bad checksum")
            elif not flags & _EXT4_INDEX_FL:
                raise self._corrupt(f"directory inode {number} has a block without a checksum tail")
        end = tail_offset if has_tail else block_size
        return self._parse_dirents(number, block, 0, end)

    def _parse_dirents(
        self, number: int, data: bytes, offset: int, end: int
    ) -> list[tuple[bytes, int, int]]:
        try:
            return _inode.dir_entries(data, offset, end, self.block_size)
        except ValueError as err:
            raise self._corrupt(f"directory inode {number} has {err}") from None

    def lookup(self, path: bytes) -> int:
        """Return the inode number at ``path`` (relative to the root; symlinks not followed).

        Each directory on the way is read whole, so a corrupt entry anywhere in it raises,
        also after the name looked for.
        """
        number = fmt.EXT4_ROOT_INO
        for name in path.split(b"/"):
            if name in (b"", b"."):
                continue
            for child_name, child, _ in self.iterdir(number):
                if child_name == name:
                    number = child
                    break
            else:
                raise FileNotFoundError(f"{path!r} not found in the ext4 filesystem")
        return number

    def walk(self, top: int = fmt.EXT4_ROOT_INO) -> Iterator[tuple[bytes, InodeInfo]]:
        """Yield (path, inode) for every entry below ``top``, depth first, names sorted.

        Each directory is entered once; a directory reached twice is a loop and rejected.
        """
        seen_directories = {top}
        stack: list[tuple[bytes, Iterator[tuple[bytes, int, int]]]] = [
            (b"", iter(sorted(self.iterdir(top))))
        ]
        while stack:
            prefix, children = stack[-1]
            entry = next(children, None)
            if entry is None:
                stack.pop()
                continue
            name, child, _ = entry
            path = prefix + name
            info = self.inode(child)
            yield path, info
            if info.mode & fmt.S_IFMT == fmt.S_IFDIR:
                if child in seen_directories:
                    raise self._corrupt(f"directory inode {child} is reachable twice (a loop)")
                seen_directories.add(child)
                stack.append((path + b"/", iter(sorted(self._entries_of(child, info)))))
