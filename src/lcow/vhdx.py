"""Dynamic VHDX disks: create, read, write, and convert to and from raw images.

The layout, field names, GUIDs and rules follow Microsoft's Open Specifications document
"[MS-VHDX]: Virtual Hard Disk v2 (VHDX) File Format" on learn.microsoft.com. Comments name
the section of that document that a rule comes from.

Every structure is little-endian. A GUID is stored in the Windows binary form, which
``uuid.UUID.bytes_le`` produces.

lcow reads and writes VHDX files whose HasParent bit is clear (dynamic disks, and fixed disks,
which differ only in LeaveBlockAllocated) and whose log is empty (LogGuid zero). It rejects
differencing disks and files with a log to replay with UnsupportedError.

lcow never writes the log. It writes payload data first and flushes it, and only then writes
the BAT entries that point to that data. A crash can therefore leave allocated blocks that
no BAT entry references, but no BAT entry that points at data which never reached the disk.

The layout that create() writes:

    offset    length       content
    0         64 KiB       file type identifier "vhdxfile", creator "lcow"
    64 KiB    4 KiB        header 1, SequenceNumber 0
    128 KiB   4 KiB        header 2, SequenceNumber 1, so header 2 is the current header
    192 KiB   64 KiB       region table 1
    256 KiB   64 KiB       region table 2, a copy of region table 1
    1 MiB     1 MiB        log, empty
    2 MiB     1 MiB        metadata region: the metadata table, then the five items
    3 MiB     n x 1 MiB    BAT, every entry PAYLOAD_BLOCK_NOT_PRESENT
    ...                    payload blocks, appended as data is written

The log and the BAT are holes in a sparse file until something writes to them.
"""

import array
import contextlib
import enum
import errno
import fcntl
import logging
import os
import struct
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Self

from lcow import spawn
from lcow.crc import crc32c
from lcow.errors import (
    AlreadyExistsError,
    CorruptInputError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)

logger = logging.getLogger(__name__)

KIB: Final = 1024
MIB: Final = 1024 * KIB
TIB: Final = 1024**4

# --- Layout of the header section, the first 1 MiB of the file -----------------------------

HEADER_SECTION_SIZE_BYTES: Final = 1 * MIB
FILE_IDENTIFIER_OFFSET: Final = 0
HEADER_OFFSETS: Final = (64 * KIB, 128 * KIB)
REGION_TABLE_OFFSETS: Final = (192 * KIB, 256 * KIB)

HEADER_SIZE_BYTES: Final = 4 * KIB
REGION_TABLE_SIZE_BYTES: Final = 64 * KIB
METADATA_TABLE_SIZE_BYTES: Final = 64 * KIB

FILE_IDENTIFIER_SIGNATURE: Final = b"vhdxfile"
HEADER_SIGNATURE: Final = b"head"
REGION_TABLE_SIGNATURE: Final = b"regi"
METADATA_TABLE_SIGNATURE: Final = b"metadata"

# Headers and region tables store a CRC-32C at byte 4, computed over the whole 4 KiB header or
# 64 KiB region table with the checksum field counted as zero.
CHECKSUM_OFFSET: Final = 4
CHECKSUM_SIZE_BYTES: Final = 4

# The only values that the spec defines for the header's Version and LogVersion fields.
VHDX_VERSION: Final = 1
LOG_VERSION: Final = 0

MAX_REGION_TABLE_ENTRIES: Final = 2047
MAX_METADATA_TABLE_ENTRIES: Final = 2047

# --- Layout that create() writes ------------------------------------------------------------

# The spec requires LogLength and LogOffset to be multiples of 1 MiB, so 1 MiB is the
# smallest log. QEMU 7.2 writes the same size.
LOG_OFFSET_BYTES: Final = 1 * MIB
LOG_LENGTH_BYTES: Final = 1 * MIB
METADATA_REGION_OFFSET_BYTES: Final = 2 * MIB
METADATA_REGION_LENGTH_BYTES: Final = 1 * MIB
BAT_REGION_OFFSET_BYTES: Final = 3 * MIB

# Regions, the log and payload blocks sit at multiples of 1 MiB ("Region Table Entry", "BAT").
ALIGNMENT_BYTES: Final = 1 * MIB

# UTF-16 name in the file type identifier, for diagnostics only. It carries no version, so
# the bytes of a disk do not change between lcow releases.
CREATOR: Final = "lcow"

# --- Limits of the virtual disk ("File Parameters", "Virtual Disk Size", sector sizes) -----

MIN_BLOCK_SIZE_BYTES: Final = 1 * MIB
MAX_BLOCK_SIZE_BYTES: Final = 256 * MIB
# Hyper-V's default for dynamic disks. qemu-img 7.2 picks 8 MiB for disks up to 1 GiB, 16 MiB
# for 2 to 100 GiB, 32 MiB for 2 TiB and 64 MiB for 40 TiB (measured with `qemu-img create`).
DEFAULT_BLOCK_SIZE_BYTES: Final = 32 * MIB
SECTOR_SIZES_BYTES: Final = (512, 4096)
# qemu-img 7.2 rejects VHDX files with 4096-byte logical sectors ("Operation not supported"),
# so 512 keeps lcow's disks readable by QEMU.
DEFAULT_LOGICAL_SECTOR_SIZE_BYTES: Final = 512
# The physical sector size only tells the guest how to align writes. 4096 matches the page
# size and the ext4 block size of Linux guests.
DEFAULT_PHYSICAL_SECTOR_SIZE_BYTES: Final = 4096
MAX_VIRTUAL_DISK_SIZE_BYTES: Final = 64 * TIB
MAX_METADATA_ITEM_SIZE_BYTES: Final = 1 * MIB

# A sector bitmap block is 1 MiB and contains one bit per logical sector, so it covers 2**23
# sectors: one chunk. chunk ratio = (2**23 * logical sector size) / block size.
SECTORS_PER_SECTOR_BITMAP_BLOCK: Final = 2**23

DISK_ID_SIZE_BYTES: Final = 16

# --- Structures -----------------------------------------------------------------------------

# Signature, then Creator: up to 256 UTF-16 code units.
FILE_IDENTIFIER_STRUCT: Final = struct.Struct("<8s512s")

# Signature, Checksum, SequenceNumber, FileWriteGuid, DataWriteGuid, LogGuid, LogVersion,
# Version, LogLength, LogOffset, then 4016 reserved bytes that must be zero.
HEADER_STRUCT: Final = struct.Struct("<4sIQ16s16s16sHHIQ4016x")

# Signature, Checksum, EntryCount, Reserved.
REGION_TABLE_HEADER_STRUCT: Final = struct.Struct("<4sIII")

# Guid, FileOffset, Length, then Required in bit 0 of a 32-bit field.
REGION_TABLE_ENTRY_STRUCT: Final = struct.Struct("<16sQII")

# Signature, Reserved, EntryCount, then 20 reserved bytes.
METADATA_TABLE_HEADER_STRUCT: Final = struct.Struct("<8sHH20x")

# ItemId, Offset, Length, then IsUser, IsVirtualDisk and IsRequired in bits 0 to 2, Reserved2.
METADATA_TABLE_ENTRY_STRUCT: Final = struct.Struct("<16sIIII")

# BlockSize, then LeaveBlockAllocated and HasParent in bits 0 and 1.
FILE_PARAMETERS_STRUCT: Final = struct.Struct("<II")
VIRTUAL_DISK_SIZE_STRUCT: Final = struct.Struct("<Q")
SECTOR_SIZE_STRUCT: Final = struct.Struct("<I")
PAGE_83_DATA_STRUCT: Final = struct.Struct("<16s")

