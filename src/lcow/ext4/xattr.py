"""Extended attributes: name prefixes, hashes, and the in-inode and block encodings.

References: the kernel's ext4 disk-layout documentation ("Extended Attributes") and
fs/ext4/xattr.c, fs/ext4/acl.c. Each attribute is stored as an entry (name without its
prefix, a prefix index, the value's offset and size, a hash) followed by the values, which
sit at the end of their area and grow towards the entries.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from lcow.errors import CorruptInputError, InvalidArgumentError, UnsupportedError
from lcow.ext4 import format as fmt
from lcow.ext4.checksum import crc32c_raw

_MASK: Final = 0xFFFFFFFF
_NAME_HASH_SHIFT: Final = 5
_VALUE_HASH_SHIFT: Final = 16
_BLOCK_HASH_SHIFT: Final = 16
_ENTRY_TERMINATOR_BYTES: Final = 4  # a zero 32-bit word ends the entry list


@dataclass(slots=True, init=False, unsafe_hash=True)
class Xattr:
    """One attribute, with its name split into the prefix index and the stored suffix."""

    name_index: Final[int]
    name: Final[bytes]
    value: Final[bytes]

    def __init__(self, name_index: int, name: bytes, value: bytes) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.name_index = name_index
        self.name = name
        self.value = value

    @property
    def entry_size(self) -> int:
        return fmt.XATTR_ENTRY.size + _round4(len(self.name))

    @property
    def value_size(self) -> int:
        return _round4(len(self.value))

    def sort_key(self) -> tuple[int, int, bytes]:
        # ext4_xattr_find_entry() walks a sorted block comparing index, then name length,
        # then the name bytes, and stops early on that order.
        return (self.name_index, len(self.name), self.name)


def _round4(size: int) -> int:
    return (size + fmt.XATTR_ROUND - 1) & ~(fmt.XATTR_ROUND - 1)


def split_name(full_name: bytes) -> tuple[int, bytes]:
    """Split ``full_name`` into the prefix index and the suffix that ext4 stores.

    Raises UnsupportedError for a namespace ext4 has no index for (``os2.`` and others):
    the kernel could not store it either.
    """
    for prefix, index in fmt.XATTR_PREFIXES:
        if full_name.startswith(prefix):
            suffix = full_name[len(prefix) :]
            if index in (fmt.XattrIndex.POSIX_ACL_ACCESS, fmt.XattrIndex.POSIX_ACL_DEFAULT):
                if suffix:
                    break
            elif not suffix:
                break
            return index, suffix
    raise UnsupportedError(
        f"unsupported xattr name {full_name!r}: ext4 stores only the user., trusted., "
        "security. and system. namespaces"
    )


def make_xattr(full_name: bytes, value: bytes) -> Xattr:
    """Build the stored form of one attribute; POSIX ACLs are converted to ext4's form."""
    index, suffix = split_name(full_name)
    if len(suffix) > fmt.EXT4_NAME_LEN:
        raise InvalidArgumentError(
            f"xattr name {full_name!r} is {len(suffix)} bytes after its prefix; "
            f"ext4 allows at most {fmt.EXT4_NAME_LEN}"
        )
    if index in (fmt.XattrIndex.POSIX_ACL_ACCESS, fmt.XattrIndex.POSIX_ACL_DEFAULT):
        value = posix_acl_to_disk(value)
    if len(value) > fmt.XATTR_VALUE_MAX_BYTES:
        raise UnsupportedError(
            f"xattr {full_name!r} has a {len(value)}-byte value; without the ea_inode "
            f"feature ext4 stores at most {fmt.XATTR_VALUE_MAX_BYTES} bytes in one block"
        )
    return Xattr(index, suffix, value)


def posix_acl_to_disk(value: bytes) -> bytes:
    """Convert a POSIX ACL from the VFS xattr form (version 2) to ext4's on-disk form."""
    header_size = fmt.POSIX_ACL_XATTR_HEADER.size
    entry_size = fmt.POSIX_ACL_XATTR_ENTRY.size
    if len(value) < header_size or (len(value) - header_size) % entry_size:
        raise CorruptInputError(f"invalid POSIX ACL xattr: {len(value)} bytes")
    (version,) = fmt.POSIX_ACL_XATTR_HEADER.unpack_from(value)
    if version != fmt.POSIX_ACL_XATTR_VERSION:
        raise CorruptInputError(f"invalid POSIX ACL xattr: version {version}, expected 2")

    out = bytearray(fmt.EXT4_ACL_HEADER.pack(fmt.EXT4_ACL_VERSION))
    for offset in range(header_size, len(value), entry_size):
        tag, perm, ident = fmt.POSIX_ACL_XATTR_ENTRY.unpack_from(value, offset)
        if tag in (fmt.ACL_USER, fmt.ACL_GROUP):
            out += fmt.EXT4_ACL_ENTRY.pack(tag, perm, ident)
        elif tag in (fmt.ACL_USER_OBJ, fmt.ACL_GROUP_OBJ, fmt.ACL_MASK, fmt.ACL_OTHER):
            out += fmt.EXT4_ACL_ENTRY_SHORT.pack(tag, perm)
        else:
            raise CorruptInputError(f"invalid POSIX ACL xattr: unknown tag {tag:#x}")
    return bytes(out)


