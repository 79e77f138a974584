"""Tests of the tar to ext4 converter on large and fragmented files, built from sparse input.

Every file here is sparse on the host, so a file of more than 4 GiB costs a few MiB of disk.
The kernel reads each image back through a loop mount, e2fsck checks it, debugfs shows the
extent trees, and qemu-img reads the VHD footer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Final

import pytest

import oracle
import treegen
from lcow import vhd
from lcow.errors import CorruptInputError
from lcow.layer.tar2ext4 import convert_tar
from treegen import MIB, DataRegion, Entry, FileData, Kind

GIB: Final = 1024 * MIB
BLOCK_SIZE_BYTES: Final = 4096
EXTENT_MAX_BLOCKS: Final = 32768  # ext4 extent length limit for initialized extents
INODE_EXTENTS: Final = 4  # extents in i_block before the tree needs index or leaf blocks
# A leaf or index block: a 12-byte header, then 12-byte entries; 340 of them leave 4 bytes
# for the checksum tail that metadata_csum adds.
LEAF_EXTENTS: Final = (BLOCK_SIZE_BYTES - 12) // 12

# Bound for the disk use of an image whose sparse file contains a few MiB of data, whatever
# its logical size. It leaves room for the inode tables and directories of a small image.
SMALL_IMAGE_BYTES: Final = 64 * MIB

READ_CHUNK_BYTES: Final = 8 * MIB

# A file of 4 GiB + 12345 bytes with data at both ends, at an unaligned offset and across the
# 4 GiB boundary, where 32-bit byte offsets and sizes wrap. All regions but the last are
# multiples of 512 bytes long, so GNU tar would read the member that treegen writes the same
# way as libarchive (see treegen.sparse_map_block).
BIG_FILE_SIZE_BYTES: Final = 4 * GIB + 12345
BIG_FILE: Final = FileData(
    BIG_FILE_SIZE_BYTES,
    (
        DataRegion(0, 4096, 1),
        DataRegion(MIB + 7, 10240, 2),
        DataRegion(GIB, 65536, 3),
        DataRegion(2 * GIB + 4096, 4096, 4),
        DataRegion(4 * GIB - 2048, 5120, 5),
        DataRegion(BIG_FILE_SIZE_BYTES - 345, 345, 6),
    ),
)
BIG_FILE_NAME: Final = "big"

# GNU tar's formats for sparse members: (format, sparse version) for tar's options.
GNU_TAR_SPARSE_FORMATS: Final = {
    "pax-1.0": ("pax", "1.0"),
    "pax-0.1": ("pax", "0.1"),
    "pax-0.0": ("pax", "0.0"),
    "gnu-old": ("gnu", None),
}

# One line of debugfs's "ex" (dump_extents) output, for example
# " 1/ 1   3/ 10     4 -     4    67 -    67      1 Uninit".
EXTENT_LINE: Final = re.compile(
    r"^\s*(?P<level>\d+)/\s*(?P<depth>\d+)\s+(?P<index>\d+)/\s*(?P<count>\d+)\s+"
    r"(?P<logical_start>\d+)\s*-\s*(?P<logical_end>\d+)\s+(?P<physical_start>\d+)"
    r"(?:\s*-\s*(?P<physical_end>\d+))?\s+(?P<length>\d+)\s*(?P<flags>.*)$"
)


@dataclasses.dataclass(frozen=True)
class ExtentLine:
    """One node entry of an extent tree as debugfs prints it; leaves have level == depth."""

    level: int
    depth: int
    logical_start: int
    length: int  # blocks
    flags: str


def dump_extents(image: Path, path: str) -> list[ExtentLine]:
    """Return the extent tree of path in image, as debugfs's "ex" command prints it."""
    output = oracle.run_tool(["debugfs", "-R", f"ex {path}", str(image)]).stdout
    lines = []
    for text in output.splitlines():
        match = EXTENT_LINE.match(text)
        if match is None:
            continue
        lines.append(
            ExtentLine(
                level=int(match["level"]),
                depth=int(match["depth"]),
                logical_start=int(match["logical_start"]),
                length=int(match["length"]),
                flags=match["flags"].strip(),
            )
        )
    if not lines:
        raise AssertionError(f"debugfs printed no extents for {path}:\n{output}")
    return lines