# State in bits 0 to 2, 17 reserved bits, FileOffsetMB in bits 20 to 63.
BAT_ENTRY_STRUCT: Final = struct.Struct("<Q")
BAT_STATE_MASK: Final = 0b111
BAT_FILE_OFFSET_SHIFT: Final = 20

_EXPECTED_SIZES: Final = {
    "file type identifier": (FILE_IDENTIFIER_STRUCT, 520),
    "header": (HEADER_STRUCT, HEADER_SIZE_BYTES),
    "region table header": (REGION_TABLE_HEADER_STRUCT, 16),
    "region table entry": (REGION_TABLE_ENTRY_STRUCT, 32),
    "metadata table header": (METADATA_TABLE_HEADER_STRUCT, 32),
    "metadata table entry": (METADATA_TABLE_ENTRY_STRUCT, 32),
    "File Parameters": (FILE_PARAMETERS_STRUCT, 8),
    "Virtual Disk Size": (VIRTUAL_DISK_SIZE_STRUCT, 8),
    "Logical Sector Size": (SECTOR_SIZE_STRUCT, 4),
    "Page 83 Data": (PAGE_83_DATA_STRUCT, 16),
    "BAT entry": (BAT_ENTRY_STRUCT, 8),
}


def _check_struct_sizes() -> None:
    for name, (layout, size) in _EXPECTED_SIZES.items():
        if layout.size != size:
            raise AssertionError(
                f"VHDX {name} layout is {layout.size} bytes, the spec requires {size}"
            )


_check_struct_sizes()

# flush() writes changed BAT entries back in pages of this size. Each page contains 512 entries.
BAT_PAGE_SIZE_BYTES: Final = 4 * KIB
BAT_ENTRIES_PER_PAGE: Final = BAT_PAGE_SIZE_BYTES // BAT_ENTRY_STRUCT.size

# Reads and writes of the conversions move at most this much data at a time, which bounds
# their memory use.
COPY_CHUNK_BYTES: Final = 4 * MIB

# vhdx_to_raw leaves all-zero pieces of this size as holes in the raw file. It is the block
# size of ext4 and XFS with default options, so each skipped piece is one block not allocated.
SPARSE_GRANULARITY_BYTES: Final = 4 * KIB

# --- GUIDs of the regions ("Region Table Entry") and of the system metadata items -----------

BAT_REGION_GUID: Final = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION_GUID: Final = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

FILE_PARAMETERS_GUID: Final = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID: Final = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA_GUID: Final = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID: Final = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID: Final = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID: Final = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

ZERO_GUID: Final = uuid.UUID(int=0)


class RegionEntryFlags(enum.IntFlag):
    """Bits of a region table entry's Required field."""

    NONE = 0x0
    REQUIRED = 0x1


class MetadataEntryFlags(enum.IntFlag):
    """Bits of a metadata table entry's flags field."""

    NONE = 0x0
    IS_USER = 0x1
    IS_VIRTUAL_DISK = 0x2
    IS_REQUIRED = 0x4


class FileParametersFlags(enum.IntFlag):
    """Bits of the File Parameters item after BlockSize."""

    NONE = 0x0
    LEAVE_BLOCK_ALLOCATED = 0x1
    HAS_PARENT = 0x2


class PayloadBlockState(enum.IntEnum):
    """States of a payload block's BAT entry. The spec reserves 4 and 5."""

    PAYLOAD_BLOCK_NOT_PRESENT = 0
    PAYLOAD_BLOCK_UNDEFINED = 1
    PAYLOAD_BLOCK_ZERO = 2
    PAYLOAD_BLOCK_UNMAPPED = 3
    PAYLOAD_BLOCK_FULLY_PRESENT = 6
    PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7


class SectorBitmapState(enum.IntEnum):
    """States of a sector bitmap block's BAT entry. The spec reserves 1 to 5 and 7."""

    SB_BLOCK_NOT_PRESENT = 0
    SB_BLOCK_PRESENT = 6


# The metadata items that create() writes, with the flags of the spec's table of known items.
# QEMU 7.2 writes the same flags.
_CREATED_ITEM_FLAGS: Final = {
    FILE_PARAMETERS_GUID: MetadataEntryFlags.IS_REQUIRED,
    VIRTUAL_DISK_SIZE_GUID: MetadataEntryFlags.IS_VIRTUAL_DISK | MetadataEntryFlags.IS_REQUIRED,
    PAGE_83_DATA_GUID: MetadataEntryFlags.IS_VIRTUAL_DISK | MetadataEntryFlags.IS_REQUIRED,
    LOGICAL_SECTOR_SIZE_GUID: MetadataEntryFlags.IS_VIRTUAL_DISK | MetadataEntryFlags.IS_REQUIRED,
    PHYSICAL_SECTOR_SIZE_GUID: MetadataEntryFlags.IS_VIRTUAL_DISK | MetadataEntryFlags.IS_REQUIRED,
}

# System metadata items that a reader must find, with their sizes in bytes.
_REQUIRED_ITEM_SIZES: Final = {
    FILE_PARAMETERS_GUID: FILE_PARAMETERS_STRUCT.size,
    VIRTUAL_DISK_SIZE_GUID: VIRTUAL_DISK_SIZE_STRUCT.size,
    PAGE_83_DATA_GUID: PAGE_83_DATA_STRUCT.size,
    LOGICAL_SECTOR_SIZE_GUID: SECTOR_SIZE_STRUCT.size,
    PHYSICAL_SECTOR_SIZE_GUID: SECTOR_SIZE_STRUCT.size,
}

_ITEM_NAMES: Final = {
    FILE_PARAMETERS_GUID: "File Parameters",
    VIRTUAL_DISK_SIZE_GUID: "Virtual Disk Size",
    PAGE_83_DATA_GUID: "Page 83 Data",
    LOGICAL_SECTOR_SIZE_GUID: "Logical Sector Size",
    PHYSICAL_SECTOR_SIZE_GUID: "Physical Sector Size",
    PARENT_LOCATOR_GUID: "Parent Locator",
}


@dataclass(frozen=True)
class Header:
    """Decoded VHDX header, with the spec's field names."""

    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int


@dataclass(frozen=True)
class RegionTableEntry:
    """Decoded region table entry: where the BAT or the metadata region lies in the file."""

    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool


@dataclass(frozen=True)
class DiskParameters:
    """Values of the metadata items that define the virtual disk."""

    block_size: int
    file_parameters_flags: FileParametersFlags
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    disk_id: bytes

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block: (2**23 * logical sector size) / block size."""
        return SECTORS_PER_SECTOR_BITMAP_BLOCK * self.logical_sector_size // self.block_size

    @property
    def payload_block_count(self) -> int:
        """Number of payload blocks that cover the virtual disk. The last one may be partial."""
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entry_count(self) -> int:
        """BAT entries of a dynamic disk: "BAT" requires the last entry to be the last payload
        block's, so the count is PayloadBlocks + floor((PayloadBlocks - 1) / ChunkRatio)."""
        if self.payload_block_count == 0:
            return 0
        return self.payload_block_count + (self.payload_block_count - 1) // self.chunk_ratio

    def bat_index(self, block_index: int) -> int:
        """Return the BAT index of a payload block: each chunk of chunk_ratio payload entries
        is followed by the entry of its sector bitmap block."""
        return block_index + block_index // self.chunk_ratio


# --- Small helpers --------------------------------------------------------------------------


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def compute_checksum(structure: bytes) -> int:
    """Compute the CRC-32C of a header or region table with its Checksum field counted as zero."""
    checksum_end = CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES
    zeroed = structure[:CHECKSUM_OFFSET] + bytes(CHECKSUM_SIZE_BYTES) + structure[checksum_end:]
    return crc32c(zeroed, 0)


