"""Decode raw inodes and extent nodes with lcow.ext4._inode against the on-disk layout.

The inodes are packed with struct from random field values, and the expected values follow
the kernel's ext4_decode_extra_time() and the layout of struct ext4_inode.
"""

import os
import struct
import subprocess
import sys
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lcow.ext4 import _inode
from lcow.ext4 import format as fmt
from lcow.ext4.checksum import crc32c_raw

NS: Final = 1_000_000_000
U16: Final = st.integers(0, 0xFFFF)
U32: Final = st.integers(0, 0xFFFFFFFF)


def expected_time(seconds_field: int, extra: int) -> int:
    seconds = seconds_field - (1 << 32) if seconds_field >= 1 << 31 else seconds_field
    seconds += (extra & 3) << 32
    nanoseconds = extra >> 2
    return seconds * NS + (nanoseconds if nanoseconds < NS else 0)


@given(
    values=st.fixed_dictionaries(
        {name: U16 if code == "H" else U32 for name, code in fmt.INODE_FIELDS if code in ("H", "I")}
    ),
    extra_isize=st.sampled_from([0, 4, 8, 12, 16, 20, 24, 28, 32]),
    inode_size=st.sampled_from([128, 256]),
)
def test_decode_matches_layout(values: dict[str, int], extra_isize: int, inode_size: int) -> None:
    values["i_extra_isize"] = extra_isize
    raw = fmt.INODE.pack(*(values.get(name, b"") for name, _ in fmt.INODE_FIELDS))
    raw = raw.ljust(inode_size, b"\0")[:inode_size]
    covered = extra_isize if inode_size > 128 else 0

    decoded = _inode.decode(raw, inode_size)

    assert decoded is not None
    mode, uid, gid, size, links, atime, mtime, ctime, crtime, flags, extra, in_inode, block = (
        decoded
    )
    assert mode == values["i_mode"]
    assert uid == values["i_uid"] | values["l_i_uid_high"] << 16
    assert gid == values["i_gid"] | values["l_i_gid_high"] << 16
    assert size == values["i_size_lo"] | values["i_size_high"] << 32
    assert links == values["i_links_count"]
    assert flags == values["i_flags"]
    assert extra == covered
    assert block == values["i_file_acl_lo"] | values["l_i_file_acl_high"] << 32
    assert in_inode is False
    assert mtime == expected_time(
        values["i_mtime"], values["i_mtime_extra"] if covered >= 12 else 0
    )
    assert atime == expected_time(
        values["i_atime"], values["i_atime_extra"] if covered >= 16 else 0
    )
    assert ctime == expected_time(values["i_ctime"], values["i_ctime_extra"] if covered >= 8 else 0)
    if covered >= 20:
        extra_crtime = values["i_crtime_extra"] if covered >= 24 else 0
        assert crtime == expected_time(values["i_crtime"], extra_crtime)
    else:
        assert crtime == mtime


def test_decode_time_past_2262() -> None:
    values: dict[str, int | bytes] = dict.fromkeys((name for name, _ in fmt.INODE_FIELDS), 0)
    values.update(i_block=b"", i_extra_isize=32, i_mtime=0x7FFFFFFF, i_mtime_extra=3 | 5 << 2)
    raw = fmt.INODE.pack(*(values[name] for name, _ in fmt.INODE_FIELDS)).ljust(256, b"\0")

    decoded = _inode.decode(raw, 256)

    assert decoded is not None
    assert decoded[6] == (0x7FFFFFFF + (3 << 32)) * NS + 5
    assert decoded[6] > 2**63


def test_decode_in_inode_xattr_magic() -> None:
    raw = bytearray(256)
    raw[0x80:0x82] = (32).to_bytes(2, "little")
    raw[160:164] = fmt.EXT4_XATTR_MAGIC.to_bytes(4, "little")

    decoded = _inode.decode(bytes(raw), 256)

    assert decoded is not None
    assert decoded[11] is True


def test_decode_rejects_bad_extra_isize() -> None:
    for extra_isize in (2, 130, 200):
        raw = bytearray(256)
        raw[0x80:0x82] = extra_isize.to_bytes(2, "little")
        assert _inode.decode(bytes(raw), 256) is None


