"""Fixed VHD footer: the 512-byte trailer that turns an ext4 image into ``layer.vhd``.

The layout, field names, CHS geometry algorithm and checksum follow Microsoft's "Virtual Hard
Disk Image Format Specification", version 1.0 of October 11, 2006: the section "Hard Disk
Footer Format" and the appendix "CHS Calculation". A fixed VHD is the raw disk followed by
one footer, so the ext4 image itself stays unchanged and a VM reads it at offset 0.

Every footer field is big-endian, as the spec stores all values in network byte order.
"""

import enum
import os
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from lcow.errors import CorruptInputError, InvalidArgumentError, NotFoundError, UnsupportedError

SECTOR_SIZE_BYTES: Final = 512
FOOTER_SIZE_BYTES: Final = 512

# Fields in spec order: cookie, features, file_format_version, data_offset, timestamp,
# creator_application, creator_version, creator_host_os, original_size, current_size,
# disk_geometry as cylinders, heads and sectors_per_track, disk_type, checksum, unique_id and
# saved_state, then 427 reserved bytes that must be zero. ">" means big-endian, no padding.
FOOTER_STRUCT: Final = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
if FOOTER_STRUCT.size != FOOTER_SIZE_BYTES:
    raise AssertionError(f"VHD footer layout is {FOOTER_STRUCT.size} bytes, the spec requires 512")

# Byte offsets of the fields that parse_footer validates, for its error messages.
COOKIE_OFFSET: Final = 0
DISK_TYPE_OFFSET: Final = 60
CHECKSUM_OFFSET: Final = 64
CHECKSUM_SIZE_BYTES: Final = 4

COOKIE: Final = b"conectix"
FILE_FORMAT_VERSION: Final = 0x0001_0000

# The spec text gives 0xFFFFFFFF for "no next structure", but the field is 8 bytes wide and
# QEMU (block/vpc.c) writes all 64 bits set for fixed disks, so lcow does the same.
FIXED_DISK_DATA_OFFSET: Final = 0xFFFF_FFFF_FFFF_FFFF

# QEMU's vpc driver (block/vpc.c, checked with QEMU 7.2) takes the virtual size from the CHS
# geometry unless creator_application is "win ", "qem2", "d2v ", "CTXS" or "tap\0", or the
# geometry is the maximum 65535/16/255. The geometry rounds down, so with an id of lcow's own
# such as "lcow" QEMU would drop less than one cylinder (heads * sectors_per_track sectors) from
# the end of the ext4 image. block/vpc.c lists "win " as the id of Hyper-V, the main consumer
# of these layers, and notes that Hyper-V reads current_size, so with "win " QEMU and Hyper-V
# see the same size. The cost is that the footer does not name lcow as its creator.
CREATOR_APPLICATION: Final = b"win "

# Major 1, minor 0 of the footer that lcow writes. It is a constant rather than the package
# version so that the bytes of a layer do not change between lcow releases.
CREATOR_VERSION: Final = 0x0001_0000

# The spec documents only "Wi2k" (Windows) and "Mac " as host OS values. QEMU writes "Wi2k"
# as well.
CREATOR_HOST_OS: Final = b"Wi2k"

# The largest geometry the spec allows: 65535 cylinders, 16 heads, 255 sectors per track.
MAX_GEOMETRY_SECTORS: Final = 65535 * 16 * 255

# QEMU rejects VHDs above 2040 GiB (VHD_MAX_SECTORS in block/vpc.c), and the spec gives
# 2040 GB as the maximum size of a dynamic disk.
MAX_DISK_SIZE_BYTES: Final = 2040 * 1024**3

UNIQUE_ID_SIZE_BYTES: Final = 16


class Features(enum.IntFlag):
    """Bits of the footer's features field."""

    NONE = 0x0
    TEMPORARY = 0x1
    # The spec requires this bit to be set in every footer.
    RESERVED = 0x2


class DiskType(enum.IntEnum):
    """Values of the footer's disk_type field. The spec reserves 1, 5 and 6 as deprecated."""

    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


class DiskGeometry(NamedTuple):
    """CHS geometry of the disk_geometry field, which ATA controllers use for the disk size."""

    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def total_sectors(self) -> int:
        """Number of 512-byte sectors that the geometry addresses."""
        return self.cylinders * self.heads * self.sectors_per_track


@dataclass(frozen=True)
class Footer:
    """Decoded hard disk footer, with the spec's field names."""

    cookie: bytes
    features: Features
    file_format_version: int
    data_offset: int
    # Seconds since 2000-01-01 00:00:00 UTC.
    timestamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    disk_geometry: DiskGeometry
    disk_type: DiskType
    checksum: int
    unique_id: bytes
    saved_state: int