def _with_checksum(structure: bytes) -> bytes:
    checksum = compute_checksum(structure).to_bytes(CHECKSUM_SIZE_BYTES, "little")
    return (
        structure[:CHECKSUM_OFFSET] + checksum + structure[CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES :]
    )


def _check_checksum(structure: bytes, name: str, offset: int) -> None:
    checksum_end = CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES
    stored = int.from_bytes(structure[CHECKSUM_OFFSET:checksum_end], "little")
    computed = compute_checksum(structure)
    if stored != computed:
        raise CorruptInputError(
            f"{name} at offset {offset}: checksum {stored:#010x} does not match the computed "
            f"CRC-32C {computed:#010x}"
        )


def _read_into(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill view from the file at offset, or raise CorruptInputError naming the structure."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise CorruptInputError(
                f"{name} at offset {offset} ({len(view)} bytes) extends past the end of the "
                f"file at offset {offset + done}"
            )
        done += count


def _read_exact(fd: int, length: int, offset: int, name: str) -> bytes:
    data = bytearray(length)
    _read_into(fd, memoryview(data), offset, name)
    return bytes(data)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    # os.pwrite may write fewer bytes than requested, so write the rest until done.
    view = memoryview(data)
    done = 0
    while done < len(view):
        count = os.pwrite(fd, view[done:], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"pwrite at offset {offset + done} returned 0")
        done += count


_ZERO_CHUNK: Final = bytes(1 * MIB)


def _is_zero(view: memoryview) -> bool:
    # bytes comparison runs memcmp, far faster than comparing memoryviews or counting bytes.
    for start in range(0, len(view), len(_ZERO_CHUNK)):
        chunk = view[start : start + len(_ZERO_CHUNK)].tobytes()
        if chunk != _ZERO_CHUNK[: len(chunk)]:
            return False
    return True


def _bat_from_bytes(data: bytes) -> "array.array[int]":
    entries = array.array("Q", data)
    if sys.byteorder != "little":
        entries.byteswap()
    return entries


def _bat_to_bytes(entries: "array.array[int]") -> bytes:
    if sys.byteorder == "little":
        return entries.tobytes()
    swapped = array.array("Q", entries)
    swapped.byteswap()
    return swapped.tobytes()


# --- Building the structures that create() writes ------------------------------------------


def _pack_file_identifier() -> bytes:
    return FILE_IDENTIFIER_STRUCT.pack(FILE_IDENTIFIER_SIGNATURE, CREATOR.encode("utf-16-le"))


def _pack_header(header: Header) -> bytes:
    packed = HEADER_STRUCT.pack(
        HEADER_SIGNATURE,
        0,
        header.sequence_number,
        header.file_write_guid.bytes_le,
        header.data_write_guid.bytes_le,
        header.log_guid.bytes_le,
        header.log_version,
        header.version,
        header.log_length,
        header.log_offset,
    )
    return _with_checksum(packed)


def _pack_region_table(entries: list[RegionTableEntry]) -> bytes:
    table = bytearray(REGION_TABLE_SIZE_BYTES)
    REGION_TABLE_HEADER_STRUCT.pack_into(table, 0, REGION_TABLE_SIGNATURE, 0, len(entries), 0)
    for index, entry in enumerate(entries):
        flags = RegionEntryFlags.REQUIRED if entry.required else RegionEntryFlags.NONE
        REGION_TABLE_ENTRY_STRUCT.pack_into(
            table,
            REGION_TABLE_HEADER_STRUCT.size + index * REGION_TABLE_ENTRY_STRUCT.size,
            entry.guid.bytes_le,
            entry.file_offset,
            entry.length,
            flags,
        )
    return _with_checksum(bytes(table))


def _pack_metadata_region(parameters: DiskParameters) -> bytes:
    """Build the metadata table followed by its items, which start at 64 KiB, the spec's
    minimum item offset."""
    items = {
        FILE_PARAMETERS_GUID: FILE_PARAMETERS_STRUCT.pack(
            parameters.block_size, parameters.file_parameters_flags
        ),
        VIRTUAL_DISK_SIZE_GUID: VIRTUAL_DISK_SIZE_STRUCT.pack(parameters.virtual_size),
        PAGE_83_DATA_GUID: PAGE_83_DATA_STRUCT.pack(parameters.disk_id),
        LOGICAL_SECTOR_SIZE_GUID: SECTOR_SIZE_STRUCT.pack(parameters.logical_sector_size),
        PHYSICAL_SECTOR_SIZE_GUID: SECTOR_SIZE_STRUCT.pack(parameters.physical_sector_size),
    }

    region = bytearray(METADATA_TABLE_SIZE_BYTES)
    METADATA_TABLE_HEADER_STRUCT.pack_into(region, 0, METADATA_TABLE_SIGNATURE, 0, len(items))

    item_offset = METADATA_TABLE_SIZE_BYTES
    for index, (guid, item) in enumerate(items.items()):
        METADATA_TABLE_ENTRY_STRUCT.pack_into(
            region,
            METADATA_TABLE_HEADER_STRUCT.size + index * METADATA_TABLE_ENTRY_STRUCT.size,
            guid.bytes_le,
            item_offset,
            len(item),
            _CREATED_ITEM_FLAGS[guid],
            0,
        )
        region += item
        item_offset += len(item)
    return bytes(region)


def _derive_guid(disk_id: bytes, field_name: str) -> uuid.UUID:
    # A name-based UUID (RFC 4122 version 5) in the namespace of the disk id: the same disk id
    # always gives the same FileWriteGuid and DataWriteGuid, and different disk ids give
    # different ones.
    return uuid.uuid5(uuid.UUID(bytes_le=disk_id), field_name)


def _validate_create_arguments(
    virtual_size_bytes: int,
    block_size_bytes: int,
    logical_sector_size: int,
    physical_sector_size: int,
    disk_id: bytes | None,
) -> None:
    action = "failed to create VHDX"
    if not _is_valid_block_size(block_size_bytes):
        raise InvalidArgumentError(
            f"{action}: block size {block_size_bytes} bytes is not a power of 2 from "
            f"{MIN_BLOCK_SIZE_BYTES} (1 MiB) to {MAX_BLOCK_SIZE_BYTES} (256 MiB)"
        )
    for name, value in (("logical", logical_sector_size), ("physical", physical_sector_size)):
        if value not in SECTOR_SIZES_BYTES:
            raise InvalidArgumentError(
                f"{action}: {name} sector size {value} bytes is not one of {SECTOR_SIZES_BYTES}"
            )
    if virtual_size_bytes <= 0 or virtual_size_bytes % logical_sector_size != 0:
        raise InvalidArgumentError(
            f"{action}: virtual size {virtual_size_bytes} bytes is not a positive multiple of "
            f"the {logical_sector_size}-byte logical sector size"
        )
    if virtual_size_bytes > MAX_VIRTUAL_DISK_SIZE_BYTES:
        raise InvalidArgumentError(
            f"{action}: virtual size {virtual_size_bytes} bytes exceeds the VHDX maximum of "
            f"{MAX_VIRTUAL_DISK_SIZE_BYTES} bytes (64 TiB)"
        )
    if disk_id is not None and len(disk_id) != DISK_ID_SIZE_BYTES:
        raise InvalidArgumentError(
            f"{action}: disk id {disk_id.hex()} is {len(disk_id)} bytes, expected "
            f"{DISK_ID_SIZE_BYTES}"
        )