@given(raw=st.binary(min_size=256, max_size=256), number=st.integers(1, 2**32 - 1), seed=U32)
def test_checksums_match_kernel_formula(raw: bytes, number: int, seed: int) -> None:
    has_hi = int.from_bytes(raw[0x80:0x82], "little") >= 4
    zeroed = bytearray(raw)
    zeroed[0x7C:0x7E] = bytes(2)
    if has_hi:
        zeroed[0x82:0x84] = bytes(2)
    inode_seed = crc32c_raw(seed, number.to_bytes(4, "little") + raw[0x64:0x68])
    computed = crc32c_raw(inode_seed, zeroed)
    stored = int.from_bytes(raw[0x7C:0x7E], "little")
    if has_hi:
        stored |= int.from_bytes(raw[0x82:0x84], "little") << 16
    else:
        computed &= 0xFFFF

    assert _inode.checksums(raw, number, seed, 256) == (stored, computed)


EXTENT: Final = struct.Struct("<IHHI")


@given(
    extents=st.lists(st.tuples(U32, st.integers(1, 65535), U16, U32), min_size=0, max_size=4),
)
def test_extent_leaf_matches_layout(extents: list[tuple[int, int, int, int]]) -> None:
    node = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, len(extents), 4, 0, 0)
    node += b"".join(EXTENT.pack(*extent) for extent in extents)
    node = node.ljust(60, b"\0")

    parsed = _inode.extent_node(node)

    assert parsed is not None
    depth, max_entries, items = parsed
    assert (depth, max_entries) == (0, 4)
    expected = [
        (logical, hi << 32 | lo, length if length <= 32768 else length - 32768, length <= 32768)
        for logical, length, hi, lo in extents
    ]
    assert items == expected


def test_extent_index_children() -> None:
    node = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 2, 4, 1, 0)
    node += fmt.EXTENT_INDEX.pack(0, 1000, 0, 0) + fmt.EXTENT_INDEX.pack(50, 7, 2, 0)
    node = node.ljust(60, b"\0")

    assert _inode.extent_node(node) == (1, 4, [1000, 2 << 32 | 7])


def test_extent_node_bad_headers() -> None:
    good = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 0, 4, 0, 0).ljust(60, b"\0")
    wrong_magic = fmt.EXTENT_HEADER.pack(0xF30B, 0, 4, 0, 0).ljust(60, b"\0")
    too_many = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 5, 4, 0, 0).ljust(60, b"\0")
    too_large = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 0, 5, 0, 0).ljust(60, b"\0")

    assert _inode.extent_node(good) == (0, 4, [])
    assert _inode.extent_node(wrong_magic) is None
    assert _inode.extent_node(too_many) is None
    assert _inode.extent_node(too_large) is None
    assert _inode.extent_node(b"\x0a\xf3") is None


def expected_runs(
    extents: list[tuple[int, int, int, int]], size: int, block_size: int, blocks_count: int
) -> list[tuple[int, int, int]] | None:
    """The data runs of a leaf in i_block, or None where an extent is out of order or place."""
    previous_end = 0
    for logical, length, hi, lo in extents:
        blocks = length - 32768 if length > 32768 else length
        physical = hi << 32 | lo
        if logical < previous_end or physical == 0 or physical + blocks > blocks_count:
            return None
        previous_end = logical + blocks
    runs = []
    for logical, length, hi, lo in extents:
        if length > 32768:
            continue
        start = logical * block_size
        if start >= size:
            break
        runs.append((start, (hi << 32 | lo) * block_size, min(length * block_size, size - start)))
    return runs


@given(
    extents=st.lists(
        st.tuples(st.integers(0, 64), st.integers(1, 65535), st.integers(0, 1), st.integers(0, 99)),
        max_size=4,
    ),
    size=st.integers(0, 300 * 4096),
    blocks_count=st.integers(1, 1 << 33),
)
def test_inode_runs_match_leaf(
    extents: list[tuple[int, int, int, int]], size: int, blocks_count: int
) -> None:
    raw = bytearray(256)
    raw[0x04:0x08] = (size & 0xFFFFFFFF).to_bytes(4, "little")
    raw[0x6C:0x70] = (size >> 32).to_bytes(4, "little")
    raw[0x20:0x24] = int(fmt.InodeFlags.EXTENTS).to_bytes(4, "little")
    node = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, len(extents), 4, 0, 0)
    node += b"".join(EXTENT.pack(*extent) for extent in extents)
    raw[0x28 : 0x28 + len(node)] = node

    runs = _inode.inode_runs(bytes(raw), 4096, blocks_count)

    assert runs == expected_runs(extents, size, 4096, blocks_count)


