"""Encodings of the ext4 writer checked against values worked out from the kernel's rules."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from lcow.errors import CorruptInputError, InvalidArgumentError, UnsupportedError
from lcow.ext4 import format as fmt
from lcow.ext4.checksum import crc32c_raw, filesystem_seed
from lcow.ext4.extents import (
    Extent,
    build_tree,
    pack_extents,
    tree_blocks_needed,
    unpack_extents,
)
from lcow.ext4.layout import BlockAllocator, backup_groups
from lcow.ext4.writer import Ext4Writer, Metadata, encode_device, encode_time
from lcow.ext4.xattr import entry_hash, make_xattr, posix_acl_to_disk, split_inode_and_block
from lcow.layer.tar2ext4 import split_path

NS = 1_000_000_000

# (time in ns, i_*time field, *_extra field): extra = epoch bits | nanoseconds << 2.
TIME_CASES = [
    (0, 0, 0),
    (1 * NS + 5, 1, 5 << 2),
    (-1 * NS, 0xFFFFFFFF, 0),  # 1969-12-31T23:59:59Z: negative, epoch 0
    (-(2**31) * NS, 0x80000000, 0),  # 1901-12-13T20:45:52Z, the minimum
    ((2**31) * NS, 0x80000000, 1),  # 2038-01-19T03:14:08Z needs the first epoch bit
    ((2**32) * NS + 7, 0, 1 | 7 << 2),  # 2106-02-07T06:28:16Z
    ((2**34 - 2**31 - 1) * NS + 999_999_999, 0x7FFFFFFF, 3 | 999_999_999 << 2),  # 2446 max
]


@pytest.mark.parametrize(("time_ns", "seconds_field", "extra_field"), TIME_CASES)
def test_encode_time_table(time_ns: int, seconds_field: int, extra_field: int) -> None:
    assert encode_time(time_ns) == (seconds_field, extra_field)


def test_encode_time_clamps_before_1901() -> None:
    assert encode_time(-(2**31) * NS - 1) == (0x80000000, 0)
    assert encode_time(-(2**40) * NS) == (0x80000000, 0)


def test_encode_time_clamps_after_2446() -> None:
    assert encode_time(2**35 * NS) == (0x7FFFFFFF, 3 | 999_999_999 << 2)


def test_encode_device_old_form() -> None:
    i_block = encode_device(5, 1)

    assert i_block[:4] == (5 << 8 | 1).to_bytes(4, "little")
    assert i_block[4:] == bytes(56)


def test_encode_device_new_form() -> None:
    i_block = encode_device(259, 65536)
    expected = (65536 & 0xFF) | (259 << 8) | ((65536 & ~0xFF) << 12)

    assert i_block[:4] == bytes(4)
    assert i_block[4:8] == expected.to_bytes(4, "little")


def test_encode_device_rejects_wide_major() -> None:
    with pytest.raises(UnsupportedError, match="4096:0"):
        encode_device(4096, 0)


def test_crc32c_raw_matches_kernel_convention() -> None:
    # The standard CRC-32C check value of "123456789" is 0xE3069283; the kernel's raw
    # register seeded with ~0 and not inverted at the end gives its complement.
    assert crc32c_raw(0xFFFFFFFF, b"123456789") == 0xE3069283 ^ 0xFFFFFFFF


def test_crc32c_raw_chains() -> None:
    whole = crc32c_raw(0x1234, b"abcdef")
    chained = crc32c_raw(crc32c_raw(0x1234, b"abc"), b"def")

    assert whole == chained


def test_filesystem_seed_uses_uuid() -> None:
    assert filesystem_seed(bytes(16)) != filesystem_seed(b"\x01" + bytes(15))


def test_backup_groups_sparse_super() -> None:
    assert backup_groups(1) == []
    assert backup_groups(2) == [1]
    assert backup_groups(50) == [1, 3, 5, 7, 9, 25, 27, 49]


def test_allocator_skips_superblock_copy() -> None:
    allocator = BlockAllocator.for_max_size(1 << 40)
    reserved = allocator.regions[1].end - allocator.regions[1].start
    allocator.next_block = fmt.BLOCKS_PER_GROUP - 10

    runs = allocator.allocate(20)

    assert runs == [
        (fmt.BLOCKS_PER_GROUP - 10, 10),
        (fmt.BLOCKS_PER_GROUP + reserved, 10),
    ]


def test_allocator_contiguous_records_gap() -> None:
    allocator = BlockAllocator.for_max_size(1 << 40)
    allocator.next_block = fmt.BLOCKS_PER_GROUP - 3

    start = allocator.allocate_contiguous(8)

    assert start == allocator.regions[1].end
    assert allocator.free_runs == [(fmt.BLOCKS_PER_GROUP - 3, 3)]


def test_allocator_repeated_runs_skip_superblock_copy() -> None:
    allocator = BlockAllocator.for_max_size(1 << 40)
    reserved = allocator.regions[1].end - allocator.regions[1].start
    allocator.next_block = fmt.BLOCKS_PER_GROUP - 25

    runs = [allocator.allocate(10) for _ in range(3)]

    assert runs == [
        [(fmt.BLOCKS_PER_GROUP - 25, 10)],
        [(fmt.BLOCKS_PER_GROUP - 15, 10)],
        [(fmt.BLOCKS_PER_GROUP - 5, 5), (fmt.BLOCKS_PER_GROUP + reserved, 5)],
    ]


def test_allocator_rejects_past_limit() -> None:
    allocator = BlockAllocator.for_max_size(64 << 20)

    with pytest.raises(ValueError, match="maximum image size"):
        allocator.allocate((64 << 20) // fmt.BLOCK_SIZE_BYTES)


@pytest.mark.parametrize(
    ("extents", "blocks"), [(0, 0), (4, 0), (5, 1), (340, 1), (341, 2), (1360, 4), (1361, 6)]
)
def test_tree_blocks_needed(extents: int, blocks: int) -> None:
    assert tree_blocks_needed(extents) == blocks


def test_build_tree_depth_two() -> None:
    extents = [Extent(i * 2, 1000 + i * 2, 1) for i in range(1361)]
    next_block = iter(range(5000, 6000))

    tree = build_tree(len(extents), pack_extents(extents), lambda: next(next_block))
    magic, entries, max_entries, depth, _ = fmt.EXTENT_HEADER.unpack_from(tree.root)

    assert magic == fmt.EXT4_EXT_MAGIC
    assert depth == 2
    assert entries == 1
    assert max_entries == 4
    assert len(tree.node_blocks) == tree_blocks_needed(1361)


def test_xattr_hash_of_capability() -> None:
    # Worked by hand from ext4_xattr_hash_entry(): name "capability", one 4-byte word.
    name = b"capability"
    value = b"\x01\x00\x00\x02"
    hash_value = 0
    for byte in name:
        hash_value = ((hash_value << 5) ^ (hash_value >> 27) ^ byte) & 0xFFFFFFFF
    hash_value = ((hash_value << 16) ^ (hash_value >> 16) ^ 0x02000001) & 0xFFFFFFFF

    assert entry_hash(name, value) == hash_value


def test_xattr_prefix_split() -> None:
    capability = make_xattr(b"security.capability", b"x")
    user = make_xattr(b"user.note", b"x")

    assert (capability.name_index, capability.name) == (fmt.XattrIndex.SECURITY, b"capability")
    assert (user.name_index, user.name) == (fmt.XattrIndex.USER, b"note")


def test_xattr_unknown_namespace() -> None:
    with pytest.raises(UnsupportedError, match=r"com\.apple"):
        make_xattr(b"com.apple.quarantine", b"x")


def test_xattr_placement_spills_to_block() -> None:
    small = make_xattr(b"user.a", b"1")
    large = make_xattr(b"user.b", b"x" * 200)

    in_inode, in_block = split_inode_and_block([large, small])

    assert in_inode == [small]
    assert in_block == [large]


def test_xattr_too_large_for_block() -> None:
    xattrs = [make_xattr(f"user.n{i}".encode(), b"x" * 1000) for i in range(5)]

    with pytest.raises(UnsupportedError, match="one ext4 xattr block"):
        split_inode_and_block(xattrs)


def test_posix_acl_to_disk_short_entries() -> None:
    vfs = (
        (2).to_bytes(4, "little")
        + fmt.POSIX_ACL_XATTR_ENTRY.pack(fmt.ACL_USER_OBJ, 6, 0xFFFFFFFF)
        + fmt.POSIX_ACL_XATTR_ENTRY.pack(fmt.ACL_USER, 4, 1000)
        + fmt.POSIX_ACL_XATTR_ENTRY.pack(fmt.ACL_OTHER, 4, 0xFFFFFFFF)
    )

    disk = posix_acl_to_disk(vfs)

    assert disk == (
        (1).to_bytes(4, "little")
        + fmt.EXT4_ACL_ENTRY_SHORT.pack(fmt.ACL_USER_OBJ, 6)
        + fmt.EXT4_ACL_ENTRY.pack(fmt.ACL_USER, 4, 1000)
        + fmt.EXT4_ACL_ENTRY_SHORT.pack(fmt.ACL_OTHER, 4)
    )


def test_posix_acl_rejects_bad_version() -> None:
    with pytest.raises(CorruptInputError, match="version 7"):
        posix_acl_to_disk((7).to_bytes(4, "little"))


# (tar name, components): names without ".", ".." or empty components take a shortcut.
SPLIT_PATH_CASES = [
    (b"usr/bin/env", [b"usr", b"bin", b"env"]),
    (b"usr/bin/", [b"usr", b"bin"]),
    (b"./usr/bin", [b"usr", b"bin"]),
    (b"/usr//bin/./env", [b"usr", b"bin", b"env"]),
    (b"usr/lib/../bin", [b"usr", b"bin"]),
    (b"", []),
    (b"./", []),
    (b"a" * 200 + b"/" + b"b" * 200, [b"a" * 200, b"b" * 200]),
]


@pytest.mark.parametrize(("raw", "components"), SPLIT_PATH_CASES)
def test_split_path_table(raw: bytes, components: list[bytes]) -> None:
    assert split_path(raw, entry=raw) == components


def test_split_path_rejects_long_component() -> None:
    raw = b"usr/" + b"x" * 256

    with pytest.raises(InvalidArgumentError, match="256 bytes"):
        split_path(raw, entry=raw)


META = Metadata(0o644, 0, 0, 0, 0, 0, 0)
BLOCK = fmt.BLOCK_SIZE_BYTES


def write_one_file(
    image: Path, size: int, chunks: Sequence[tuple[int, bytes]]
) -> tuple[bytes, list[Extent]]:
    """Write an image with one regular file; return the image and the file's extents."""
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = Ext4Writer(fd, implicit_meta=META, max_size_bytes=64 << 20)
        inode = writer.add_regular_file([b"file"], META, size, chunks)
        extents = unpack_extents(inode.extents)
        writer.close(b"test image")
    finally:
        os.close(fd)
    return image.read_bytes(), extents