def _write_new_vhdx(path: Path, parameters: DiskParameters) -> None:
    """Write an empty dynamic VHDX with the layout in the module docstring to path."""
    bat_length = _round_up(parameters.bat_entry_count * BAT_ENTRY_STRUCT.size, ALIGNMENT_BYTES)
    regions = [
        RegionTableEntry(BAT_REGION_GUID, BAT_REGION_OFFSET_BYTES, bat_length, required=True),
        RegionTableEntry(
            METADATA_REGION_GUID,
            METADATA_REGION_OFFSET_BYTES,
            METADATA_REGION_LENGTH_BYTES,
            required=True,
        ),
    ]

    # LogGuid zero means that the log contains nothing to replay ("Headers").
    first_header = Header(
        sequence_number=0,
        file_write_guid=_derive_guid(parameters.disk_id, "FileWriteGuid"),
        data_write_guid=_derive_guid(parameters.disk_id, "DataWriteGuid"),
        log_guid=ZERO_GUID,
        log_version=LOG_VERSION,
        version=VHDX_VERSION,
        log_length=LOG_LENGTH_BYTES,
        log_offset=LOG_OFFSET_BYTES,
    )
    # A header is current only if its SequenceNumber is greater than the other's, so two
    # headers with equal numbers would make the file corrupt by the letter of the spec.
    second_header = replace(first_header, sequence_number=1)

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        # The BAT is all zeros, which is PAYLOAD_BLOCK_NOT_PRESENT and SB_BLOCK_NOT_PRESENT, so
        # extending the file leaves it as a hole, whatever the virtual size.
        os.ftruncate(fd, BAT_REGION_OFFSET_BYTES + bat_length)
        _write_all(fd, _pack_file_identifier(), FILE_IDENTIFIER_OFFSET)
        _write_all(fd, _pack_header(first_header), HEADER_OFFSETS[0])
        _write_all(fd, _pack_header(second_header), HEADER_OFFSETS[1])
        region_table = _pack_region_table(regions)
        for offset in REGION_TABLE_OFFSETS:
            _write_all(fd, region_table, offset)
        _write_all(fd, _pack_metadata_region(parameters), METADATA_REGION_OFFSET_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_sibling(path: Path, action: str) -> Iterator[Path]:
    """Yield a temporary path in path's folder, and on success publish it as path.

    os.link publishes the finished file atomically and fails if path exists, so a crash
    never leaves a partial file under the final name and an existing file is never replaced.
    A crash can leave the temporary file, named ".NAME.*.tmp", behind.
    """
    if path.exists():
        raise AlreadyExistsError(f"{action} {path}: the file exists; remove it first")
    try:
        fd, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except FileNotFoundError as error:
        raise NotFoundError(f"{action} {path}: folder {path.parent} not found") from error
    os.close(fd)
    temporary = Path(temporary_name)

    try:
        yield temporary
        try:
            os.link(temporary, path)
        except FileExistsError as error:
            raise AlreadyExistsError(
                f"{action} {path}: the file exists; remove it first"
            ) from error
    finally:
        temporary.unlink(missing_ok=True)

    folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def create(
    path: str | os.PathLike[str],
    virtual_size_bytes: int,
    *,
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
    logical_sector_size: int = DEFAULT_LOGICAL_SECTOR_SIZE_BYTES,
    physical_sector_size: int = DEFAULT_PHYSICAL_SECTOR_SIZE_BYTES,
    disk_id: bytes | None = None,
) -> None:
    """Create an empty dynamic VHDX of virtual_size_bytes at path.

    The file contains no payload block, so it allocates about 200 KiB whatever the virtual size.
    disk_id is the Page 83 Data item that guests see as the disk's identity: 16 bytes, stored
    as given. FileWriteGuid and DataWriteGuid are version 5 UUIDs derived from it, so the same
    arguments always give the same bytes. Without disk_id, lcow draws a random one.

    Raises InvalidArgumentError for a size, block size, sector size or disk id that the spec
    does not allow, AlreadyExistsError if path exists and NotFoundError if its folder does not.
    """
    _validate_create_arguments(
        virtual_size_bytes, block_size_bytes, logical_sector_size, physical_sector_size, disk_id
    )
    parameters = DiskParameters(
        block_size=block_size_bytes,
        file_parameters_flags=FileParametersFlags.NONE,
        virtual_size=virtual_size_bytes,
        logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size,
        disk_id=disk_id if disk_id is not None else uuid.uuid4().bytes_le,
    )
    with _temporary_sibling(Path(path), "failed to create VHDX") as temporary:
        _write_new_vhdx(temporary, parameters)


# --- Parsing --------------------------------------------------------------------------------
#
# The parse and check functions raise errors that name the structure, its offset and the
# offending value. VhdxFile adds the "failed to open VHDX <path>" prefix in one place.


def _is_valid_block_size(block_size: int) -> bool:
    # "File Parameters": BlockSize is a power of 2 from 1 MiB to 256 MiB.
    is_power_of_two = block_size > 0 and block_size & (block_size - 1) == 0
    return is_power_of_two and MIN_BLOCK_SIZE_BYTES <= block_size <= MAX_BLOCK_SIZE_BYTES


def _check_file_identifier(fd: int) -> None:
    identifier = _read_exact(
        fd, FILE_IDENTIFIER_STRUCT.size, FILE_IDENTIFIER_OFFSET, "file type identifier"
    )
    signature, _creator = FILE_IDENTIFIER_STRUCT.unpack(identifier)
    if signature != FILE_IDENTIFIER_SIGNATURE:
        raise CorruptInputError(
            f"file type identifier at offset {FILE_IDENTIFIER_OFFSET}: invalid signature "
            f"{signature!r}, expected {FILE_IDENTIFIER_SIGNATURE!r}"
        )


def _parse_header(data: bytes, offset: int) -> Header:
    (
        signature,
        _checksum,
        sequence_number,
        file_write_guid,
        data_write_guid,
        log_guid,
        log_version,
        version,
        log_length,
        log_offset,
    ) = HEADER_STRUCT.unpack(data)

    if signature != HEADER_SIGNATURE:
        raise CorruptInputError(
            f"header at offset {offset}: invalid signature {signature!r}, expected "
            f"{HEADER_SIGNATURE!r}"
        )
    _check_checksum(data, "header", offset)

    return Header(
        sequence_number=sequence_number,
        file_write_guid=uuid.UUID(bytes_le=file_write_guid),
        data_write_guid=uuid.UUID(bytes_le=data_write_guid),
        log_guid=uuid.UUID(bytes_le=log_guid),
        log_version=log_version,
        version=version,
        log_length=log_length,
        log_offset=log_offset,
    )


def _select_current_header(fd: int, path: str) -> tuple[int, Header]:
    """Return the slot (0 or 1) and contents of the current header.

    "Headers": a header is valid if its signature and checksum are. The current header is
    the only valid one, or the valid one with the greater SequenceNumber.
    """
    raw_headers = [
        _read_exact(fd, HEADER_SIZE_BYTES, offset, "header") for offset in HEADER_OFFSETS
    ]
    valid: dict[int, Header] = {}
    problems: list[str] = []
    for slot, (data, offset) in enumerate(zip(raw_headers, HEADER_OFFSETS, strict=True)):
        try:
            valid[slot] = _parse_header(data, offset)
        except CorruptInputError as error:
            problems.append(str(error))

    if not valid:
        raise CorruptInputError(f"no valid header: {'; '.join(problems)}")
    if len(valid) == 1:
        # Falling back to the other copy is what the two headers are for, so it is no error.
        logger.warning("VHDX %s: using the other header because the %s", path, problems[0])
        return next(iter(valid.items()))

    first, second = valid[0], valid[1]
    if first.sequence_number > second.sequence_number:
        return 0, first
    if second.sequence_number > first.sequence_number:
        return 1, second

    # QEMU accepts two byte-identical headers, which Microsoft's Disk2VHD writes, and so does
    # lcow. Two different headers with one SequenceNumber leave no current header.
    if raw_headers[0] == raw_headers[1]:
        return 0, first
    raise CorruptInputError(
        f"headers at offsets {HEADER_OFFSETS[0]} and {HEADER_OFFSETS[1]} differ but have the "
        f"same SequenceNumber {first.sequence_number}, so neither is current"
    )


def _check_header(header: Header, slot: int, path: str) -> None:
    offset = HEADER_OFFSETS[slot]
    if header.version != VHDX_VERSION:
        raise UnsupportedError(
            f"header at offset {offset} has Version {header.version}, and lcow reads only "
            f"version {VHDX_VERSION}"
        )
    if header.log_guid != ZERO_GUID:
        raise UnsupportedError(
            f"header at offset {offset} has LogGuid {header.log_guid}, so the log contains "
            f"updates that must be replayed before the file can be read, and lcow does not "
            f"replay logs; open the file once read-write with Hyper-V, or run "
            f"`qemu-img check -r all -f vhdx {path}`, which replays the log"
        )

    # "Headers": LogOffset and LogLength are multiples of 1 MiB. lcow never reads the log, but
    # it places new payload blocks after it.
    if (
        header.log_offset % ALIGNMENT_BYTES != 0
        or header.log_length % ALIGNMENT_BYTES != 0
        or header.log_offset < HEADER_SECTION_SIZE_BYTES
    ):
        raise CorruptInputError(
            f"header at offset {offset} has LogOffset {header.log_offset} and LogLength "
            f"{header.log_length}, expected multiples of {ALIGNMENT_BYTES} with LogOffset at "
            f"least {HEADER_SECTION_SIZE_BYTES}"
        )


def _parse_region_table(data: bytes, offset: int) -> dict[uuid.UUID, RegionTableEntry]:
    signature, _checksum, entry_count, _reserved = REGION_TABLE_HEADER_STRUCT.unpack_from(data)
    if signature != REGION_TABLE_SIGNATURE:
        raise CorruptInputError(
            f"region table at offset {offset}: invalid signature {signature!r}, expected "
            f"{REGION_TABLE_SIGNATURE!r}"
        )
    _check_checksum(data, "region table", offset)
    if entry_count > MAX_REGION_TABLE_ENTRIES:
        raise CorruptInputError(
            f"region table at offset {offset}: EntryCount {entry_count} exceeds the maximum "
            f"{MAX_REGION_TABLE_ENTRIES}"
        )

    entries: dict[uuid.UUID, RegionTableEntry] = {}
    for index in range(entry_count):
        entry_offset = REGION_TABLE_HEADER_STRUCT.size + index * REGION_TABLE_ENTRY_STRUCT.size
        raw_guid, file_offset, length, flags = REGION_TABLE_ENTRY_STRUCT.unpack_from(
            data, entry_offset
        )
        guid = uuid.UUID(bytes_le=raw_guid)
        if guid in entries:
            raise CorruptInputError(
                f"region table at offset {offset}: region {guid} appears twice, and each GUID "
                f"must be unique"
            )
        required = bool(flags & RegionEntryFlags.REQUIRED)
        entries[guid] = RegionTableEntry(guid, file_offset, length, required)
    return entries


def _read_region_table(fd: int, path: str) -> dict[uuid.UUID, RegionTableEntry]:
    """Return the entries of the first of the two region table copies that is valid."""
    problems: list[str] = []
    for offset in REGION_TABLE_OFFSETS:
        data = _read_exact(fd, REGION_TABLE_SIZE_BYTES, offset, "region table")
        try:
            entries = _parse_region_table(data, offset)
        except CorruptInputError as error:
            problems.append(str(error))
            continue
        if problems:
            logger.warning(
                "VHDX %s: using the second region table because the %s", path, problems[0]
            )
        return entries
    raise CorruptInputError(f"no valid region table: {'; '.join(problems)}")


def _check_regions(entries: dict[uuid.UUID, RegionTableEntry]) -> None:
    for entry in entries.values():
        # "Region Table Entry": a file with a required region that the implementation does not
        # recognize must not be loaded.
        if entry.guid not in (BAT_REGION_GUID, METADATA_REGION_GUID) and entry.required:
            raise UnsupportedError(
                f"the region table lists region {entry.guid}, which is marked required and is "
                f"unknown to lcow"
            )
        if (
            entry.file_offset % ALIGNMENT_BYTES != 0
            or entry.file_offset < HEADER_SECTION_SIZE_BYTES
            or entry.length % ALIGNMENT_BYTES != 0
        ):
            raise CorruptInputError(
                f"region {entry.guid} has FileOffset {entry.file_offset} and Length "
                f"{entry.length}, expected multiples of {ALIGNMENT_BYTES} with FileOffset at "
                f"least {HEADER_SECTION_SIZE_BYTES}"
            )

    # The spec marks both known regions as required, but QEMU 7.2 writes Required = 0 for
    # them, so lcow checks only that they are present.
    for guid, name in ((BAT_REGION_GUID, "BAT"), (METADATA_REGION_GUID, "metadata")):
        if guid not in entries:
            raise CorruptInputError(f"the region table has no {name} region ({guid})")


def _read_metadata_items(fd: int, region: RegionTableEntry) -> dict[uuid.UUID, bytes]:
    """Read the metadata table and return the system items that lcow recognizes, by GUID."""
    table_offset = region.file_offset
    table = _read_exact(fd, METADATA_TABLE_SIZE_BYTES, table_offset, "metadata table")
    signature, _reserved, entry_count = METADATA_TABLE_HEADER_STRUCT.unpack_from(table)
    if signature != METADATA_TABLE_SIGNATURE:
        raise CorruptInputError(
            f"metadata table at offset {table_offset}: invalid signature {signature!r}, "
            f"expected {METADATA_TABLE_SIGNATURE!r}"
        )
    if entry_count > MAX_METADATA_TABLE_ENTRIES:
        raise CorruptInputError(
            f"metadata table at offset {table_offset}: EntryCount {entry_count} exceeds the "
            f"maximum {MAX_METADATA_TABLE_ENTRIES}"
        )

    items: dict[uuid.UUID, bytes] = {}
    for index in range(entry_count):
        entry_offset = METADATA_TABLE_HEADER_STRUCT.size + index * METADATA_TABLE_ENTRY_STRUCT.size
        raw_guid, item_offset, length, raw_flags, _reserved2 = (
            METADATA_TABLE_ENTRY_STRUCT.unpack_from(table, entry_offset)
        )
        guid = uuid.UUID(bytes_le=raw_guid)
        flags = MetadataEntryFlags(raw_flags & 0b111)
        name = _ITEM_NAMES.get(guid, str(guid))

        # User items carry data for the program that wrote them. They never change how the
        # virtual disk reads.
        if flags & MetadataEntryFlags.IS_USER:
            continue
        if guid not in _REQUIRED_ITEM_SIZES:
            if flags & MetadataEntryFlags.IS_REQUIRED:
                raise UnsupportedError(
                    f"metadata item {name} is marked required and is unknown to lcow"
                )
            continue
        if guid in items:
            raise CorruptInputError(
                f"metadata table at offset {table_offset}: item {name} appears twice"
            )

        # "Metadata Table Entry": an item starts at 64 KiB or later, is at most 1 MiB long and
        # lies inside the metadata region.
        if (
            item_offset < METADATA_TABLE_SIZE_BYTES
            or length > MAX_METADATA_ITEM_SIZE_BYTES
            or item_offset + length > region.length
        ):
            raise CorruptInputError(
                f"metadata item {name} has Offset {item_offset} and Length {length}, outside "
                f"the metadata region of {region.length} bytes at offset {table_offset}"
            )
        if length != _REQUIRED_ITEM_SIZES[guid]:
            raise CorruptInputError(
                f"metadata item {name} at offset {table_offset + item_offset} is {length} "
                f"bytes, expected {_REQUIRED_ITEM_SIZES[guid]}"
            )
        items[guid] = _read_exact(fd, length, table_offset + item_offset, f"metadata item {name}")

    missing = [_ITEM_NAMES[guid] for guid in _REQUIRED_ITEM_SIZES if guid not in items]
    if missing:
        raise CorruptInputError(
            f"metadata table at offset {table_offset} lacks the required items {', '.join(missing)}"
        )
    return items


def _parse_disk_parameters(items: dict[uuid.UUID, bytes]) -> DiskParameters:
    block_size, raw_flags = FILE_PARAMETERS_STRUCT.unpack(items[FILE_PARAMETERS_GUID])
    flags = FileParametersFlags(raw_flags & 0b11)
    (virtual_size,) = VIRTUAL_DISK_SIZE_STRUCT.unpack(items[VIRTUAL_DISK_SIZE_GUID])
    (logical_sector_size,) = SECTOR_SIZE_STRUCT.unpack(items[LOGICAL_SECTOR_SIZE_GUID])
    (physical_sector_size,) = SECTOR_SIZE_STRUCT.unpack(items[PHYSICAL_SECTOR_SIZE_GUID])
    (disk_id,) = PAGE_83_DATA_STRUCT.unpack(items[PAGE_83_DATA_GUID])

    if flags & FileParametersFlags.HAS_PARENT:
        raise UnsupportedError(
            "File Parameters has HasParent set, so this is a differencing disk, and lcow reads "
            "only dynamic and fixed disks; merge it with its parent into a new file first, "
            "for example with `qemu-img convert -O vhdx`"
        )
    if not _is_valid_block_size(block_size):
        raise CorruptInputError(
            f"File Parameters has BlockSize {block_size}, expected a power of 2 from "
            f"{MIN_BLOCK_SIZE_BYTES} to {MAX_BLOCK_SIZE_BYTES}"
        )
    for name, value in (("Logical", logical_sector_size), ("Physical", physical_sector_size)):
        if value not in SECTOR_SIZES_BYTES:
            raise CorruptInputError(
                f"{name} Sector Size is {value}, expected one of {SECTOR_SIZES_BYTES}"
            )
    if virtual_size % logical_sector_size != 0 or virtual_size > MAX_VIRTUAL_DISK_SIZE_BYTES:
        raise CorruptInputError(
            f"Virtual Disk Size is {virtual_size}, expected a multiple of the "
            f"{logical_sector_size}-byte logical sector size up to {MAX_VIRTUAL_DISK_SIZE_BYTES}"
        )

    return DiskParameters(
        block_size=block_size,
        file_parameters_flags=flags,
        virtual_size=virtual_size,
        logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size,
        disk_id=disk_id,
    )


def _read_bat(fd: int, region: RegionTableEntry, parameters: DiskParameters) -> "array.array[int]":
    needed_bytes = parameters.bat_entry_count * BAT_ENTRY_STRUCT.size
    if region.length < needed_bytes:
        raise CorruptInputError(
            f"BAT region at offset {region.file_offset} is {region.length} bytes, but the "
            f"{parameters.bat_entry_count} entries of the virtual disk need {needed_bytes}"
        )
    return _bat_from_bytes(_read_exact(fd, needed_bytes, region.file_offset, "BAT"))


# --- The open file --------------------------------------------------------------------------


class VhdxFile:
    """An open VHDX file: read and write its virtual disk by byte offset.

    Open it read-only (the default) or with writable=True, and close it, best with ``with``.
    A writable file takes an exclusive flock and a read-only one a shared flock, so no
    VhdxFile reads a disk that another VhdxFile writes. QEMU uses other locks and does not
    see these.

    Reads of blocks without data return zeros. Writes allocate payload blocks at the end
    of the file. New BAT entries reach the file in flush() and close(), after the data they
    point to, so other readers see writes only after one of those returns. An instance is
    not thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self._path = os.fspath(path)
        self._writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(self._path, flags)
        except FileNotFoundError as error:
            raise NotFoundError(f"failed to open VHDX {self._path}: file not found") from error

        with contextlib.ExitStack() as undo:
            undo.callback(os.close, fd)
            self._lock(fd)
            try:
                self._load(fd)
            except (CorruptInputError, UnsupportedError) as error:
                raise type(error)(f"failed to open VHDX {self._path}: {error}") from error
            undo.pop_all()
        self._fd: int | None = fd

        self._dirty_bat_pages: set[int] = set()
        self._unsynced_writes = False
        self._next_block_offset: int | None = None
        # "Updating the Headers": a session's first change to the file must come after a header
        # update that sets a new FileWriteGuid.
        self._headers_updated = False

    def _lock(self, fd: int) -> None:
        # Through spawn: a worker forked while this process had the file open for writing
        # would otherwise keep that lock a moment after the writer closed it.
        operation = fcntl.LOCK_EX if self._writable else fcntl.LOCK_SH
        if not spawn.try_flock(fd, operation):
            holder = "has it open" if self._writable else "has it open for writing"
            raise FailedPreconditionError(
                f"failed to open VHDX {self._path}: another VhdxFile, in this or another "
                f"process, {holder}; close that one first"
            )

    def _load(self, fd: int) -> None:
        self._file_size = os.fstat(fd).st_size
        _check_file_identifier(fd)

        self._header_slot, self._header = _select_current_header(fd, self._path)
        _check_header(self._header, self._header_slot, self._path)

        self._regions = _read_region_table(fd, self._path)
        _check_regions(self._regions)
        self._bat_region = self._regions[BAT_REGION_GUID]

        items = _read_metadata_items(fd, self._regions[METADATA_REGION_GUID])
        self._parameters = _parse_disk_parameters(items)
        self._bat = _read_bat(fd, self._bat_region, self._parameters)

    # --- properties ---

    @property
    def virtual_size(self) -> int:
        """Size of the virtual disk in bytes."""
        return self._parameters.virtual_size

    @property
    def block_size(self) -> int:
        """Size of a payload block in bytes."""
        return self._parameters.block_size

    @property
    def logical_sector_size(self) -> int:
        """Logical sector size of the virtual disk in bytes, 512 or 4096."""
        return self._parameters.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        """Physical sector size that the virtual disk reports in bytes, 512 or 4096."""
        return self._parameters.physical_sector_size

    @property
    def disk_id(self) -> bytes:
        """The 16 bytes of the Page 83 Data item, the disk's identity for guests."""
        return self._parameters.disk_id

    @property
    def closed(self) -> bool:
        """Whether close() has run."""
        return self._fd is None

    def __repr__(self) -> str:
        mode = "read-write" if self._writable else "read-only"
        state = "closed" if self._fd is None else "open"
        return (
            f"VhdxFile({self._path!r}, {mode}, {state}, virtual_size={self.virtual_size}, "
            f"block_size={self.block_size})"
        )

    # --- reading ---

    def read(self, offset: int, length: int) -> bytes:
        """Read length bytes of the virtual disk at offset.

        Blocks in any state but PAYLOAD_BLOCK_FULLY_PRESENT read as zeros, which the spec
        allows for every such state of a dynamic disk.

        Raises InvalidArgumentError if the range does not lie inside the virtual disk, and
        CorruptInputError if a BAT entry is invalid or points outside the file.
        """
        fd = self._require_open("read")
        self._check_range("read", offset, length)

        data = bytearray(length)
        view = memoryview(data)
        position = 0
        for block_index, offset_in_block, piece_length in self._split(offset, length):
            file_offset = self._present_block_offset(block_index, "read")
            if file_offset is not None:
                piece = view[position : position + piece_length]
                try:
                    _read_into(fd, piece, file_offset + offset_in_block, f"block {block_index}")
                except CorruptInputError as error:
                    raise CorruptInputError(f"failed to read VHDX {self._path}: {error}") from error
            position += piece_length
        return bytes(data)

    def allocated_ranges(self) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of the parts of the virtual disk that present payload blocks
        contain, in order, with adjacent blocks merged. Everything else reads as zeros."""
        self._require_open("list the allocated ranges of")
        block_size = self.block_size
        run_start: int | None = None
        for block_index in range(self._parameters.payload_block_count):
            present = self._present_block_offset(block_index, "read") is not None
            if present and run_start is None:
                run_start = block_index * block_size
            elif not present and run_start is not None:
                yield run_start, block_index * block_size - run_start
                run_start = None
        if run_start is not None:
            yield run_start, self.virtual_size - run_start

    # --- writing ---

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write data to the virtual disk at offset.

        Writes to a block without data allocate the block at the end of the file, unless the
        bytes for that block are all zero: such a block already reads as zeros and stays
        unallocated.

        Raises FailedPreconditionError if the file is read-only, and InvalidArgumentError if
        the range does not lie inside the virtual disk.
        """
        fd = self._require_open("write")
        if not self._writable:
            raise FailedPreconditionError(
                f"failed to write VHDX {self._path}: the file is open read-only; open it with "
                f"writable=True"
            )
        view = memoryview(data).cast("B")
        self._check_range("write", offset, len(view))
        if not view:
            return
        self._update_headers()
        self._unsynced_writes = True

        position = 0
        for block_index, offset_in_block, piece_length in self._split(offset, len(view)):
            piece = view[position : position + piece_length]
            self._write_block(fd, block_index, offset_in_block, piece)
            position += piece_length

    def flush(self) -> None:
        """Write the changed BAT entries after the data they point to, and sync the file.

        After flush() returns, every write so far is on stable storage and visible to other
        readers of the file.
        """
        fd = self._require_open("flush")
        if not self._unsynced_writes:
            return

        # Payload data reaches stable storage before any BAT entry that points to it.
        os.fdatasync(fd)
        self._unsynced_writes = False
        if not self._dirty_bat_pages:
            return
        # NOTE: the spec sends BAT updates through the log, so that a torn write cannot damage
        # the other entries of a sector. lcow writes BAT pages in place and relies on the
        # storage writing each sector whole.
        for page in sorted(self._dirty_bat_pages):
            first_entry = page * BAT_ENTRIES_PER_PAGE
            entries = self._bat[first_entry : first_entry + BAT_ENTRIES_PER_PAGE]
            offset = self._bat_region.file_offset + first_entry * BAT_ENTRY_STRUCT.size
            _write_all(fd, _bat_to_bytes(entries), offset)
        os.fdatasync(fd)
        self._dirty_bat_pages.clear()

    def close(self) -> None:
        """Flush a writable file and close it. Closing twice is harmless."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals ---

    def _require_open(self, action: str) -> int:
        if self._fd is None:
            raise FailedPreconditionError(
                f"failed to {action} VHDX {self._path}: the file is closed"
            )
        return self._fd

    def _check_range(self, action: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise InvalidArgumentError(
                f"failed to {action} VHDX {self._path}: range of {length} bytes at offset "
                f"{offset} does not lie inside the virtual disk of {self.virtual_size} bytes"
            )

    def _split(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield (block index, offset in block, length) for each block that the range touches."""
        block_size = self.block_size
        end = offset + length
        while offset < end:
            block_index, offset_in_block = divmod(offset, block_size)
            piece_length = min(block_size - offset_in_block, end - offset)
            yield block_index, offset_in_block, piece_length
            offset += piece_length

    def _present_block_offset(self, block_index: int, action: str) -> int | None:
        """Return the file offset of a payload block, or None if the file contains no data for it.

        Raises CorruptInputError for a reserved state, PAYLOAD_BLOCK_PARTIALLY_PRESENT
        (valid only in differencing disks) or a block that lies outside the file.
        """
        bat_index = self._parameters.bat_index(block_index)
        entry = self._bat[bat_index]
        raw_state = entry & BAT_STATE_MASK
        entry_offset = self._bat_region.file_offset + bat_index * BAT_ENTRY_STRUCT.size
        try:
            state = PayloadBlockState(raw_state)
        except ValueError:
            raise CorruptInputError(
                f"failed to {action} VHDX {self._path}: BAT entry {bat_index} at offset "
                f"{entry_offset} has the reserved state {raw_state}"
            ) from None

        if state == PayloadBlockState.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            raise CorruptInputError(
                f"failed to {action} VHDX {self._path}: BAT entry {bat_index} at offset "
                f"{entry_offset} is PAYLOAD_BLOCK_PARTIALLY_PRESENT, which only differencing "
                f"disks may use, and HasParent is clear"
            )
        if state != PayloadBlockState.PAYLOAD_BLOCK_FULLY_PRESENT:
            return None

        file_offset = (entry >> BAT_FILE_OFFSET_SHIFT) * MIB
        block_start = block_index * self.block_size
        needed = min(self.block_size, self.virtual_size - block_start)
        if file_offset < HEADER_SECTION_SIZE_BYTES or file_offset + needed > self._file_size:
            raise CorruptInputError(
                f"failed to {action} VHDX {self._path}: BAT entry {bat_index} at offset "
                f"{entry_offset} places payload block {block_index} at file offset "
                f"{file_offset}, outside the file's data area from {HEADER_SECTION_SIZE_BYTES} "
                f"to {self._file_size}"
            )
        return file_offset

    def _write_block(
        self, fd: int, block_index: int, offset_in_block: int, piece: memoryview
    ) -> None:
        file_offset = self._present_block_offset(block_index, "write")
        if file_offset is None:
            if _is_zero(piece):
                return
            file_offset = self._allocate_block(fd)
            self._set_present(block_index, file_offset)
        _write_all(fd, piece, file_offset + offset_in_block)

    def _allocate_block(self, fd: int) -> int:
        """Reserve block_size bytes at the end of the file and return their offset.

        The file grows by ftruncate, so the new block reads as zeros: the spec lets a block
        that was NOT_PRESENT, UNDEFINED or UNMAPPED read as anything, and requires zeros for
        PAYLOAD_BLOCK_ZERO.
        """
        if self._next_block_offset is None:
            self._next_block_offset = self._end_of_used_space()
        file_offset = self._next_block_offset

        # Block sizes are powers of 2 of at least 1 MiB, so the next block stays aligned to
        # 1 MiB as FileOffsetMB requires.
        self._next_block_offset = file_offset + self.block_size
        if self._next_block_offset > self._file_size:
            os.ftruncate(fd, self._next_block_offset)
            self._file_size = self._next_block_offset
        return file_offset

    def _end_of_used_space(self) -> int:
        """Return the first 1 MiB-aligned offset after everything the file uses."""
        header = self._header
        ends = [self._file_size, header.log_offset + header.log_length]
        ends += [region.file_offset + region.length for region in self._regions.values()]

        # FileOffsetMB fills the high bits of an entry, so the largest entry locates the last
        # block of any state. A block is at most block_size bytes (sector bitmap blocks 1 MiB).
        if self._bat:
            last_offset = (max(self._bat) >> BAT_FILE_OFFSET_SHIFT) * MIB
            ends.append(last_offset + self.block_size)
        return _round_up(max(ends), ALIGNMENT_BYTES)

    def _set_present(self, block_index: int, file_offset: int) -> None:
        bat_index = self._parameters.bat_index(block_index)
        file_offset_mb = file_offset // MIB
        self._bat[bat_index] = (file_offset_mb << BAT_FILE_OFFSET_SHIFT) | int(
            PayloadBlockState.PAYLOAD_BLOCK_FULLY_PRESENT
        )
        self._dirty_bat_pages.add(bat_index // BAT_ENTRIES_PER_PAGE)

    def _update_headers(self) -> None:
        """Give the file new write GUIDs before its first change in this session.

        "Updating the Headers": write the non-current header with SequenceNumber + 1 and
        flush, which makes it current, then do the same again so that both copies are up to
        date. DataWriteGuid changes too, because every change lcow makes is a data write.
        """
        if self._headers_updated:
            return
        fd = self._require_open("write")
        updated = replace(self._header, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4())
        for _ in range(2):
            updated = replace(updated, sequence_number=self._header.sequence_number + 1)
            slot = 1 - self._header_slot
            _write_all(fd, _pack_header(updated), HEADER_OFFSETS[slot])
            os.fsync(fd)
            self._header, self._header_slot = updated, slot
        self._headers_updated = True


def _open_created(path: Path) -> VhdxFile:
    """Open a file that this process just created, for writing.

    The GUIDs that create() wrote are new to this file, so they already meet the rule that a
    session's first change must come with a new FileWriteGuid. Keeping them keeps the output
    a function of the arguments.
    """
    vhdx = VhdxFile(path, writable=True)
    vhdx._headers_updated = True
    return vhdx


# --- Conversions ----------------------------------------------------------------------------


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of the data in a file, skipping holes with SEEK_DATA/SEEK_HOLE.

    On filesystems without hole support, Linux reports the whole file as data.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            return
        yield start, end - start
        offset = end


def raw_to_vhdx(
    raw_path: str | os.PathLike[str],
    vhdx_path: str | os.PathLike[str],
    *,
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
    logical_sector_size: int = DEFAULT_LOGICAL_SECTOR_SIZE_BYTES,
    physical_sector_size: int = DEFAULT_PHYSICAL_SECTOR_SIZE_BYTES,
    disk_id: bytes | None = None,
) -> int:
    """Convert a raw disk image to a new dynamic VHDX and return the bytes of data read.

    Only the data ranges of the raw file are read, as SEEK_DATA reports them, and all-zero
    parts of them allocate no block, so a sparse image converts in time and space that
    follow its data, not its size. The VHDX gets the raw file's size as its virtual size,
    and with a disk_id the output depends only on the input and the arguments.

    Raises NotFoundError if raw_path does not exist, AlreadyExistsError if vhdx_path does,
    and InvalidArgumentError if the raw size is not a multiple of the logical sector size.
    """
    raw_name = os.fspath(raw_path)
    try:
        raw_fd = os.open(raw_name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as error:
        raise NotFoundError(f"failed to convert raw image {raw_name}: file not found") from error

    try:
        size = os.fstat(raw_fd).st_size
        if size % logical_sector_size != 0:
            raise InvalidArgumentError(
                f"failed to convert raw image {raw_name}: its size {size} bytes is not a "
                f"multiple of the {logical_sector_size}-byte logical sector size; extend it "
                f"with `truncate -s %{logical_sector_size} {raw_name}`"
            )
        _validate_create_arguments(
            size, block_size_bytes, logical_sector_size, physical_sector_size, disk_id
        )
        parameters = DiskParameters(
            block_size=block_size_bytes,
            file_parameters_flags=FileParametersFlags.NONE,
            virtual_size=size,
            logical_sector_size=logical_sector_size,
            physical_sector_size=physical_sector_size,
            disk_id=disk_id if disk_id is not None else uuid.uuid4().bytes_le,
        )

        action = f"failed to convert raw image {raw_name} to VHDX"
        with _temporary_sibling(Path(vhdx_path), action) as temporary:
            _write_new_vhdx(temporary, parameters)
            with _open_created(temporary) as vhdx:
                copied = _copy_raw_data(raw_fd, raw_name, size, vhdx)
    finally:
        os.close(raw_fd)

    logger.debug("converted raw image %s to VHDX %s: %d bytes of data", raw_name, vhdx_path, copied)
    return copied


def _copy_raw_data(raw_fd: int, raw_name: str, size: int, vhdx: VhdxFile) -> int:
    copied = 0
    for start, length in _data_ranges(raw_fd, size):
        for offset in range(start, start + length, COPY_CHUNK_BYTES):
            chunk_length = min(COPY_CHUNK_BYTES, start + length - offset)
            try:
                chunk = _read_exact(raw_fd, chunk_length, offset, "data")
            except CorruptInputError as error:
                raise CorruptInputError(
                    f"failed to convert raw image {raw_name}: {error}, so the file got shorter "
                    f"during the conversion; leave it unchanged until the conversion ends"
                ) from error
            vhdx.write(offset, chunk)
            copied += chunk_length
    return copied


def vhdx_to_raw(vhdx_path: str | os.PathLike[str], raw_path: str | os.PathLike[str]) -> int:
    """Convert a VHDX to a new sparse raw image and return the bytes of data read.

    The raw file gets the virtual size by ftruncate, and only present payload blocks are
    read. All-zero 4 KiB pieces within them stay holes, so the raw file allocates about as much
    space as the data in the VHDX needs.

    Raises NotFoundError if vhdx_path does not exist, AlreadyExistsError if raw_path does,
    and the errors of VhdxFile for a VHDX that lcow cannot read.
    """
    with VhdxFile(vhdx_path) as vhdx:
        action = f"failed to convert VHDX {os.fspath(vhdx_path)} to raw image"
        with _temporary_sibling(Path(raw_path), action) as temporary:
            raw_fd = os.open(temporary, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(raw_fd, vhdx.virtual_size)
                copied = _copy_vhdx_data(vhdx, raw_fd)
                os.fsync(raw_fd)
            finally:
                os.close(raw_fd)

    logger.debug("converted VHDX %s to raw image %s: %d bytes of data", vhdx_path, raw_path, copied)
    return copied


def _copy_vhdx_data(vhdx: VhdxFile, raw_fd: int) -> int:
    copied = 0
    for start, length in vhdx.allocated_ranges():
        for offset in range(start, start + length, COPY_CHUNK_BYTES):
            chunk_length = min(COPY_CHUNK_BYTES, start + length - offset)
            chunk = memoryview(vhdx.read(offset, chunk_length))
            _write_nonzero_runs(raw_fd, chunk, offset)
            copied += chunk_length
    return copied


def _write_nonzero_runs(fd: int, data: memoryview, offset: int) -> None:
    """Write the parts of data that are not all zero, in pieces of SPARSE_GRANULARITY_BYTES,
    and leave the all-zero pieces as holes."""
    run_start: int | None = None
    for start in range(0, len(data), SPARSE_GRANULARITY_BYTES):
        piece_is_zero = _is_zero(data[start : start + SPARSE_GRANULARITY_BYTES])
        if not piece_is_zero and run_start is None:
            run_start = start
        elif piece_is_zero and run_start is not None:
            _write_all(fd, data[run_start:start], offset + run_start)
            run_start = None
    if run_start is not None:
        _write_all(fd, data[run_start:], offset + run_start)