def test_inode_runs_leave_other_inodes() -> None:
    leaf = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 1, 4, 0, 0) + EXTENT.pack(0, 1, 0, 9)
    index = fmt.EXTENT_HEADER.pack(fmt.EXT4_EXT_MAGIC, 1, 4, 1, 0) + EXTENT.pack(0, 9, 0, 0)
    cases = {
        "block map": (0, leaf),
        "inline data": (int(fmt.InodeFlags.EXTENTS | fmt.InodeFlags.INLINE_DATA), leaf),
        "index node": (int(fmt.InodeFlags.EXTENTS), index),
    }
    for flags, node in cases.values():
        raw = bytearray(256)
        raw[0x04:0x08] = (4096).to_bytes(4, "little")
        raw[0x20:0x24] = flags.to_bytes(4, "little")
        raw[0x28 : 0x28 + len(node)] = node
        assert _inode.inode_runs(bytes(raw), 4096, 100) is None


def dir_entry(inode: int, name: bytes, rec_len: int, file_type: int = 1) -> bytes:
    return fmt.DIR_ENTRY_HEADER.pack(inode, rec_len, len(name), file_type) + name.ljust(
        rec_len - 8, b"\0"
    )


def test_dir_entries_skip_dots_and_unused() -> None:
    block = (
        dir_entry(2, b".", 12, 2)
        + dir_entry(2, b"..", 12, 2)
        + dir_entry(0, b"gone", 16)
        + dir_entry(12, b"kept-file", 20)
        + dir_entry(13, b"last", 4096 - 60, 2)
    )

    assert _inode.dir_entries(block, 0, 4096, 4096) == [(b"kept-file", 12, 1), (b"last", 13, 2)]


def test_dir_entries_stop_at_end() -> None:
    block = dir_entry(12, b"a", 12) + dir_entry(13, b"b", 12)

    assert _inode.dir_entries(block, 0, 12, 4096) == [(b"a", 12, 1)]


def test_dir_entries_name_bad_rec_len() -> None:
    cases = {
        "shorter than its name": dir_entry(12, b"long-name", 12)[:12] + bytes(4084),
        "not a multiple of 4": fmt.DIR_ENTRY_HEADER.pack(12, 14, 1, 1) + bytes(4088),
        "past the end": fmt.DIR_ENTRY_HEADER.pack(12, 8192, 1, 1) + bytes(4088),
    }
    for block in cases.values():
        rec_len = int.from_bytes(block[4:6], "little")
        with pytest.raises(ValueError, match=f"^an entry at byte 0 with rec_len {rec_len}$"):
            _inode.dir_entries(block, 0, 4096, 4096)


def test_dir_entries_name_invalid_names() -> None:
    for name in (b"a/b", b"a\0b"):
        block = dir_entry(12, name, 4096)
        with pytest.raises(ValueError, match=r"^the invalid name ") as raised:
            _inode.dir_entries(block, 0, 4096, 4096)
        assert str(raised.value) == f"the invalid name {name!r}"


def test_dir_entries_whole_64k_block() -> None:
    block = fmt.DIR_ENTRY_HEADER.pack(12, 0, 1, 1) + b"x" + bytes(65536 - 9)

    assert _inode.dir_entries(block, 0, 65536, 65536) == [(b"x", 12, 1)]


PACK_ORDER: Final = (
    "number",
    "seed",
    "mode",
    "uid",
    "gid",
    "size",
    "links",
    "sectors",
    "flags",
    "i_block",
    "xattr_block",
    "mtime",
    "mtime_extra",
    "atime",
    "atime_extra",
    "ctime",
    "ctime_extra",
    "crtime",
    "crtime_extra",
    "inline_xattrs",
)
PACK_FIELDS: Final = st.fixed_dictionaries(
    {
        "number": st.integers(1, 2**32 - 1),
        "seed": U32,
        "mode": U16,
        "uid": U32,
        "gid": U32,
        "size": st.integers(0, 2**64 - 1),
        "links": U16,
        "sectors": st.integers(0, 2**48 - 1),
        "flags": U32,
        "i_block": st.binary(max_size=60),
        "xattr_block": st.integers(0, 2**48 - 1),
        "mtime": U32,
        "mtime_extra": U32,
        "atime": U32,
        "atime_extra": U32,
        "ctime": U32,
        "ctime_extra": U32,
        "crtime": U32,
        "crtime_extra": U32,
        "inline_xattrs": st.one_of(st.none(), st.binary(min_size=96, max_size=96)),
    }
)