def minimal_extent_depth(extent_count: int) -> int:
    """Return the depth of the smallest extent tree with room for extent_count extents."""
    depth = 0
    capacity = INODE_EXTENTS
    while capacity < extent_count:
        depth += 1
        capacity *= LEAF_EXTENTS
    return depth


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as content:
        while chunk := content.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def big_file_sha256() -> str:
    return BIG_FILE.sha256()


def write_tree_tar(tree: treegen.Tree, tar_path: Path) -> None:
    with tar_path.open("wb") as tar_file:
        treegen.write_tar(tree, tar_file)


def single_file_tree(path: str, data: FileData, *, sparse: bool) -> treegen.Tree:
    return treegen.Tree((Entry(path, Kind.FILE, mode=0o644, data=data, sparse=sparse),))


def region_mismatches(path: Path, data: FileData) -> list[str]:
    """Read each data region of data back from path and list the regions that differ."""
    mismatches = []
    with path.open("rb") as content:
        for region in data.regions:
            content.seek(region.offset)
            if content.read(region.length) != region.data():
                mismatches.append(f"{region.length} bytes at offset {region.offset}")
    return mismatches


def assert_reads_back(image: Path, path: str, data: FileData, sha256: str) -> None:
    """Mount image and check the size, the digest and every data region of path."""
    with oracle.loop_mount(image) as mountpoint:
        file_path = mountpoint / path
        assert file_path.stat().st_size == data.size
        assert sha256_of_file(file_path) == sha256
        assert region_mismatches(file_path, data) == []


# --- a file above 4 GiB ----------------------------------------------------------------


