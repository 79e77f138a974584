"""Convert every corpus layer and check the image against tools that lcow does not contain.

Each layer file (plain and gzip) is converted once per module. e2fsck checks the image, the
kernel mounts it read-only through a loop device, and the mounted tree must equal GNU tar's
extraction of the same file after the whiteout and implicit-directory rules are applied.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcow.layer.tar2ext4 import ConversionStats, convert_tar
from oracle import (
    VHD_FOOTER_SIZE_BYTES,
    Snapshot,
    TarMember,
    compare_trees,
    e2fsck_clean,
    expected_from_tar_extraction,
    ext4_size_bytes,
    extract_with_gnu_tar,
    format_differences,
    list_tar_members,
    loop_mount,
    snapshot_tree,
    split_lost_found,
    vhd_virtual_size_bytes,
)

pytestmark = pytest.mark.root


@dataclasses.dataclass(frozen=True)
class ConvertedLayer:
    image: Path
    stats: ConversionStats


@pytest.fixture(scope="module")
def converted(
    corpus_layer: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConvertedLayer]:
    folder = tmp_path_factory.mktemp(corpus_layer.name + "-image")
    image = folder / "layer.vhd"
    stats = convert_tar(corpus_layer, image, vhd_footer=True)
    yield ConvertedLayer(image=image, stats=stats)

    # Images of the large layers take hundreds of MB each, so none outlives its module.
    image.unlink()


@pytest.fixture(scope="module")
def members(corpus_layer: Path) -> list[TarMember]:
    return list_tar_members(corpus_layer)


@pytest.fixture(scope="module")
def expected_tree(
    corpus_layer: Path, members: list[TarMember], tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    folder = tmp_path_factory.mktemp(corpus_layer.name + "-gnu-tar")
    extract_with_gnu_tar(corpus_layer, folder)
    reference = snapshot_tree(folder)
    shutil.rmtree(folder)
    return expected_from_tar_extraction(reference, members=[member.name for member in members])


def test_layer_e2fsck(converted: ConvertedLayer) -> None:
    e2fsck_clean(converted.image)


def test_layer_tree(converted: ConvertedLayer, expected_tree: Snapshot) -> None:
    with loop_mount(converted.image, read_only=True) as mountpoint:
        mounted = snapshot_tree(mountpoint)
    actual, lost_found_problems = split_lost_found(mounted)

    assert lost_found_problems == [], format_differences(lost_found_problems)

    differences = compare_trees(expected_tree, actual)
    assert differences == [], format_differences(differences)


def test_layer_entry_count(converted: ConvertedLayer, members: list[TarMember]) -> None:
    assert converted.stats.entries == len(members)


def test_layer_size_bytes(converted: ConvertedLayer, members: list[TarMember]) -> None:
    assert converted.stats.size_bytes == sum(member.size for member in members)


def test_layer_image_size(converted: ConvertedLayer) -> None:
    file_size_bytes = converted.image.stat().st_size

    assert converted.stats.image_size_bytes == ext4_size_bytes(converted.image)
    assert file_size_bytes == converted.stats.image_size_bytes + VHD_FOOTER_SIZE_BYTES


def test_layer_vhd_size(converted: ConvertedLayer) -> None:
    assert vhd_virtual_size_bytes(converted.image) == converted.stats.image_size_bytes