def entry_hash(name: bytes, value: bytes) -> int:
    """Compute e_hash as ext4_xattr_hash_entry() does (names hashed as unsigned bytes)."""
    hash_value = 0
    for byte in name:
        hash_value = (
            (hash_value << _NAME_HASH_SHIFT) ^ (hash_value >> (32 - _NAME_HASH_SHIFT)) ^ byte
        ) & _MASK
    padded = value + bytes(_round4(len(value)) - len(value))
    for offset in range(0, len(padded), 4):
        word = int.from_bytes(padded[offset : offset + 4], "little")
        hash_value = (
            (hash_value << _VALUE_HASH_SHIFT) ^ (hash_value >> (32 - _VALUE_HASH_SHIFT)) ^ word
        ) & _MASK
    return hash_value


def split_inode_and_block(xattrs: Sequence[Xattr]) -> tuple[list[Xattr], list[Xattr]]:
    """Place attributes in the inode while they fit, in sorted order; the rest go to a block.

    Raises UnsupportedError when the rest does not fit in one block: without the ea_inode
    feature ext4 has no further place for them.
    """
    ordered = sorted(xattrs, key=Xattr.sort_key)
    in_inode: list[Xattr] = []
    in_block: list[Xattr] = []
    free = fmt.INODE_XATTR_SPACE_BYTES - fmt.XATTR_INODE_HEADER.size - _ENTRY_TERMINATOR_BYTES
    for xattr in ordered:
        needed = xattr.entry_size + xattr.value_size
        if not in_block and needed <= free:
            in_inode.append(xattr)
            free -= needed
        else:
            in_block.append(xattr)

    block_space = fmt.BLOCK_SIZE_BYTES - fmt.XATTR_BLOCK_HEADER.size - _ENTRY_TERMINATOR_BYTES
    block_needed = sum(x.entry_size + x.value_size for x in in_block)
    if block_needed > block_space:
        raise UnsupportedError(
            f"xattrs need {block_needed} bytes outside the inode; one ext4 xattr block "
            f"holds {block_space}"
        )
    return in_inode, in_block


def _pack_entries(
    xattrs: Sequence[Xattr], area: bytearray, entries_start: int, values_base: int
) -> list[int]:
    """Write entries from ``entries_start`` and values from the end of ``area`` downwards.

    Value offsets are stored relative to ``values_base``. Returns the entry hashes.
    """
    hashes: list[int] = []
    entry_offset = entries_start
    value_end = len(area)
    for xattr in xattrs:
        value_offset = 0
        if xattr.value:
            value_end -= xattr.value_size
            area[value_end : value_end + len(xattr.value)] = xattr.value
            value_offset = value_end - values_base
        hash_value = entry_hash(xattr.name, xattr.value)
        hashes.append(hash_value)
        fmt.XATTR_ENTRY.pack_into(
            area,
            entry_offset,
            len(xattr.name),
            xattr.name_index,
            value_offset,
            0,
            len(xattr.value),
            hash_value,
        )
        name_start = entry_offset + fmt.XATTR_ENTRY.size
        area[name_start : name_start + len(xattr.name)] = xattr.name
        entry_offset += xattr.entry_size
    return hashes


def encode_inode_area(xattrs: Sequence[Xattr]) -> bytes:
    """Return the in-inode xattr area (INODE_XATTR_SPACE_BYTES long), or b"" when empty."""
    if not xattrs:
        return b""
    area = bytearray(fmt.INODE_XATTR_SPACE_BYTES)
    fmt.XATTR_INODE_HEADER.pack_into(area, 0, fmt.EXT4_XATTR_MAGIC)
    first_entry = fmt.XATTR_INODE_HEADER.size
    # In the inode, e_value_offs counts from the first entry, right after h_magic.
    _pack_entries(xattrs, area, first_entry, first_entry)
    return bytes(area)


def encode_block(xattrs: Sequence[Xattr], block_number: int, seed: int) -> bytes:
    """Return one xattr block holding ``xattrs`` (sorted), with its hash and checksum."""
    block = bytearray(fmt.BLOCK_SIZE_BYTES)
    hashes = _pack_entries(xattrs, block, fmt.XATTR_BLOCK_HEADER.size, 0)

    block_hash = 0
    for hash_value in hashes:
        block_hash = (
            (block_hash << _BLOCK_HASH_SHIFT)
            ^ (block_hash >> (32 - _BLOCK_HASH_SHIFT))
            ^ hash_value
        ) & _MASK
    fmt.XATTR_BLOCK_HEADER.pack_into(block, 0, fmt.EXT4_XATTR_MAGIC, 1, 1, block_hash, 0, b"")

    # ext4_xattr_block_csum(): the seed, then the 64-bit block number, then the block.
    checksum = crc32c_raw(seed, block_number.to_bytes(8, "little"))
    checksum = crc32c_raw(checksum, block)
    block[fmt.XATTR_BLOCK_CHECKSUM_OFFSET : fmt.XATTR_BLOCK_CHECKSUM_OFFSET + 4] = (
        checksum.to_bytes(4, "little")
    )
    return bytes(block)