@pytest.fixture(scope="module")
def big_sparse_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder containing BIG_FILE as a sparse host file, made with truncate and pwrite."""
    folder = tmp_path_factory.mktemp("big-sparse")
    path = folder / BIG_FILE_NAME
    with path.open("wb") as output:
        os.truncate(output.fileno(), BIG_FILE.size)
        for region in BIG_FILE.regions:
            os.pwrite(output.fileno(), region.data(), region.offset)
    return folder


def gnu_tar_sparse(
    source_folder: Path, tar_path: Path, tar_format: str, version: str | None
) -> None:
    """Archive source_folder/BIG_FILE_NAME with GNU tar --sparse in the given format."""
    arguments = ["tar", f"--format={tar_format}", "--sparse"]
    if version is not None:
        arguments.append(f"--sparse-version={version}")
    arguments += ["--create", f"--file={tar_path}", f"--directory={source_folder}", BIG_FILE_NAME]
    oracle.run_tool(arguments)


def check_big_image(image: Path) -> None:
    oracle.e2fsck_clean(image)

    assert image.stat().st_blocks * 512 < SMALL_IMAGE_BYTES
    assert oracle.ext4_size_bytes(image) < SMALL_IMAGE_BYTES

    assert_reads_back(image, BIG_FILE_NAME, BIG_FILE, big_file_sha256())


@pytest.mark.root
@pytest.mark.parametrize("sparse_format", list(GNU_TAR_SPARSE_FORMATS))
def test_big_sparse_gnu_tar(sparse_format: str, big_sparse_folder: Path, tmp_path: Path) -> None:
    tar_path = tmp_path / "layer.tar"
    tar_format, version = GNU_TAR_SPARSE_FORMATS[sparse_format]
    gnu_tar_sparse(big_sparse_folder, tar_path, tar_format, version)
    assert tar_path.stat().st_size < 16 * MIB  # GNU tar stored the holes as a sparse map

    image = tmp_path / "layer.vhd"
    convert_tar(tar_path, image)

    check_big_image(image)


@pytest.mark.root
def test_big_sparse_tarfile(tmp_path: Path) -> None:
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(single_file_tree(BIG_FILE_NAME, BIG_FILE, sparse=True), tar_path)

    image = tmp_path / "layer.vhd"
    convert_tar(tar_path, image)

    check_big_image(image)


# --- extent trees ----------------------------------------------------------------------


def fragmented_file(region_count: int) -> FileData:
    """Return a file of region_count one-block data regions separated by one-block holes."""
    regions = tuple(
        DataRegion(2 * index * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES, index)
        for index in range(region_count)
    )
    return FileData(2 * region_count * BLOCK_SIZE_BYTES - BLOCK_SIZE_BYTES, regions)


@pytest.mark.root
@pytest.mark.parametrize(
    "region_count",
    [
        10,  # one leaf block below the inode
        400,  # more than one leaf block, because a leaf has room for 340 extents
        1400,  # more than 4 leaves of 340 extents: needs a second index level
    ],
)
def test_extent_tree_depth(region_count: int, tmp_path: Path) -> None:
    data = fragmented_file(region_count)
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(single_file_tree("fragmented", data, sparse=True), tar_path)

    image = tmp_path / "layer.vhd"
    convert_tar(tar_path, image)

    oracle.e2fsck_clean(image)

    extents = dump_extents(image, "/fragmented")
    depth = extents[0].depth
    leaves = [extent for extent in extents if extent.level == depth]
    leaf_blocks = [extent for extent in extents if extent.level == depth - 1]
    assert depth == minimal_extent_depth(region_count)
    assert len(leaves) == region_count
    assert [leaf.logical_start for leaf in leaves] == [
        region.offset // BLOCK_SIZE_BYTES for region in data.regions
    ]
    assert {leaf.length for leaf in leaves} == {1}
    assert len(leaf_blocks) >= -(-region_count // LEAF_EXTENTS)

    assert_reads_back(image, "fragmented", data, data.sha256())


@pytest.mark.root
def test_extent_length_limit(tmp_path: Path) -> None:
    """A dense file one block longer than an extent can cover needs a second extent."""
    data = FileData.dense((EXTENT_MAX_BLOCKS + 1) * BLOCK_SIZE_BYTES, 7)
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(single_file_tree("long", data, sparse=False), tar_path)

    image = tmp_path / "layer.vhd"
    convert_tar(tar_path, image)
    tar_path.unlink()

    oracle.e2fsck_clean(image)

    extents = dump_extents(image, "/long")
    leaves = [extent for extent in extents if extent.level == extent.depth]
    assert len(leaves) >= 2
    assert max(leaf.length for leaf in leaves) <= EXTENT_MAX_BLOCKS
    assert sum(leaf.length for leaf in leaves) == EXTENT_MAX_BLOCKS + 1
    assert [leaf.logical_start for leaf in leaves] == [
        sum(leaf.length for leaf in leaves[:index]) for index in range(len(leaves))
    ]

    assert_reads_back(image, "long", data, data.sha256())


# --- determinism and the VHD footer ----------------------------------------------------


def test_conversion_deterministic(tmp_path: Path) -> None:
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(treegen.all_kinds_tree(), tar_path)
    first = tmp_path / "first" / "layer.vhd"
    second = tmp_path / "second" / "other-name.vhd"
    from_stream = tmp_path / "stream.vhd"
    for image in (first, second):
        image.parent.mkdir()

    convert_tar(tar_path, first)
    convert_tar(tar_path, second)
    with tar_path.open("rb") as source:
        convert_tar(source, from_stream)

    assert sha256_of_file(second) == sha256_of_file(first)
    assert sha256_of_file(from_stream) == sha256_of_file(first)


def test_vhd_footer_size(tmp_path: Path) -> None:
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(treegen.all_kinds_tree(), tar_path)
    image = tmp_path / "layer.vhd"

    stats = convert_tar(tar_path, image)

    ext4_size = oracle.ext4_size_bytes(image)
    assert stats.image_size_bytes == ext4_size
    assert image.stat().st_size == ext4_size + vhd.FOOTER_SIZE_BYTES
    assert oracle.vhd_virtual_size_bytes(image) == ext4_size

    footer_bytes = image.read_bytes()[-vhd.FOOTER_SIZE_BYTES :]
    footer = vhd.parse_footer(footer_bytes)
    assert footer.current_size == ext4_size
    assert footer.original_size == ext4_size
    assert footer.disk_type == vhd.DiskType.FIXED

    damaged = bytearray(footer_bytes)
    damaged[vhd.CHECKSUM_OFFSET + vhd.CHECKSUM_SIZE_BYTES] ^= 0x01
    with pytest.raises(CorruptInputError):
        vhd.parse_footer(bytes(damaged))


def test_vhd_footer_absent(tmp_path: Path) -> None:
    tar_path = tmp_path / "layer.tar"
    write_tree_tar(treegen.all_kinds_tree(), tar_path)
    image = tmp_path / "layer.img"

    convert_tar(tar_path, image, vhd_footer=False)

    assert image.stat().st_size == oracle.ext4_size_bytes(image)
    oracle.e2fsck_clean(image)
