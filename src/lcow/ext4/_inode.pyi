"""Types of the C extension lcow.ext4._inode (src/lcow/ext4/_inode.c)."""

from typing import Any

def checksums(raw: bytes, number: int, seed: int, inode_size: int, /) -> tuple[int, int]: ...
def decode(
    raw: bytes, inode_size: int, /
) -> tuple[int, int, int, int, int, int, int, int, int, int, int, bool, int] | None: ...

# The items are (ee_block, physical block, length, initialized) in a leaf (depth 0), and
# child block numbers in an index node.
def extent_node(node: bytes, /) -> tuple[int, int, list[Any]] | None: ...
def inode_runs(
    raw: bytes, block_size: int, blocks_count: int, /
) -> list[tuple[int, int, int]] | None: ...
def dir_entries(
    data: bytes, offset: int, end: int, block_size: int, /
) -> list[tuple[bytes, int, int]]: ...
def pack_inode(
    table: bytearray,
    offset: int,
    number: int,
    seed: int,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    links: int,
    sectors: int,
    flags: int,
    i_block: bytes,
    xattr_block: int,
    mtime: int,
    mtime_extra: int,
    atime: int,
    atime_extra: int,
    ctime: int,
    ctime_extra: int,
    crtime: int,
    crtime_extra: int,
    inline_xattrs: bytes | None,
    /,
) -> None: ...