def block_at(image: bytes, number: int) -> bytes:
    return image[number * BLOCK : (number + 1) * BLOCK]


@pytest.mark.parametrize("cuts", [[100], [BLOCK], [BLOCK + 1], [5000, 5001], [1, 2, 3 * BLOCK]])
def test_file_data_chunking_same_image(tmp_path: Path, cuts: list[int]) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: two whole blocks and a partial one
    whole, _ = write_one_file(tmp_path / "whole.img", len(data), [(0, data)])
    bounds = [0, *cuts, len(data)]
    chunks = [(start, data[start:end]) for start, end in itertools.pairwise(bounds)]

    split, _ = write_one_file(tmp_path / "split.img", len(data), chunks)

    assert split == whole


def test_file_data_chunk_continues_block(tmp_path: Path) -> None:
    chunks = [(0, b"a" * 10), (20, b"b" * 10)]

    image, extents = write_one_file(tmp_path / "file.img", 30, chunks)

    assert len(extents) == 1
    assert extents[0].length == 1
    assert block_at(image, extents[0].physical) == (
        b"a" * 10 + bytes(10) + b"b" * 10 + bytes(BLOCK - 30)
    )


def test_file_data_hole_skips_blocks(tmp_path: Path) -> None:
    chunks = [(0, b"a" * 10), (3 * BLOCK + 5, b"b" * 10)]

    image, extents = write_one_file(tmp_path / "file.img", 3 * BLOCK + 15, chunks)

    assert [(extent.logical, extent.length) for extent in extents] == [(0, 1), (3, 1)]
    assert block_at(image, extents[0].physical) == b"a" * 10 + bytes(BLOCK - 10)
    assert block_at(image, extents[1].physical) == bytes(5) + b"b" * 10 + bytes(BLOCK - 15)


def test_file_data_rejects_earlier_chunk(tmp_path: Path) -> None:
    chunks = [(2 * BLOCK, b"a" * 10), (0, b"b" * 10)]

    with pytest.raises(InvalidArgumentError, match="increasing offset order"):
        write_one_file(tmp_path / "file.img", 2 * BLOCK + 10, chunks)
