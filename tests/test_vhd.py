"""Tests of the fixed VHD footer, with qemu-img (package qemu-utils) as an independent reader."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lcow.errors import CorruptInputError, InvalidArgumentError, NotFoundError, UnsupportedError
from lcow.vhd import (
    FOOTER_SIZE_BYTES,
    FOOTER_STRUCT,
    MAX_DISK_SIZE_BYTES,
    MAX_GEOMETRY_SECTORS,
    DiskGeometry,
    DiskType,
    Features,
    append_footer,
    build_footer,
    compute_checksum,
    compute_disk_geometry,
    parse_footer,
    verify_checksum,
)
from oracle import skip_or_fail

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

UNIQUE_ID = bytes(range(0x10, 0x20))


def replace_bytes(footer: bytes, offset: int, value: bytes) -> bytes:
    """Return footer with value written at offset and the checksum recomputed."""
    changed = bytearray(footer)
    changed[offset : offset + len(value)] = value
    changed[64:68] = compute_checksum(bytes(changed)).to_bytes(4, "big")
    return bytes(changed)


@pytest.fixture
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        skip_or_fail("qemu-img not found; install it with `apt-get install -y qemu-utils`")
    return path


def qemu_virtual_size(qemu_img: str, image: Path) -> int:
    result = subprocess.run(
        [qemu_img, "info", "-f", "vpc", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    )
    virtual_size: int = json.loads(result.stdout)["virtual-size"]
    return virtual_size


def make_sparse_vhd(path: Path, size_bytes: int, creator_application: bytes = b"") -> None:
    """Create a sparse file of size_bytes followed by a footer, optionally with another
    creator application."""
    with path.open("wb") as file:
        file.truncate(size_bytes)
    footer = append_footer(path, size_bytes, UNIQUE_ID)
    if creator_application:
        with path.open("r+b") as file:
            file.seek(size_bytes)
            file.write(replace_bytes(footer, 28, creator_application))


def test_footer_struct_size() -> None:
    assert FOOTER_STRUCT.size == 512
    assert FOOTER_SIZE_BYTES == 512


def test_build_footer_length() -> None:
    assert len(build_footer(MIB, UNIQUE_ID)) == 512


def test_build_footer_field_bytes() -> None:
    size_bytes = 10 * MIB + 4096
    footer = build_footer(size_bytes, UNIQUE_ID)

    # Offsets and sizes from the spec's footer table, independent of FOOTER_STRUCT.
    assert footer[0:8] == b"conectix"
    assert footer[8:12] == bytes.fromhex("00000002")
    assert footer[12:16] == bytes.fromhex("00010000")
    assert footer[16:24] == b"\xff" * 8
    assert footer[24:28] == bytes(4)
    assert footer[28:32] == b"win "
    assert footer[32:36] == bytes.fromhex("00010000")
    assert footer[36:40] == b"Wi2k"
    assert footer[40:48] == size_bytes.to_bytes(8, "big")
    assert footer[48:56] == size_bytes.to_bytes(8, "big")
    assert footer[56:58] == (301).to_bytes(2, "big")
    assert footer[58] == 4
    assert footer[59] == 17
    assert footer[60:64] == bytes.fromhex("00000002")
    assert footer[68:84] == UNIQUE_ID
    assert footer[84] == 0
    assert footer[85:] == bytes(427)


def test_parse_footer_fields() -> None:
    footer = parse_footer(build_footer(GIB, UNIQUE_ID))

    assert footer.cookie == b"conectix"
    assert footer.features == Features.RESERVED
    assert footer.file_format_version == 0x00010000
    assert footer.data_offset == 0xFFFFFFFFFFFFFFFF
    assert footer.timestamp == 0
    assert footer.creator_application == b"win "
    assert footer.creator_version == 0x00010000
    assert footer.creator_host_os == b"Wi2k"
    assert footer.original_size == GIB
    assert footer.current_size == GIB
    assert footer.disk_geometry == DiskGeometry(2080, 16, 63)
    assert footer.disk_type == DiskType.FIXED
    assert footer.unique_id == UNIQUE_ID
    assert footer.saved_state == 0


def test_build_footer_deterministic() -> None:
    assert build_footer(GIB, UNIQUE_ID) == build_footer(GIB, UNIQUE_ID)


def test_build_footer_unique_id_differs() -> None:
    first = build_footer(GIB, UNIQUE_ID)
    second = build_footer(GIB, bytes(16))

    differing_offsets = [i for i in range(512) if first[i] != second[i]]
    assert differing_offsets
    assert all(64 <= offset < 84 for offset in differing_offsets)


def test_checksum_value() -> None:
    footer = build_footer(GIB, UNIQUE_ID)

    # One's complement of the byte sum with the checksum field left out, as in the spec.
    byte_sum = 0
    for offset, value in enumerate(footer):
        if not 64 <= offset < 68:
            byte_sum += value
    expected = 0xFFFFFFFF - byte_sum

    assert int.from_bytes(footer[64:68], "big") == expected
    assert verify_checksum(footer)


def test_checksum_flipped_byte() -> None:
    footer = build_footer(10 * MIB + 4096, UNIQUE_ID)

    for offset in range(512):
        damaged = bytearray(footer)
        damaged[offset] ^= 0x01
        assert not verify_checksum(bytes(damaged)), f"flip at offset {offset} not detected"


# Each row follows the spec's "CHS Calculation" pseudo-code by hand. "cth" is
# cylinderTimesHeads, "/" is integer division.
GEOMETRY_CASES = [
    # 1 MiB: S=17, cth=2048/17=120, H=(120+1023)/1024=1 raised to 4, C=120/4=30.
    (2048, DiskGeometry(30, 4, 17)),
    # 10 MiB + 4 KiB: S=17, cth=20488/17=1205, H=2 raised to 4, C=1205/4=301.
    (20488, DiskGeometry(301, 4, 17)),
    # 34 MiB: S=17, cth=69632/17=4096, H=4, cth >= 4*1024 so S=31, H=16,
    # cth=69632/31=2246, C=2246/16=140.
    (69632, DiskGeometry(140, 16, 31)),
    # 128 MiB: S=17, cth=262144/17=15420, H=(15420+1023)/1024=16, 15420 < 16384, C=963.
    (262144, DiskGeometry(963, 16, 17)),
    # 200 MiB: S=17, cth=24094, H=24 > 16 so S=31, H=16, cth=409600/31=13212, C=825.
    (409600, DiskGeometry(825, 16, 31)),
    # 1 GiB: S=17 gives H=121 > 16, S=31 gives cth=67650 >= 16384, so S=63, H=16,
    # cth=2097152/63=33288, C=2080.
    (2097152, DiskGeometry(2080, 16, 63)),
    # One below 65535*16*63: S=63, cth=66059279/63=1048559, C=65534.
    (65535 * 16 * 63 - 1, DiskGeometry(65534, 16, 63)),
    # Exactly 65535*16*63: S=255, H=16, cth=66059280/255=259056, C=16191.
    (65535 * 16 * 63, DiskGeometry(16191, 16, 255)),
    # 64 GiB: S=255, H=16, cth=134217728/255=526344, C=32896.
    (134217728, DiskGeometry(32896, 16, 255)),
    # 200 GiB is above 65535*16*255 sectors and gets the maximum geometry.
    (419430400, DiskGeometry(65535, 16, 255)),
]


@pytest.mark.parametrize(("total_sectors", "expected"), GEOMETRY_CASES)
def test_disk_geometry_table(total_sectors: int, expected: DiskGeometry) -> None:
    assert compute_disk_geometry(total_sectors) == expected


@given(st.integers(min_value=1, max_value=MAX_DISK_SIZE_BYTES // 512))
def test_disk_geometry_bounds(total_sectors: int) -> None:
    geometry = compute_disk_geometry(total_sectors)

    assert geometry.total_sectors <= min(total_sectors, MAX_GEOMETRY_SECTORS)
    assert geometry.cylinders <= 65535
    assert 4 <= geometry.heads <= 16
    assert geometry.sectors_per_track in {17, 31, 63, 255}


@given(
    st.integers(min_value=1, max_value=MAX_DISK_SIZE_BYTES // 512),
    st.binary(min_size=16, max_size=16),
)
def test_footer_round_trip(total_sectors: int, unique_id: bytes) -> None:
    footer = parse_footer(build_footer(total_sectors * 512, unique_id))

    assert footer.current_size == total_sectors * 512
    assert footer.original_size == total_sectors * 512
    assert footer.unique_id == unique_id
    assert footer.disk_geometry == compute_disk_geometry(total_sectors)


@pytest.mark.parametrize("size_bytes", [0, -512, 1000, GIB + 1, MAX_DISK_SIZE_BYTES + 512])
def test_build_footer_invalid_size(size_bytes: int) -> None:
    with pytest.raises(InvalidArgumentError, match=str(size_bytes)):
        build_footer(size_bytes, UNIQUE_ID)


def test_build_footer_max_size() -> None:
    footer = parse_footer(build_footer(MAX_DISK_SIZE_BYTES, UNIQUE_ID))

    assert footer.current_size == MAX_DISK_SIZE_BYTES
    assert footer.disk_geometry == DiskGeometry(65535, 16, 255)


@pytest.mark.parametrize("unique_id", [b"", bytes(15), bytes(17)])
def test_build_footer_invalid_unique_id(unique_id: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match=f"is {len(unique_id)} bytes"):
        build_footer(GIB, unique_id)


@pytest.mark.parametrize("length", [0, 511, 513])
def test_parse_footer_wrong_length(length: int) -> None:
    with pytest.raises(CorruptInputError, match=f"got {length} bytes"):
        parse_footer(bytes(length))


def test_parse_footer_bad_cookie() -> None:
    footer = replace_bytes(build_footer(GIB, UNIQUE_ID), 0, b"cxsparse")

    with pytest.raises(CorruptInputError, match=r"cookie b'cxsparse' at offset 0"):
        parse_footer(footer)


def test_parse_footer_bad_checksum() -> None:
    damaged = bytearray(build_footer(GIB, UNIQUE_ID))
    damaged[100] = 0xFF

    with pytest.raises(CorruptInputError, match="at offset 64 does not match"):
        parse_footer(bytes(damaged))


@pytest.mark.parametrize("disk_type", [1, 5, 7, 0xFFFFFFFF])
def test_parse_footer_unknown_disk_type(disk_type: int) -> None:
    footer = replace_bytes(build_footer(GIB, UNIQUE_ID), 60, disk_type.to_bytes(4, "big"))

    with pytest.raises(CorruptInputError, match=f"disk type {disk_type} at offset 60"):
        parse_footer(footer)


@pytest.mark.parametrize("disk_type", [DiskType.NONE, DiskType.DYNAMIC, DiskType.DIFFERENCING])
def test_parse_footer_unsupported_disk_type(disk_type: DiskType) -> None:
    footer = replace_bytes(build_footer(GIB, UNIQUE_ID), 60, disk_type.to_bytes(4, "big"))

    with pytest.raises(
        UnsupportedError, match=re.escape(f"{disk_type.name} ({disk_type.value}) at offset 60")
    ):
        parse_footer(footer)


def test_append_footer_path(tmp_path: Path) -> None:
    size_bytes = 10 * MIB + 4096
    path = tmp_path / "layer.vhd"
    with path.open("wb") as file:
        file.write(b"head")
        file.truncate(size_bytes)
        file.seek(size_bytes - 4)
        file.write(b"tail")

    footer = append_footer(path, size_bytes, UNIQUE_ID)

    data = path.read_bytes()
    assert len(data) == size_bytes + 512
    assert data[:4] == b"head"
    assert data[size_bytes - 4 : size_bytes] == b"tail"
    assert data[size_bytes:] == footer
    assert footer == build_footer(size_bytes, UNIQUE_ID)


def test_append_footer_fd(tmp_path: Path) -> None:
    path = tmp_path / "layer.vhd"
    path.write_bytes(b"x" * MIB)

    fd = os.open(path, os.O_RDWR)
    try:
        footer = append_footer(fd, MIB, UNIQUE_ID)
        assert os.fstat(fd).st_size == MIB + 512
    finally:
        os.close(fd)

    data = path.read_bytes()
    assert data[:MIB] == b"x" * MIB
    assert data[MIB:] == footer


def test_append_footer_short_file(tmp_path: Path) -> None:
    path = tmp_path / "layer.vhd"
    path.write_bytes(b"")

    append_footer(path, MIB, UNIQUE_ID)

    data = path.read_bytes()
    assert len(data) == MIB + 512
    assert data[:MIB] == bytes(MIB)
    assert parse_footer(data[MIB:]).current_size == MIB


def test_append_footer_twice(tmp_path: Path) -> None:
    path = tmp_path / "layer.vhd"
    path.write_bytes(bytes(MIB))

    append_footer(path, MIB, UNIQUE_ID)
    first = path.read_bytes()
    append_footer(path, MIB, UNIQUE_ID)

    assert path.read_bytes() == first


def test_append_footer_long_file(tmp_path: Path) -> None:
    path = tmp_path / "layer.vhd"
    path.write_bytes(bytes(MIB + 1024))

    with pytest.raises(InvalidArgumentError, match=f"is {MIB + 1024} bytes"):
        append_footer(path, MIB, UNIQUE_ID)
    assert path.stat().st_size == MIB + 1024


def test_append_footer_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.vhd"

    with pytest.raises(NotFoundError, match=re.escape(str(path))):
        append_footer(path, MIB, UNIQUE_ID)
    assert not path.exists()


@pytest.mark.parametrize("size_bytes", [GIB, 10 * MIB + 4096, 200 * MIB + 512])
def test_qemu_img_virtual_size(qemu_img: str, tmp_path: Path, size_bytes: int) -> None:
    # None of these sizes is a whole number of CHS cylinders, so a reader that used the
    # geometry would report less. QEMU 7.2 rejects a footer with a wrong checksum, so a pass
    # also shows that QEMU accepts the checksum.
    assert compute_disk_geometry(size_bytes // 512).total_sectors * 512 < size_bytes
    path = tmp_path / "layer.vhd"
    make_sparse_vhd(path, size_bytes)

    assert qemu_virtual_size(qemu_img, path) == size_bytes


def test_qemu_img_unknown_creator(qemu_img: str, tmp_path: Path) -> None:
    # Shows why the footer names "win ": QEMU uses the CHS geometry for a creator
    # application that it does not know, such as "lcow".
    size_bytes = 10 * MIB + 4096
    path = tmp_path / "layer.vhd"
    make_sparse_vhd(path, size_bytes, creator_application=b"lcow")

    chs_size_bytes = DiskGeometry(301, 4, 17).total_sectors * 512
    assert qemu_virtual_size(qemu_img, path) == chs_size_bytes


@pytest.mark.parametrize("size", ["1M", "10M", "34M", "128M", "200M", "1G", "40G"])
def test_qemu_img_created_footer(qemu_img: str, tmp_path: Path, size: str) -> None:
    # qemu-img rounds a fixed VHD up to a size that its CHS geometry addresses exactly and
    # computes that geometry with its own implementation of the spec's algorithm.
    path = tmp_path / "qemu.vhd"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(path), size],
        check=True,
    )
    with path.open("rb") as file:
        file.seek(-512, os.SEEK_END)
        footer = parse_footer(file.read())

    assert footer.creator_application == b"qemu"
    assert footer.disk_type == DiskType.FIXED
    assert footer.disk_geometry.total_sectors * 512 == footer.current_size
    assert compute_disk_geometry(footer.current_size // 512) == footer.disk_geometry