def packed_by_struct(fields: dict[str, Any]) -> bytes:
    """Pack the inode with struct ext4_inode's layout and add ext4_inode_csum()."""
    values = {
        "i_mode": fields["mode"],
        "i_uid": fields["uid"] & 0xFFFF,
        "i_size_lo": fields["size"] & 0xFFFFFFFF,
        "i_atime": fields["atime"],
        "i_ctime": fields["ctime"],
        "i_mtime": fields["mtime"],
        "i_gid": fields["gid"] & 0xFFFF,
        "i_links_count": fields["links"],
        "i_blocks_lo": fields["sectors"] & 0xFFFFFFFF,
        "i_flags": fields["flags"],
        "i_block": fields["i_block"],
        "i_file_acl_lo": fields["xattr_block"] & 0xFFFFFFFF,
        "i_size_high": fields["size"] >> 32,
        "l_i_blocks_high": fields["sectors"] >> 32,
        "l_i_file_acl_high": fields["xattr_block"] >> 32,
        "l_i_uid_high": fields["uid"] >> 16,
        "l_i_gid_high": fields["gid"] >> 16,
        "i_extra_isize": 32,
        "i_ctime_extra": fields["ctime_extra"],
        "i_mtime_extra": fields["mtime_extra"],
        "i_atime_extra": fields["atime_extra"],
        "i_crtime": fields["crtime"],
        "i_crtime_extra": fields["crtime_extra"],
    }
    inode = bytearray(
        fmt.INODE.pack(
            *(values.get(name, b"" if code == "60s" else 0) for name, code in fmt.INODE_FIELDS)
        )
    )
    inode += fields["inline_xattrs"] or bytes(96)
    inode_seed = crc32c_raw(fields["seed"], fields["number"].to_bytes(4, "little") + bytes(4))
    checksum = crc32c_raw(inode_seed, inode)
    inode[0x7C:0x7E] = (checksum & 0xFFFF).to_bytes(2, "little")
    inode[0x82:0x84] = (checksum >> 16).to_bytes(2, "little")
    return bytes(inode)


@given(fields=PACK_FIELDS, slot=st.integers(0, 3))
def test_pack_inode_matches_layout(fields: dict[str, Any], slot: int) -> None:
    table = bytearray(4 * 256)

    _inode.pack_inode(table, slot * 256, *(fields[name] for name in PACK_ORDER))

    assert table[slot * 256 : slot * 256 + 256] == packed_by_struct(fields)
    assert not any(table[: slot * 256])
    assert not any(table[slot * 256 + 256 :])


def test_pack_inode_rejects_overflowing_slot() -> None:
    arguments = (1, 0, 0o100644, 0, 0, 0, 1, 0, 0, b"", 0, 0, 0, 0, 0, 0, 0, 0, 0, None)
    with pytest.raises(ValueError, match="does not fit its slot"):
        _inode.pack_inode(bytearray(256), 1, *arguments)
    with pytest.raises(ValueError, match="does not fit its slot"):
        _inode.pack_inode(
            bytearray(512), 0, 1, 0, 0o100644, 0, 0, 0, 1, 0, 0, bytes(61), *arguments[10:]
        )


def test_pack_inode_under_debug_allocator() -> None:
    """Run pack_inode() where freed memory is overwritten, so a read after a free shows."""
    fields = dict.fromkeys(PACK_ORDER, 7) | {"i_block": b"target", "inline_xattrs": None}
    arguments = [fields[name] for name in PACK_ORDER]
    script = (
        "import sys; from lcow.ext4 import _inode\n"
        "table = bytearray(256)\n"
        f"_inode.pack_inode(table, 0, *{arguments!r})\n"
        "sys.stdout.write(table.hex())\n"
    )

    child = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONMALLOC": "debug"},
        timeout=60,
    )

    assert bytes.fromhex(child.stdout) == packed_by_struct(fields)
