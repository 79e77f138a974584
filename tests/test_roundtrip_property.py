"""Property test of the tar to ext4 converter: random trees in, the kernel's view out.

Each example draws a tree (treegen), writes it as a PAX tar, converts it, checks the image
with e2fsck and mounts it read-only. The kernel's view of the image is compared with two
references: the model the tar was written from, and GNU tar's extraction of the same tar.
GNU tar extracts onto a tmpfs, because the filesystem of the test folders may store neither
nanoseconds nor times outside 1901..2038 (ext4 with 128-byte inodes does not).

With the environment variable CI set the examples are derandomized, so a failure in CI
reproduces with the same command on any machine.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings

import oracle
import treegen
from lcow.layer.tar2ext4 import convert_tar

pytestmark = pytest.mark.root

# A cap, not a reservation: a drawn tree has at most 30 files of under 29 MiB each.
TMPFS_SIZE: str = "2g"


@pytest.fixture(scope="module")
def work_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Yield a folder for tars and images that lives as long as the module's examples."""
    folder = tmp_path_factory.mktemp("roundtrip")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tmpfs_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Yield a tmpfs mount point for GNU tar's extractions; unmount it afterwards."""
    oracle.require_root()
    oracle.require_tool("mount")
    mountpoint = tmp_path_factory.mktemp("gnu-tar-tmpfs")
    oracle.run_tool(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mountpoint)])
    try:
        yield mountpoint
    finally:
        oracle.run_tool(["umount", str(mountpoint)])


def convert_and_snapshot(tar_path: Path, folder: Path) -> oracle.Snapshot:
    """Convert tar_path, check the image with e2fsck and snapshot it through a loop mount."""
    image = folder / "layer.vhd"
    convert_tar(tar_path, image)

    oracle.e2fsck_clean(image)

    with oracle.loop_mount(image) as mountpoint:
        return oracle.snapshot_tree(mountpoint)


def gnu_tar_reference(tar_path: Path, tmpfs: Path) -> oracle.Snapshot:
    """Extract tar_path with GNU tar onto the tmpfs and return the tree an image must contain.

    tmpfs keeps 64-bit times, so the times that ext4 cannot store are clamped here as the
    converter clamps them.
    """
    destination = Path(tempfile.mkdtemp(dir=tmpfs))
    try:
        oracle.extract_with_gnu_tar(tar_path, destination)
        members = [member.name for member in oracle.list_tar_members(tar_path)]
        reference = oracle.expected_from_tar_extraction(
            oracle.snapshot_tree(destination), members=members
        )
    finally:
        shutil.rmtree(destination)
    return {
        path: dataclasses.replace(record, mtime_ns=treegen.clamp_mtime_ns(record.mtime_ns))
        for path, record in reference.items()
    }


@settings(
    max_examples=50,  # about 5 s in all on a 2-core machine (measured with CI set)
    deadline=None,
    derandomize=oracle.in_ci(),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(tree=treegen.all_kinds_tree())
@given(tree=treegen.trees())
def test_random_tree_roundtrip(tree: treegen.Tree, work_folder: Path, tmpfs_folder: Path) -> None:
    folder = Path(tempfile.mkdtemp(dir=work_folder))
    try:
        tar_path = folder / "layer.tar"
        with tar_path.open("wb") as tar_file:
            treegen.write_tar(tree, tar_file)

        image_snapshot = convert_and_snapshot(tar_path, folder)
        actual, lost_found_problems = oracle.split_lost_found(image_snapshot)
        assert lost_found_problems == []

        from_model = oracle.compare_trees(treegen.expected_snapshot(tree), actual)
        assert from_model == [], "image vs model: " + oracle.format_differences(from_model)

        reference = gnu_tar_reference(tar_path, tmpfs_folder)
        from_gnu_tar = oracle.compare_trees(reference, actual)
        assert from_gnu_tar == [], "image vs GNU tar: " + oracle.format_differences(from_gnu_tar)
    finally:
        shutil.rmtree(folder)
