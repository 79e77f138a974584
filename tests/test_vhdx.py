"""Tests of dynamic VHDX files, with QEMU (package qemu-utils) as the independent implementation.

qemu-img checks, describes, converts and compares the files that lcow writes, and qemu-img and
qemu-io write the files that lcow must read. Tests that look at bytes use the offsets of the
MS-VHDX structures directly, not lcow's struct declarations, so a wrong declaration fails
them.
"""

import errno
import json
import logging
import os
import random
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcow.errors import (
    AlreadyExistsError,
    CorruptInputError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from lcow.vhdx import (
    BAT_ENTRY_STRUCT,
    FILE_IDENTIFIER_STRUCT,
    FILE_PARAMETERS_STRUCT,
    HEADER_STRUCT,
    METADATA_TABLE_ENTRY_STRUCT,
    METADATA_TABLE_HEADER_STRUCT,
    PAGE_83_DATA_STRUCT,
    REGION_TABLE_ENTRY_STRUCT,
    REGION_TABLE_HEADER_STRUCT,
    SECTOR_SIZE_STRUCT,
    VIRTUAL_DISK_SIZE_STRUCT,
    PayloadBlockState,
    VhdxFile,
    create,
    raw_to_vhdx,
    vhdx_to_raw,
)
from oracle import require_tool, run_tool

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB
TIB: Final = 1024 * GIB

DISK_ID: Final = bytes(range(0x40, 0x50))

# Offsets from the MS-VHDX structure tables, independent of lcow's declarations.
HEADER_OFFSETS: Final = (64 * KIB, 128 * KIB)
REGION_TABLE_OFFSETS: Final = (192 * KIB, 256 * KIB)
HEADER_SIZE: Final = 4 * KIB
REGION_TABLE_SIZE: Final = 64 * KIB
SEQUENCE_NUMBER_FIELD: Final = 8
FILE_WRITE_GUID_FIELD: Final = 16
DATA_WRITE_GUID_FIELD: Final = 32
LOG_GUID_FIELD: Final = 48

BAT_GUID: Final = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID: Final = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID: Final = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")


# --- helpers ---------------------------------------------------------------------------------


def read_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(length)


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def crc32c_with_zero_field(structure: bytes) -> int:
    """CRC-32C of a header or region table with the Checksum field at byte 4 counted as 0."""
    checksum: int = crc32c.crc32c(structure[:4] + bytes(4) + structure[8:])
    return checksum


def patch_checksummed(path: Path, base: int, size: int, field: int, value: bytes) -> None:
    """Write value at base + field and store the recomputed checksum of the structure."""
    structure = bytearray(read_bytes(path, base, size))
    structure[field : field + len(value)] = value
    structure[4:8] = crc32c_with_zero_field(bytes(structure)).to_bytes(4, "little")
    patch_bytes(path, base, bytes(structure))


def header_sequence_number(path: Path, slot: int) -> int:
    data = read_bytes(path, HEADER_OFFSETS[slot] + SEQUENCE_NUMBER_FIELD, 8)
    number: int = struct.unpack("<Q", data)[0]
    return number


def header_guid(path: Path, slot: int, field: int) -> uuid.UUID:
    return uuid.UUID(bytes_le=read_bytes(path, HEADER_OFFSETS[slot] + field, 16))


def header_checksum_valid(path: Path, slot: int) -> bool:
    header = read_bytes(path, HEADER_OFFSETS[slot], HEADER_SIZE)
    return int.from_bytes(header[4:8], "little") == crc32c_with_zero_field(header)


def region_offsets(path: Path) -> dict[uuid.UUID, int]:
    """Return FileOffset of each region in region table 1."""
    table = read_bytes(path, REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE)
    count = struct.unpack_from("<I", table, 8)[0]
    offsets = {}
    for index in range(count):
        entry = table[16 + 32 * index : 48 + 32 * index]
        offsets[uuid.UUID(bytes_le=entry[:16])] = struct.unpack_from("<Q", entry, 16)[0]
    return offsets


def metadata_item_offset(path: Path, item: uuid.UUID) -> int:
    """Return the file offset of a metadata item, found through the metadata table."""
    region = region_offsets(path)[METADATA_GUID]
    table = read_bytes(path, region, 64 * KIB)
    count = struct.unpack_from("<H", table, 10)[0]
    for index in range(count):
        entry = table[32 + 32 * index : 64 + 32 * index]
        if uuid.UUID(bytes_le=entry[:16]) == item:
            item_offset: int = struct.unpack_from("<I", entry, 16)[0]
            return region + item_offset
    raise AssertionError(f"metadata item {item} not found in {path}")


def set_bat_entry(path: Path, index: int, value: int) -> None:
    patch_bytes(path, region_offsets(path)[BAT_GUID] + 8 * index, value.to_bytes(8, "little"))


def qemu_info(path: Path) -> dict[str, object]:
    output = run_tool(["qemu-img", "info", "-f", "vhdx", "--output=json", str(path)]).stdout
    info: dict[str, object] = json.loads(output)
    return info


def qemu_check(path: Path) -> subprocess.CompletedProcess[str]:
    """Run `qemu-img check`, which exits with 0 only when it finds no error or leak."""
    require_tool("qemu-img")
    return subprocess.run(
        ["qemu-img", "check", "-f", "vhdx", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def qemu_compare(vhdx: Path, raw: Path) -> subprocess.CompletedProcess[str]:
    """Run `qemu-img compare`, which exits with 0 when both disks hold the same bytes."""
    require_tool("qemu-img")
    return subprocess.run(
        ["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(vhdx), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )


def data_ranges(path: Path) -> Iterator[tuple[int, int]]:
    """Yield the data ranges of a file as SEEK_DATA and SEEK_HOLE report them."""
    with path.open("rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    return
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            offset = end


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def make_sparse_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with path.open("wb") as file:
        file.truncate(size)
        for offset, data in writes:
            file.seek(offset)
            file.write(data)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)  # noqa: S311 (test data, not a secret)


@pytest.fixture
def empty_vhdx(tmp_path: Path) -> Path:
    """A 16 MiB VHDX with 1 MiB blocks and DISK_ID."""
    path = tmp_path / "disk.vhdx"
    create(path, 16 * MIB, block_size_bytes=1 * MIB, disk_id=DISK_ID)
    return path


@pytest.fixture
def written_vhdx(empty_vhdx: Path) -> Path:
    """empty_vhdx with 3 MiB of data at offset 1 MiB, closed."""
    with VhdxFile(empty_vhdx, writable=True) as vhdx:
        vhdx.write(1 * MIB, pattern(1, 3 * MIB))
    return empty_vhdx


# --- structures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (FILE_IDENTIFIER_STRUCT, 8 + 512),
        (HEADER_STRUCT, 4096),
        (REGION_TABLE_HEADER_STRUCT, 16),
        (REGION_TABLE_ENTRY_STRUCT, 32),
        (METADATA_TABLE_HEADER_STRUCT, 32),
        (METADATA_TABLE_ENTRY_STRUCT, 32),
        (FILE_PARAMETERS_STRUCT, 8),
        (VIRTUAL_DISK_SIZE_STRUCT, 8),
        (SECTOR_SIZE_STRUCT, 4),
        (PAGE_83_DATA_STRUCT, 16),
        (BAT_ENTRY_STRUCT, 8),
    ],
)
def test_struct_size(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


# --- create ----------------------------------------------------------------------------------


def test_create_signatures(empty_vhdx: Path) -> None:
    assert read_bytes(empty_vhdx, 0, 8) == b"vhdxfile"
    assert read_bytes(empty_vhdx, 8, 8) == "lcow".encode("utf-16-le")
    assert read_bytes(empty_vhdx, HEADER_OFFSETS[0], 4) == b"head"
    assert read_bytes(empty_vhdx, HEADER_OFFSETS[1], 4) == b"head"
    assert read_bytes(empty_vhdx, REGION_TABLE_OFFSETS[0], 4) == b"regi"
    assert read_bytes(empty_vhdx, REGION_TABLE_OFFSETS[1], 4) == b"regi"
    assert read_bytes(empty_vhdx, region_offsets(empty_vhdx)[METADATA_GUID], 8) == b"metadata"


def test_create_header_fields(empty_vhdx: Path) -> None:
    header = read_bytes(empty_vhdx, HEADER_OFFSETS[1], HEADER_SIZE)

    assert header_checksum_valid(empty_vhdx, 0)
    assert header_checksum_valid(empty_vhdx, 1)
    assert header_sequence_number(empty_vhdx, 0) == 0
    assert header_sequence_number(empty_vhdx, 1) == 1
    assert header[48:64] == bytes(16)  # LogGuid: no log to replay
    assert struct.unpack_from("<HHIQ", header, 64) == (0, 1, 1 * MIB, 1 * MIB)
    assert header[80:] == bytes(4016)


def test_create_region_tables(empty_vhdx: Path) -> None:
    first = read_bytes(empty_vhdx, REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE)
    second = read_bytes(empty_vhdx, REGION_TABLE_OFFSETS[1], REGION_TABLE_SIZE)

    assert first == second
    assert int.from_bytes(first[4:8], "little") == crc32c_with_zero_field(first)
    assert set(region_offsets(empty_vhdx)) == {BAT_GUID, METADATA_GUID}


def test_create_file_parameters(empty_vhdx: Path) -> None:
    item = read_bytes(empty_vhdx, metadata_item_offset(empty_vhdx, FILE_PARAMETERS_GUID), 8)

    block_size, flags = struct.unpack("<II", item)
    assert block_size == 1 * MIB
    assert flags == 0  # LeaveBlockAllocated and HasParent clear: a dynamic disk


def test_create_qemu_check_clean(empty_vhdx: Path) -> None:
    result = qemu_check(empty_vhdx)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def test_create_qemu_info(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    create(path, 3 * GIB + 512)

    info = qemu_info(path)

    assert info["format"] == "vhdx"
    assert info["virtual-size"] == 3 * GIB + 512
    assert info["cluster-size"] == 32 * MIB


def test_create_deterministic(tmp_path: Path) -> None:
    create(tmp_path / "a.vhdx", 64 * MIB, disk_id=DISK_ID)
    create(tmp_path / "b.vhdx", 64 * MIB, disk_id=DISK_ID)

    assert (tmp_path / "a.vhdx").read_bytes() == (tmp_path / "b.vhdx").read_bytes()


def test_create_random_disk_id(tmp_path: Path) -> None:
    create(tmp_path / "a.vhdx", 64 * MIB)
    create(tmp_path / "b.vhdx", 64 * MIB)

    with VhdxFile(tmp_path / "a.vhdx") as first, VhdxFile(tmp_path / "b.vhdx") as second:
        assert first.disk_id != second.disk_id
    assert header_guid(tmp_path / "a.vhdx", 1, FILE_WRITE_GUID_FIELD) != header_guid(
        tmp_path / "b.vhdx", 1, FILE_WRITE_GUID_FIELD
    )


def test_create_properties(empty_vhdx: Path) -> None:
    with VhdxFile(empty_vhdx) as vhdx:
        assert vhdx.virtual_size == 16 * MIB
        assert vhdx.block_size == 1 * MIB
        assert vhdx.logical_sector_size == 512
        assert vhdx.physical_sector_size == 4096
        assert vhdx.disk_id == DISK_ID
        assert list(vhdx.allocated_ranges()) == []
        assert vhdx.read(0, 16 * MIB) == bytes(16 * MIB)


def test_create_terabyte_small(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"

    started = time.monotonic()
    create(path, 1 * TIB)
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 5
    assert allocated_bytes(path) < 1 * MIB
    assert path.stat().st_size <= 4 * MIB
    assert qemu_info(path)["virtual-size"] == 1 * TIB
    assert qemu_check(path).returncode == 0


def test_terabyte_write_at_end(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    create(path, 1 * TIB)

    with VhdxFile(path, writable=True) as vhdx:
        vhdx.write(1 * TIB - 4096, b"\xee" * 4096)

    assert allocated_bytes(path) < 2 * MIB
    assert qemu_check(path).returncode == 0
    run_tool(["qemu-io", "-r", "-f", "vhdx", "-c", "read -P 0xee 1099511623680 4096", str(path)])


def test_create_existing_rejected(empty_vhdx: Path) -> None:
    before = empty_vhdx.read_bytes()

    with pytest.raises(AlreadyExistsError, match="remove it first"):
        create(empty_vhdx, 32 * MIB)

    assert empty_vhdx.read_bytes() == before


def test_create_missing_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        create(tmp_path / "missing" / "disk.vhdx", 32 * MIB)


def test_create_leaves_no_temporary(tmp_path: Path) -> None:
    create(tmp_path / "disk.vhdx", 32 * MIB)

    assert [path.name for path in tmp_path.iterdir()] == ["disk.vhdx"]


@pytest.mark.parametrize(
    ("size", "options", "message"),
    [
        (0, {}, "virtual size 0"),
        (1000, {}, "virtual size 1000"),
        (4096 + 512, {"logical_sector_size": 4096}, "4096-byte logical sector size"),
        (64 * TIB + 512, {}, "64 TiB"),
        (MIB, {"block_size_bytes": 3 * MIB}, "block size 3145728"),
        (MIB, {"block_size_bytes": 512 * KIB}, "block size 524288"),
        (MIB, {"block_size_bytes": 512 * MIB}, "block size 536870912"),
        (MIB, {"logical_sector_size": 1024}, "logical sector size 1024"),
        (MIB, {"physical_sector_size": 520}, "physical sector size 520"),
        (MIB, {"disk_id": b"short"}, "disk id"),
    ],
)
def test_create_invalid_argument(
    tmp_path: Path, size: int, options: dict[str, object], message: str
) -> None:
    path = tmp_path / "disk.vhdx"

    with pytest.raises(InvalidArgumentError, match=message):
        create(path, size, **options)  # type: ignore[arg-type]

    assert not path.exists()


# --- write -----------------------------------------------------------------------------------


def write_ranges(block_size: int, disk_size: int) -> list[tuple[int, int]]:
    """Return (offset, length) of writes that cover the hard cases for one geometry."""
    return [
        (7, 100),  # unaligned, inside the first block
        (block_size - 3, 10),  # crosses from block 0 into block 1
        (2 * block_size - 1000, 2 * block_size + 2000),  # spans three blocks
        (disk_size - 513, 513),  # ends at the last byte, in the partial last block
        (5, 20),  # overwrites part of the first write, in a block that is present
        (3 * block_size + 4096, 4096),  # aligned, in a block that is present
    ]


@pytest.mark.parametrize("block_size", [1 * MIB, 32 * MIB])
def test_write_ranges_qemu_convert(tmp_path: Path, block_size: int) -> None:
    disk_size = 4 * block_size + 3 * 512
    path = tmp_path / "disk.vhdx"
    create(path, disk_size, block_size_bytes=block_size)
    expected = bytearray(disk_size)

    with VhdxFile(path, writable=True) as vhdx:
        for seed, (offset, length) in enumerate(write_ranges(block_size, disk_size)):
            data = pattern(seed, length)
            vhdx.write(offset, data)
            expected[offset : offset + length] = data

    converted = tmp_path / "converted.raw"
    run_tool(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(converted)])
    result = qemu_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert converted.read_bytes() == expected


def test_write_ranges_4096_sectors(tmp_path: Path) -> None:
    """QEMU 7.2 refuses to open VHDX files with 4096-byte logical sectors ("Operation not
    supported"), so lcow's own reader, after a reopen, and cmp check this geometry."""
    block_size = 1 * MIB
    disk_size = 4 * block_size + 3 * 4096
    path = tmp_path / "disk.vhdx"
    create(path, disk_size, block_size_bytes=block_size, logical_sector_size=4096)
    writes = [
        (offset, pattern(seed, length))
        for seed, (offset, length) in enumerate(write_ranges(block_size, disk_size))
    ]

    with VhdxFile(path, writable=True) as vhdx:
        for offset, data in writes:
            vhdx.write(offset, data)
    expected = tmp_path / "expected.raw"
    make_sparse_raw(expected, disk_size, writes)
    converted = tmp_path / "converted.raw"
    vhdx_to_raw(path, converted)

    with VhdxFile(path) as vhdx:
        assert vhdx.logical_sector_size == 4096
        assert vhdx.read(0, disk_size) == expected.read_bytes()
    assert run_tool(["cmp", str(expected), str(converted)]).returncode == 0


@pytest.mark.parametrize(
    ("block_size", "chunk_start"),
    [
        # chunk ratio = 2**23 * 512 / block size payload blocks per sector bitmap block, so
        # the second chunk starts at 2**23 * 512 bytes = 4 GiB.
        (256 * MIB, 4 * GIB),  # chunk ratio 16
        (1 * MIB, 4 * GIB),  # chunk ratio 4096
    ],
)
def test_write_across_chunks(tmp_path: Path, block_size: int, chunk_start: int) -> None:
    disk_size = chunk_start + 2 * block_size
    path = tmp_path / "disk.vhdx"
    create(path, disk_size, block_size_bytes=block_size)

    with VhdxFile(path, writable=True) as vhdx:
        vhdx.write(chunk_start - 100, b"\xcd" * 200)  # last block of chunk 0, first of chunk 1
        vhdx.write(chunk_start + block_size + 4096, b"\x5a" * 4096)

    # qemu-img compare would read the whole disk, because QEMU 7.2 reports every VHDX block
    # as data. qemu-io reads just the ranges around the writes.
    reads = [
        f"read -P 0 {chunk_start - 4196} 4096",
        f"read -P 0xcd {chunk_start - 100} 200",
        f"read -P 0 {chunk_start + 100} 4096",
        f"read -P 0 {chunk_start + block_size} 4096",
        f"read -P 0x5a {chunk_start + block_size + 4096} 4096",
    ]
    commands = [argument for read in reads for argument in ("-c", read)]
    output = run_tool(["qemu-io", "-r", "-f", "vhdx", *commands, str(path)]).stdout
    assert "Pattern verification failed" not in output
    assert output.count("read ") == len(reads)
    assert qemu_check(path).returncode == 0


def test_bat_index_4096_sectors(tmp_path: Path) -> None:
    """With 4096-byte sectors and 1 MiB blocks a chunk contains 32768 payload blocks, so block
    32768 (at 32 GiB) has BAT index 32769, after the sector bitmap entry of chunk 0."""
    path = tmp_path / "disk.vhdx"
    create(path, 33 * GIB, block_size_bytes=1 * MIB, logical_sector_size=4096)

    with VhdxFile(path, writable=True) as vhdx:
        vhdx.write(32 * GIB, b"chunk 1")
    bat = region_offsets(path)[BAT_GUID]
    sector_bitmap_entry = int.from_bytes(read_bytes(path, bat + 8 * 32768, 8), "little")
    payload_entry = int.from_bytes(read_bytes(path, bat + 8 * 32769, 8), "little")

    assert sector_bitmap_entry == 0  # SB_BLOCK_NOT_PRESENT, as a dynamic disk requires
    assert payload_entry & 0b111 == PayloadBlockState.PAYLOAD_BLOCK_FULLY_PRESENT
    block_offset = (payload_entry >> 20) * MIB
    assert read_bytes(path, block_offset, 7) == b"chunk 1"


def test_write_zeros_allocates_nothing(empty_vhdx: Path) -> None:
    size_before = empty_vhdx.stat().st_size

    with VhdxFile(empty_vhdx, writable=True) as vhdx:
        vhdx.write(0, bytes(3 * MIB))
        ranges = list(vhdx.allocated_ranges())

    assert ranges == []
    assert empty_vhdx.stat().st_size == size_before


def test_write_zeros_into_present_block(written_vhdx: Path) -> None:
    with VhdxFile(written_vhdx, writable=True) as vhdx:
        vhdx.write(1 * MIB, bytes(100))
        data = vhdx.read(1 * MIB, 200)

    assert data == bytes(100) + pattern(1, 200)[100:]


def test_allocated_ranges_merge_blocks(written_vhdx: Path) -> None:
    with VhdxFile(written_vhdx, writable=True) as vhdx:
        vhdx.write(16 * MIB - 10, b"x" * 10)
        ranges = list(vhdx.allocated_ranges())

    assert ranges == [(1 * MIB, 3 * MIB), (15 * MIB, 1 * MIB)]


def test_write_persists_after_reopen(written_vhdx: Path) -> None:
    with VhdxFile(written_vhdx) as vhdx:
        data = vhdx.read(0, 5 * MIB)

    assert data == bytes(1 * MIB) + pattern(1, 3 * MIB) + bytes(1 * MIB)


def test_flush_publishes_bat(empty_vhdx: Path) -> None:
    vhdx = VhdxFile(empty_vhdx, writable=True)
    vhdx.write(0, b"data")
    vhdx.flush()

    # qemu-img opens the file without lcow's lock and reads what flush() wrote.
    converted = empty_vhdx.with_suffix(".raw")
    run_tool(
        ["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", str(empty_vhdx), str(converted)]
    )
    vhdx.close()
    assert read_bytes(converted, 0, 4) == b"data"


def test_write_updates_headers(empty_vhdx: Path) -> None:
    file_write_guid = header_guid(empty_vhdx, 1, FILE_WRITE_GUID_FIELD)
    data_write_guid = header_guid(empty_vhdx, 1, DATA_WRITE_GUID_FIELD)

    with VhdxFile(empty_vhdx, writable=True) as vhdx:
        vhdx.write(0, b"data")

    assert header_sequence_number(empty_vhdx, 0) == 2
    assert header_sequence_number(empty_vhdx, 1) == 3
    assert header_checksum_valid(empty_vhdx, 0)
    assert header_checksum_valid(empty_vhdx, 1)
    assert header_guid(empty_vhdx, 1, FILE_WRITE_GUID_FIELD) != file_write_guid
    assert header_guid(empty_vhdx, 1, DATA_WRITE_GUID_FIELD) != data_write_guid
    assert header_guid(empty_vhdx, 0, FILE_WRITE_GUID_FIELD) == header_guid(
        empty_vhdx, 1, FILE_WRITE_GUID_FIELD
    )
    assert qemu_check(empty_vhdx).returncode == 0


def test_open_writable_without_write(empty_vhdx: Path) -> None:
    before = empty_vhdx.read_bytes()

    with VhdxFile(empty_vhdx, writable=True) as vhdx:
        vhdx.read(0, 4096)

    assert empty_vhdx.read_bytes() == before


def test_write_into_qemu_file(tmp_path: Path) -> None:
    path = tmp_path / "qemu.vhdx"
    run_tool(
        ["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic", str(path), "64M"]
    )
    run_tool(["qemu-io", "-f", "vhdx", "-c", "write -P 0xab 1M 3M", str(path)])

    with VhdxFile(path, writable=True) as vhdx:
        vhdx.write(2 * MIB - 1, b"\x01\x02")  # inside qemu's block
        vhdx.write(40 * MIB, b"\x03" * 5000)  # a block that qemu left in PAYLOAD_BLOCK_ZERO
    expected = tmp_path / "expected.raw"
    make_sparse_raw(
        expected,
        64 * MIB,
        [(1 * MIB, b"\xab" * 3 * MIB), (2 * MIB - 1, b"\x01\x02"), (40 * MIB, b"\x03" * 5000)],
    )

    result = qemu_compare(path, expected)
    assert result.returncode == 0, result.stdout + result.stderr
    assert qemu_check(path).returncode == 0


def test_write_read_only_rejected(empty_vhdx: Path) -> None:
    with VhdxFile(empty_vhdx) as vhdx, pytest.raises(FailedPreconditionError, match="read-only"):
        vhdx.write(0, b"data")


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (16 * MIB - 1, 2), (16 * MIB, 1)])
def test_range_outside_disk_rejected(empty_vhdx: Path, offset: int, length: int) -> None:
    with VhdxFile(empty_vhdx, writable=True) as vhdx:
        with pytest.raises(InvalidArgumentError, match=f"offset {offset}"):
            vhdx.write(offset, b"x" * length)
        with pytest.raises(InvalidArgumentError, match="16777216 bytes"):
            vhdx.read(offset, length)


def test_closed_file_rejected(empty_vhdx: Path) -> None:
    vhdx = VhdxFile(empty_vhdx)
    vhdx.close()
    vhdx.close()

    assert vhdx.closed
    with pytest.raises(FailedPreconditionError, match="closed"):
        vhdx.read(0, 1)


def test_second_writer_rejected(empty_vhdx: Path) -> None:
    with VhdxFile(empty_vhdx, writable=True):
        with pytest.raises(FailedPreconditionError, match="another VhdxFile"):
            VhdxFile(empty_vhdx, writable=True)
        with pytest.raises(FailedPreconditionError, match="for writing"):
            VhdxFile(empty_vhdx)


def test_readers_share(empty_vhdx: Path) -> None:
    with VhdxFile(empty_vhdx) as first, VhdxFile(empty_vhdx) as second:
        assert first.read(0, 10) == second.read(0, 10)


# --- read files that QEMU wrote --------------------------------------------------------------


def test_read_qemu_io_write(tmp_path: Path) -> None:
    path = tmp_path / "qemu.vhdx"
    run_tool(
        ["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic", str(path), "64M"]
    )
    run_tool(["qemu-io", "-f", "vhdx", "-c", "write -P 0xab 1M 3M", str(path)])

    with VhdxFile(path) as vhdx:
        data = vhdx.read(0, vhdx.virtual_size)
        ranges = list(vhdx.allocated_ranges())

    assert data == bytes(1 * MIB) + b"\xab" * 3 * MIB + bytes(60 * MIB)
    assert ranges == [(0, 8 * MIB)]  # QEMU 7.2 picks 8 MiB blocks for a 64 MiB disk


def test_read_qemu_chunks(tmp_path: Path) -> None:
    path = tmp_path / "qemu.vhdx"
    run_tool(
        [
            "qemu-img", "create", "-q", "-f", "vhdx", "-o",
            "subformat=dynamic,block_size=268435456", str(path), "6G",
        ]
    )  # fmt: skip
    # With 256 MiB blocks a chunk contains 16 blocks, so 4 GiB is the first byte of chunk 1.
    run_tool(
        [
            "qemu-io",
            "-f",
            "vhdx",
            "-c",
            "write -P 0xcd 4G 1M",
            "-c",
            "write -P 0x11 5G 4K",
            str(path),
        ]
    )

    with VhdxFile(path) as vhdx:
        assert vhdx.read(4 * GIB - 4096, 4096) == bytes(4096)
        assert vhdx.read(4 * GIB, 1 * MIB) == b"\xcd" * MIB
        assert vhdx.read(5 * GIB, 4096) == b"\x11" * 4096
        assert list(vhdx.allocated_ranges()) == [(4 * GIB, 256 * MIB), (5 * GIB, 256 * MIB)]


def test_read_qemu_convert(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    writes = [
        (0, pattern(1, 5000)),
        (7 * MIB - 3, pattern(2, 2 * MIB)),
        (48 * MIB - 512, pattern(3, 512)),
    ]
    make_sparse_raw(raw, 48 * MIB, writes)
    path = tmp_path / "qemu.vhdx"
    run_tool(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
            str(raw),
            str(path),
        ]
    )

    with VhdxFile(path) as vhdx:
        data = vhdx.read(0, vhdx.virtual_size)

    assert data == raw.read_bytes()


def test_vhdx_to_raw_qemu_file(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    make_sparse_raw(raw, 48 * MIB, [(3 * MIB, pattern(4, 3 * MIB)), (47 * MIB, pattern(5, 100))])
    path = tmp_path / "qemu.vhdx"
    run_tool(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
            str(raw),
            str(path),
        ]
    )
    back = tmp_path / "back.raw"

    vhdx_to_raw(path, back)

    assert back.stat().st_size == 48 * MIB
    assert run_tool(["cmp", str(raw), str(back)]).returncode == 0


# --- raw <-> vhdx ----------------------------------------------------------------------------


@pytest.mark.parametrize("ext4_size", [20 * GIB])
def test_roundtrip_sparse_ext4(tmp_path: Path, ext4_size: int) -> None:
    raw = tmp_path / "ext4.img"
    with raw.open("wb") as file:
        file.truncate(ext4_size)
    run_tool(["mke2fs", "-q", "-t", "ext4", "-F", str(raw)])
    data_bytes = sum(length for _, length in data_ranges(raw))
    path = tmp_path / "ext4.vhdx"
    back = tmp_path / "back.img"

    copied = raw_to_vhdx(raw, path, disk_id=DISK_ID)
    compared = qemu_compare(path, raw)
    vhdx_to_raw(path, back)

    assert copied == data_bytes
    # Only data reaches the VHDX: its allocation is the data plus about 200 KiB of headers,
    # tables and metadata, whatever the size of the disk.
    assert allocated_bytes(path) <= data_bytes + 1 * MIB
    assert qemu_check(path).returncode == 0
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert back.stat().st_size == ext4_size
    assert allocated_bytes(back) <= data_bytes + 1 * MIB
    assert same_data_ranges(raw, back)


def same_data_ranges(first: Path, second: Path) -> bool:
    """Compare two sparse files of one size over the data ranges of either file.

    Outside those ranges both read as zeros, so this equals cmp, which would read every byte
    of the holes too and take a minute for 20 GiB. The layouts may differ: the VHDX skips
    all-zero blocks that mke2fs wrote as data.
    """
    if first.stat().st_size != second.stat().st_size:
        return False
    ranges = sorted([*data_ranges(first), *data_ranges(second)])
    with first.open("rb") as one, second.open("rb") as other:
        for offset, length in ranges:
            one.seek(offset)
            other.seek(offset)
            left = length
            while left:
                size = min(left, 4 * MIB)
                if one.read(size) != other.read(size):
                    return False
                left -= size
    return True


def test_raw_to_vhdx_deterministic(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    make_sparse_raw(raw, 40 * MIB, [(5 * MIB, pattern(6, 3 * MIB))])

    raw_to_vhdx(raw, tmp_path / "a.vhdx", disk_id=DISK_ID)
    raw_to_vhdx(raw, tmp_path / "b.vhdx", disk_id=DISK_ID)

    assert (tmp_path / "a.vhdx").read_bytes() == (tmp_path / "b.vhdx").read_bytes()


def test_raw_to_vhdx_options(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    make_sparse_raw(raw, 40 * MIB, [(5 * MIB, pattern(7, 3 * MIB))])
    path = tmp_path / "disk.vhdx"

    raw_to_vhdx(
        raw, path, block_size_bytes=4 * MIB, logical_sector_size=4096, physical_sector_size=512
    )

    with VhdxFile(path) as vhdx:
        assert vhdx.block_size == 4 * MIB
        assert vhdx.logical_sector_size == 4096
        assert vhdx.physical_sector_size == 512
        assert list(vhdx.allocated_ranges()) == [(4 * MIB, 4 * MIB)]
    back = tmp_path / "back.raw"
    vhdx_to_raw(path, back)
    assert run_tool(["cmp", str(raw), str(back)]).returncode == 0


def test_raw_to_vhdx_unaligned_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    make_sparse_raw(raw, 1 * MIB + 100, [])

    with pytest.raises(InvalidArgumentError, match="truncate -s %512"):
        raw_to_vhdx(raw, tmp_path / "disk.vhdx")

    assert not (tmp_path / "disk.vhdx").exists()


def test_raw_to_vhdx_missing_raw(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"missing\.raw"):
        raw_to_vhdx(tmp_path / "missing.raw", tmp_path / "disk.vhdx")


def test_vhdx_to_raw_existing_rejected(written_vhdx: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing.raw"
    existing.write_bytes(b"keep")

    with pytest.raises(AlreadyExistsError, match=r"existing\.raw"):
        vhdx_to_raw(written_vhdx, existing)

    assert existing.read_bytes() == b"keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk.vhdx", "existing.raw"]


# --- rejected files --------------------------------------------------------------------------


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="file not found"):
        VhdxFile(tmp_path / "missing.vhdx")


def test_bad_signature_rejected(empty_vhdx: Path) -> None:
    patch_bytes(empty_vhdx, 0, b"vhdxFILE")

    with pytest.raises(CorruptInputError, match="file type identifier at offset 0") as caught:
        VhdxFile(empty_vhdx)

    assert "b'vhdxFILE'" in str(caught.value)


def test_truncated_file_rejected(empty_vhdx: Path) -> None:
    with empty_vhdx.open("r+b") as file:
        file.truncate(100 * KIB)

    with pytest.raises(CorruptInputError, match="past the end of the file"):
        VhdxFile(empty_vhdx)


def test_one_bad_header_uses_other(written_vhdx: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Header 2 is current after the write. A flipped reserved byte breaks its checksum.
    patch_bytes(written_vhdx, HEADER_OFFSETS[1] + 1000, b"\x01")

    with caplog.at_level(logging.WARNING, logger="lcow.vhdx"), VhdxFile(written_vhdx) as vhdx:
        data = vhdx.read(1 * MIB, 3 * MIB)

    assert data == pattern(1, 3 * MIB)
    assert "using the other header" in caplog.text
    assert "131072" in caplog.text


def test_bad_header_checksums_rejected(empty_vhdx: Path) -> None:
    for offset in HEADER_OFFSETS:
        patch_bytes(empty_vhdx, offset + 1000, b"\x01")

    with pytest.raises(CorruptInputError, match="no valid header") as caught:
        VhdxFile(empty_vhdx)

    assert "header at offset 65536: checksum" in str(caught.value)
    assert "header at offset 131072: checksum" in str(caught.value)


def test_bad_header_signature_rejected(empty_vhdx: Path) -> None:
    for offset in HEADER_OFFSETS:
        patch_checksummed(empty_vhdx, offset, HEADER_SIZE, 0, b"HEAD")

    with pytest.raises(CorruptInputError, match="invalid signature b'HEAD'"):
        VhdxFile(empty_vhdx)


def test_log_guid_rejected(empty_vhdx: Path) -> None:
    log_guid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    patch_checksummed(empty_vhdx, HEADER_OFFSETS[1], HEADER_SIZE, LOG_GUID_FIELD, log_guid.bytes_le)

    with pytest.raises(UnsupportedError, match="qemu-img check -r all") as caught:
        VhdxFile(empty_vhdx)

    assert str(log_guid) in str(caught.value)
    assert "Hyper-V" in str(caught.value)


def test_stale_header_log_guid_ignored(empty_vhdx: Path) -> None:
    # Header 1 has SequenceNumber 0 and header 2 has 1, so header 1 is not current.
    patch_checksummed(empty_vhdx, HEADER_OFFSETS[0], HEADER_SIZE, LOG_GUID_FIELD, b"\x01" * 16)

    with VhdxFile(empty_vhdx) as vhdx:
        assert vhdx.virtual_size == 16 * MIB


def test_higher_sequence_number_current(empty_vhdx: Path) -> None:
    patch_checksummed(empty_vhdx, HEADER_OFFSETS[0], HEADER_SIZE, LOG_GUID_FIELD, b"\x01" * 16)
    patch_checksummed(
        empty_vhdx, HEADER_OFFSETS[0], HEADER_SIZE, SEQUENCE_NUMBER_FIELD, (7).to_bytes(8, "little")
    )

    with pytest.raises(UnsupportedError, match="header at offset 65536 has LogGuid"):
        VhdxFile(empty_vhdx)


def test_equal_sequence_numbers_rejected(empty_vhdx: Path) -> None:
    patch_checksummed(
        empty_vhdx, HEADER_OFFSETS[0], HEADER_SIZE, SEQUENCE_NUMBER_FIELD, (1).to_bytes(8, "little")
    )
    patch_checksummed(
        empty_vhdx, HEADER_OFFSETS[0], HEADER_SIZE, FILE_WRITE_GUID_FIELD, b"\x02" * 16
    )

    with pytest.raises(CorruptInputError, match="same SequenceNumber 1"):
        VhdxFile(empty_vhdx)


def test_identical_headers_accepted(empty_vhdx: Path) -> None:
    patch_bytes(
        empty_vhdx, HEADER_OFFSETS[0], read_bytes(empty_vhdx, HEADER_OFFSETS[1], HEADER_SIZE)
    )

    with VhdxFile(empty_vhdx) as vhdx:
        assert vhdx.virtual_size == 16 * MIB


def test_unknown_version_rejected(empty_vhdx: Path) -> None:
    patch_checksummed(empty_vhdx, HEADER_OFFSETS[1], HEADER_SIZE, 66, (2).to_bytes(2, "little"))

    with pytest.raises(UnsupportedError, match="Version 2"):
        VhdxFile(empty_vhdx)


def test_one_bad_region_table_uses_other(written_vhdx: Path) -> None:
    patch_bytes(written_vhdx, REGION_TABLE_OFFSETS[0] + 100, b"\x01")

    with VhdxFile(written_vhdx) as vhdx:
        assert vhdx.read(1 * MIB, 3 * MIB) == pattern(1, 3 * MIB)


def test_bad_region_tables_rejected(empty_vhdx: Path) -> None:
    for offset in REGION_TABLE_OFFSETS:
        patch_bytes(empty_vhdx, offset + 100, b"\x01")

    with pytest.raises(CorruptInputError, match="no valid region table") as caught:
        VhdxFile(empty_vhdx)

    assert "region table at offset 196608: checksum" in str(caught.value)
    assert "region table at offset 262144: checksum" in str(caught.value)


def test_unknown_required_region_rejected(empty_vhdx: Path) -> None:
    entry = uuid.uuid4().bytes_le + struct.pack("<QII", 100 * MIB, 1 * MIB, 1)
    for offset in REGION_TABLE_OFFSETS:
        patch_checksummed(empty_vhdx, offset, REGION_TABLE_SIZE, 8, (3).to_bytes(4, "little"))
        patch_checksummed(empty_vhdx, offset, REGION_TABLE_SIZE, 16 + 2 * 32, entry)

    with pytest.raises(UnsupportedError, match="marked required"):
        VhdxFile(empty_vhdx)


def test_has_parent_rejected(empty_vhdx: Path) -> None:
    offset = metadata_item_offset(empty_vhdx, FILE_PARAMETERS_GUID)
    patch_bytes(empty_vhdx, offset + 4, (0b10).to_bytes(4, "little"))

    with pytest.raises(UnsupportedError, match="HasParent") as caught:
        VhdxFile(empty_vhdx)

    assert "differencing disk" in str(caught.value)


def test_bad_block_size_rejected(empty_vhdx: Path) -> None:
    offset = metadata_item_offset(empty_vhdx, FILE_PARAMETERS_GUID)
    patch_bytes(empty_vhdx, offset, (3 * MIB).to_bytes(4, "little"))

    with pytest.raises(CorruptInputError, match="BlockSize 3145728"):
        VhdxFile(empty_vhdx)


def test_bat_entry_outside_file_rejected(empty_vhdx: Path) -> None:
    state = PayloadBlockState.PAYLOAD_BLOCK_FULLY_PRESENT
    set_bat_entry(empty_vhdx, 1, (1000 << 20) | state)

    with VhdxFile(empty_vhdx) as vhdx:
        assert vhdx.read(0, 1 * MIB) == bytes(1 * MIB)
        with pytest.raises(CorruptInputError, match="BAT entry 1 at offset") as caught:
            vhdx.read(1 * MIB, 1)

    assert f"file offset {1000 * MIB}" in str(caught.value)


@pytest.mark.parametrize(
    ("state", "message"),
    [(4, "reserved state 4"), (5, "reserved state 5"), (7, "PARTIALLY_PRESENT")],
)
def test_bad_bat_state_rejected(empty_vhdx: Path, state: int, message: str) -> None:
    set_bat_entry(empty_vhdx, 2, (5 << 20) | state)

    with VhdxFile(empty_vhdx) as vhdx, pytest.raises(CorruptInputError, match=message):
        list(vhdx.allocated_ranges())


@pytest.mark.parametrize(
    "state",
    [
        PayloadBlockState.PAYLOAD_BLOCK_UNDEFINED,
        PayloadBlockState.PAYLOAD_BLOCK_ZERO,
        PayloadBlockState.PAYLOAD_BLOCK_UNMAPPED,
    ],
)
def test_absent_states_read_zeros(written_vhdx: Path, state: PayloadBlockState) -> None:
    set_bat_entry(written_vhdx, 1, state)

    with VhdxFile(written_vhdx) as vhdx:
        assert vhdx.read(1 * MIB, 1 * MIB) == bytes(1 * MIB)
        assert list(vhdx.allocated_ranges()) == [(2 * MIB, 2 * MIB)]


# --- property --------------------------------------------------------------------------------

PROPERTY_DISK_SIZE: Final = 5 * MIB + 3 * 512


@st.composite
def write_operations(draw: st.DrawFn) -> tuple[int, bytes]:
    """One write: an offset in the disk and data that is random or all zeros."""
    offset = draw(st.integers(0, PROPERTY_DISK_SIZE - 1))
    length = draw(st.integers(1, min(PROPERTY_DISK_SIZE - offset, 2 * MIB + 1000)))
    if draw(st.booleans()):
        return offset, bytes(length)
    return offset, pattern(draw(st.integers(0, 2**32)), length)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(writes=st.lists(write_operations(), max_size=12), reopen_after=st.integers(0, 12))
def test_random_writes_match_model(writes: list[tuple[int, bytes]], reopen_after: int) -> None:
    """Writes in two sessions read back as a bytearray model, also after reopening."""
    model = bytearray(PROPERTY_DISK_SIZE)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "disk.vhdx"
        create(path, PROPERTY_DISK_SIZE, block_size_bytes=1 * MIB)

        for session in (writes[:reopen_after], writes[reopen_after:]):
            with VhdxFile(path, writable=True) as vhdx:
                for offset, data in session:
                    vhdx.write(offset, data)
                    model[offset : offset + len(data)] = data
                assert vhdx.read(0, PROPERTY_DISK_SIZE) == model

        with VhdxFile(path) as vhdx:
            assert vhdx.read(0, PROPERTY_DISK_SIZE) == model
            ranges = list(vhdx.allocated_ranges())

    unallocated = bytearray(model)
    for start, length in ranges:
        unallocated[start : start + length] = bytes(length)
    assert unallocated == bytes(PROPERTY_DISK_SIZE)