def compute_disk_geometry(total_sectors: int) -> DiskGeometry:
    """Compute the CHS geometry for a disk of total_sectors with the spec's algorithm.

    The geometry rounds down, so it may address fewer sectors than the disk has. Disks larger
    than 65535 * 16 * 255 sectors (about 127.5 GiB) get that maximum geometry.
    """
    total_sectors = min(total_sectors, MAX_GEOMETRY_SECTORS)

    # Large disks: from 65535 * 16 * 63 sectors on, 63 sectors per track would reach the
    # 65535-cylinder maximum, so the spec switches to 255.
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinders_times_heads = total_sectors // sectors_per_track
        return DiskGeometry(cylinders_times_heads // heads, heads, sectors_per_track)

    # Smaller disks use 17 sectors per track with 4 to 16 heads if that gives fewer than 1024
    # cylinders, else 31 with 16 heads under the same test, else 63 with 16 heads.
    sectors_per_track = 17
    cylinders_times_heads = total_sectors // sectors_per_track
    heads = max((cylinders_times_heads + 1023) // 1024, 4)

    if cylinders_times_heads >= heads * 1024 or heads > 16:
        sectors_per_track = 31
        heads = 16
        cylinders_times_heads = total_sectors // sectors_per_track

    if cylinders_times_heads >= heads * 1024:
        sectors_per_track = 63
        heads = 16
        cylinders_times_heads = total_sectors // sectors_per_track

    return DiskGeometry(cylinders_times_heads // heads, heads, sectors_per_track)


def compute_checksum(footer: bytes) -> int:
    """Compute the spec's checksum of a 512-byte footer: the one's complement of the sum of
    all its bytes, with the bytes of the checksum field counted as zero."""
    checksum_end = CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES
    byte_sum = sum(footer[:CHECKSUM_OFFSET]) + sum(footer[checksum_end:])
    return ~byte_sum & 0xFFFF_FFFF


def verify_checksum(footer: bytes) -> bool:
    """Return whether the checksum stored in a 512-byte footer matches its contents."""
    checksum_end = CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES
    stored_checksum = int.from_bytes(footer[CHECKSUM_OFFSET:checksum_end], "big")
    return stored_checksum == compute_checksum(footer)


def build_footer(current_size_bytes: int, unique_id: bytes) -> bytes:
    """Build the footer of a fixed VHD whose data part is current_size_bytes long.

    The output depends only on the arguments. unique_id is stored as is, so a caller that
    derives it from the layer content gets the same bytes for the same layer.

    Raises InvalidArgumentError if the size is not a positive multiple of 512 up to
    2040 GiB, or if unique_id is not 16 bytes.
    """
    if current_size_bytes <= 0 or current_size_bytes % SECTOR_SIZE_BYTES != 0:
        raise InvalidArgumentError(
            f"failed to build VHD footer: disk size {current_size_bytes} bytes is not a "
            f"positive multiple of the {SECTOR_SIZE_BYTES}-byte sector size; pad the "
            f"ext4 image to a sector boundary"
        )
    if current_size_bytes > MAX_DISK_SIZE_BYTES:
        raise InvalidArgumentError(
            f"failed to build VHD footer: disk size {current_size_bytes} bytes exceeds the "
            f"VHD maximum of {MAX_DISK_SIZE_BYTES} bytes (2040 GiB)"
        )
    if len(unique_id) != UNIQUE_ID_SIZE_BYTES:
        raise InvalidArgumentError(
            f"failed to build VHD footer: unique id {unique_id.hex()} is {len(unique_id)} "
            f"bytes, expected {UNIQUE_ID_SIZE_BYTES}"
        )

    geometry = compute_disk_geometry(current_size_bytes // SECTOR_SIZE_BYTES)

    # Timestamp 0 (2000-01-01 00:00:00 UTC) instead of the creation time, so that the same
    # layer always produces the same bytes. The checksum is computed after packing.
    footer = FOOTER_STRUCT.pack(
        COOKIE,
        Features.RESERVED,
        FILE_FORMAT_VERSION,
        FIXED_DISK_DATA_OFFSET,
        0,
        CREATOR_APPLICATION,
        CREATOR_VERSION,
        CREATOR_HOST_OS,
        current_size_bytes,
        current_size_bytes,
        geometry.cylinders,
        geometry.heads,
        geometry.sectors_per_track,
        DiskType.FIXED,
        0,
        unique_id,
        0,
    )

    checksum = compute_checksum(footer).to_bytes(CHECKSUM_SIZE_BYTES, "big")
    return footer[:CHECKSUM_OFFSET] + checksum + footer[CHECKSUM_OFFSET + CHECKSUM_SIZE_BYTES :]


def parse_footer(data: bytes) -> Footer:
    """Parse and validate the 512-byte footer of a fixed VHD.

    Raises CorruptInputError for a wrong length, cookie or checksum, or an unknown disk
    type, and UnsupportedError for a valid footer of a dynamic or differencing disk.
    The message names the offending value and its byte offset in the footer.
    """
    if len(data) != FOOTER_SIZE_BYTES:
        raise CorruptInputError(
            f"failed to parse VHD footer: got {len(data)} bytes, expected {FOOTER_SIZE_BYTES}"
        )

    (
        cookie,
        features,
        file_format_version,
        data_offset,
        timestamp,
        creator_application,
        creator_version,
        creator_host_os,
        original_size,
        current_size,
        cylinders,
        heads,
        sectors_per_track,
        disk_type,
        checksum,
        unique_id,
        saved_state,
    ) = FOOTER_STRUCT.unpack(data)

    if cookie != COOKIE:
        raise CorruptInputError(
            f"failed to parse VHD footer: invalid cookie {cookie!r} at offset "
            f"{COOKIE_OFFSET}, expected {COOKIE!r}"
        )

    expected_checksum = compute_checksum(data)
    if checksum != expected_checksum:
        raise CorruptInputError(
            f"failed to parse VHD footer: checksum {checksum:#010x} at offset "
            f"{CHECKSUM_OFFSET} does not match the computed {expected_checksum:#010x}"
        )

    try:
        known_disk_type = DiskType(disk_type)
    except ValueError:
        raise CorruptInputError(
            f"failed to parse VHD footer: invalid disk type {disk_type} at offset "
            f"{DISK_TYPE_OFFSET}"
        ) from None
    if known_disk_type != DiskType.FIXED:
        raise UnsupportedError(
            f"failed to parse VHD footer: disk type {known_disk_type.name} ({disk_type}) at "
            f"offset {DISK_TYPE_OFFSET} is not supported, only fixed disks "
            f"({DiskType.FIXED.value}) are"
        )

    return Footer(
        cookie=cookie,
        features=Features(features),
        file_format_version=file_format_version,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_application=creator_application,
        creator_version=creator_version,
        creator_host_os=creator_host_os,
        original_size=original_size,
        current_size=current_size,
        disk_geometry=DiskGeometry(cylinders, heads, sectors_per_track),
        disk_type=known_disk_type,
        checksum=checksum,
        unique_id=unique_id,
        saved_state=saved_state,
    )


def append_footer(
    fd_or_path: int | str | os.PathLike[str], ext4_size_bytes: int, unique_id: bytes
) -> bytes:
    """Write the footer of a fixed VHD at offset ext4_size_bytes and return the footer.

    The file is neither read nor synced. It may be sparse or shorter than ext4_size_bytes,
    because a hole reads as zeros just like the unwritten end of an ext4 image. Writing again
    over an existing footer gives the same bytes. A file descriptor must be open for writing
    and stays open.

    Raises InvalidArgumentError if the arguments are invalid for build_footer, or if the file
    is longer than ext4_size_bytes + 512, because readers look for the footer in the last
    512 bytes. Raises NotFoundError if the path does not exist.
    """
    footer = build_footer(ext4_size_bytes, unique_id)

    if isinstance(fd_or_path, int):
        _write_footer(fd_or_path, ext4_size_bytes, footer, str(fd_or_path))
        return footer

    path = os.fspath(fd_or_path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as error:
        raise NotFoundError(f"failed to append VHD footer to {path}: file not found") from error

    try:
        _write_footer(fd, ext4_size_bytes, footer, path)
    finally:
        os.close(fd)
    return footer


def _write_footer(fd: int, offset: int, footer: bytes, file_name: str) -> None:
    vhd_size_bytes = offset + len(footer)
    file_size_bytes = os.fstat(fd).st_size
    if file_size_bytes > vhd_size_bytes:
        raise InvalidArgumentError(
            f"failed to append VHD footer to {file_name}: the file is {file_size_bytes} "
            f"bytes, longer than the disk size {offset} plus the {len(footer)}-byte footer; "
            f"pass the ext4 image size or truncate the file to it"
        )

    # os.pwrite may write fewer bytes than requested, so write the rest until done.
    written_bytes = 0
    while written_bytes < len(footer):
        count = os.pwrite(fd, footer[written_bytes:], offset + written_bytes)
        if count == 0:
            raise OSError(f"failed to append VHD footer to {file_name}: write returned 0")
        written_bytes += count
