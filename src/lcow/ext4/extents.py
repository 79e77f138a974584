"""Extent trees: the root in i_block and, for more than four extents, index and leaf blocks.

Reference: the kernel's ext4 disk-layout documentation ("Extent Tree") and
fs/ext4/ext4_extents.h. A node is a 12-byte header and 12-byte entries; nodes in blocks end
with a CRC32C tail seeded with the owning inode's checksum seed.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from lcow.errors import UnsupportedError
from lcow.ext4 import format as fmt
from lcow.ext4.checksum import crc32c_raw

_TAIL_OFFSET: Final = fmt.EXTENT_HEADER.size + fmt.BLOCK_EXTENT_SLOTS * fmt.EXTENT.size


@dataclass(slots=True, init=False, unsafe_hash=True)
class Extent:
    """A run of ``length`` blocks: logical block ``logical`` is stored at ``physical``."""

    logical: Final[int]
    physical: Final[int]
    length: Final[int]

    def __init__(self, logical: int, physical: int, length: int) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.logical = logical
        self.physical = physical
        self.length = length


@dataclass(slots=True)
class ExtentTree:
    """An encoded tree: the 60-byte i_block root and the node blocks below it, in order."""

    root: bytes
    node_blocks: list[tuple[int, bytearray]]  # (block number, contents without checksum)

    def finish(self, inode_seed: int) -> list[tuple[int, bytes]]:
        """Return the node blocks with their checksum tails for the inode's seed."""
        finished: list[tuple[int, bytes]] = []
        for block_number, block in self.node_blocks:
            checksum = crc32c_raw(inode_seed, block[:_TAIL_OFFSET])
            fmt.EXTENT_TAIL.pack_into(block, _TAIL_OFFSET, checksum)
            finished.append((block_number, bytes(block)))
        return finished


def pack_extents(extents: Sequence[Extent]) -> bytes:
    """Encode extents as consecutive 12-byte ext4_extent entries, without a header."""
    pack = fmt.EXTENT.pack
    return b"".join(
        pack(extent.logical, extent.length, extent.physical >> 32, extent.physical & 0xFFFFFFFF)
        for extent in extents
    )


def unpack_extents(packed: bytes) -> list[Extent]:
    """Decode what :func:`pack_extents` produced."""
    extents: list[Extent] = []
    for offset in range(0, len(packed), fmt.EXTENT.size):
        logical, length, start_hi, start_lo = fmt.EXTENT.unpack_from(packed, offset)
        extents.append(Extent(logical, (start_hi << 32) | start_lo, length))
    return extents


def tree_blocks_needed(extent_count: int) -> int:
    """Count the index and leaf blocks a tree of ``extent_count`` extents needs."""
    if extent_count <= fmt.INODE_EXTENT_SLOTS:
        return 0
    total = 0
    nodes = extent_count
    while nodes > fmt.INODE_EXTENT_SLOTS:
        nodes = -(-nodes // fmt.BLOCK_EXTENT_SLOTS)
        total += nodes
    return total


def _header(entries: int, max_entries: int, depth: int) -> bytes:
    return fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, entries, max_entries, depth, 0)


# The headers of a root that is a leaf, by entry count: the same few bytes for most inodes.
_LEAF_ROOT_HEADERS: Final = tuple(
    _header(entries, fmt.INODE_EXTENT_SLOTS, 0) for entries in range(fmt.INODE_EXTENT_SLOTS + 1)
)


def leaf_root(packed: bytes) -> bytes:
    """Return the 60-byte i_block of a tree whose root is a leaf: at most four packed extents."""
    root = _LEAF_ROOT_HEADERS[len(packed) // fmt.EXTENT.size] + packed
    return root.ljust(fmt.INODE_BLOCK_SIZE_BYTES, b"\0")


def build_tree(extent_count: int, packed: bytes, allocate_block: Callable[[], int]) -> ExtentTree:
    """Build the tree for ``extent_count`` packed extents.

    With at most four extents the root in i_block is a leaf. Otherwise leaves of up to 340
    extents fill blocks, and index levels are added until the root's four slots suffice.
    ``allocate_block`` returns the block number for each node, leaves first.
    """
    if extent_count <= fmt.INODE_EXTENT_SLOTS:
        return ExtentTree(leaf_root(packed[: extent_count * fmt.EXTENT.size]), [])

    node_blocks: list[tuple[int, bytearray]] = []
    # Each level is a list of (first logical block, encoded entry bytes) for the level above.
    entry_size = fmt.EXTENT.size
    level: list[tuple[int, bytes]] = [
        (
            int.from_bytes(packed[offset : offset + 4], "little"),
            packed[offset : offset + entry_size],
        )
        for offset in range(0, extent_count * entry_size, entry_size)
    ]
    depth = 0
    while len(level) > fmt.INODE_EXTENT_SLOTS:
        if depth + 1 > fmt.EXT_MAX_DEPTH:
            raise UnsupportedError(
                f"a file with {extent_count} extents needs an extent tree deeper than "
                f"{fmt.EXT_MAX_DEPTH} levels"
            )
        parents: list[tuple[int, bytes]] = []
        for start in range(0, len(level), fmt.BLOCK_EXTENT_SLOTS):
            children = level[start : start + fmt.BLOCK_EXTENT_SLOTS]
            block = bytearray(fmt.BLOCK_SIZE_BYTES)
            block[: fmt.EXTENT_HEADER.size] = _header(len(children), fmt.BLOCK_EXTENT_SLOTS, depth)
            block[fmt.EXTENT_HEADER.size : fmt.EXTENT_HEADER.size + len(children) * entry_size] = (
                b"".join(entry for _, entry in children)
            )
            block_number = allocate_block()
            node_blocks.append((block_number, block))
            first_logical = children[0][0]
            parents.append(
                (
                    first_logical,
                    fmt.EXTENT_INDEX.pack(
                        first_logical, block_number & 0xFFFFFFFF, block_number >> 32, 0
                    ),
                )
            )
        level = parents
        depth += 1

    root = _header(len(level), fmt.INODE_EXTENT_SLOTS, depth) + b"".join(e for _, e in level)
    return ExtentTree(root.ljust(fmt.INODE_BLOCK_SIZE_BYTES, b"\0"), node_blocks)
