"""The reference cases: what the same work costs with standard tools on this machine."""

import subprocess
import sys
from pathlib import Path
from typing import Final

from bench.inputs import Layer
from bench.timing import Case, Sample, run_command

# The usual shell route from a tar to an ext4 image: extract, size the image from du and
# the entry count, then let mke2fs copy the tree in. The margins leave room for the
# metadata and the journal that mke2fs adds; mke2fs fails when the image is too small.
SHELL_ROUTE: Final = r"""
set -eu
tar -xf "$1" -C "$2"
used_kib=$(du -sk "$2" | cut -f1)
entries=$(find "$2" | wc -l)
truncate -s "$(( used_kib + used_kib / 10 + 65536 ))K" "$3"
mkfs.ext4 -q -F -N "$(( entries + entries / 10 + 4096 ))" -d "$2" "$3"
"""


def tar_extract(layer: Layer) -> Case:
    """Time ``tar -xf`` (or ``tar -xzf``) into the scratch folder on the output tmpfs."""
    flags = "-xzf" if layer.gzip else "-xf"

    def run(scratch: Path) -> Sample:
        target = scratch / "tree"
        target.mkdir()
        return run_command(["tar", flags, str(layer.path), "-C", str(target)])

    return Case(f"tar {flags}", is_reference=True, run=run)


def shell_route(layer: Layer) -> Case:
    """Time ``tar -xf`` then ``mkfs.ext4 -d``, together, as one shell script."""

    def run(scratch: Path) -> Sample:
        tree = scratch / "tree"
        tree.mkdir()
        image = scratch / "image.ext4"
        return run_command(
            ["bash", "-c", SHELL_ROUTE, "shell-route", str(layer.path), str(tree), str(image)]
        )

    return Case("tar -xf + mkfs.ext4 -d", is_reference=True, run=run)


def tar_create(mount_point: Path) -> Case:
    """Time ``tar -c`` of a mounted layer image into a file on the output tmpfs.

    The archive goes to a file: GNU tar skips reading file data when it writes to
    /dev/null, which would time a listing instead of an export.
    """

    def run(scratch: Path) -> Sample:
        return run_command(["tar", "-cf", str(scratch / "export.tar"), "-C", str(mount_point), "."])

    return Case("tar -c of the mounted image", is_reference=True, run=run)


def sparse_copy(source: Path) -> Case:
    """Time ``cp --sparse=always`` of the cached sandbox."""

    def run(scratch: Path) -> Sample:
        return run_command(["cp", "--sparse=always", str(source), str(scratch / source.name)])

    return Case("cp --sparse=always", is_reference=True, run=run)


def interpreter_start() -> Case:
    """Time ``python -c pass``, the least any Python worker process costs to start."""

    def run(scratch: Path) -> Sample:
        del scratch
        return run_command([sys.executable, "-c", "pass"])

    return Case("python -c pass", is_reference=True, run=run)


class LoopMount:
    """A read-only loop mount of a layer image; ``mount -o loop`` detaches it at unmount."""

    def __init__(self, image: Path, mount_point: Path) -> None:
        self.image = image
        self.mount_point = mount_point

    def __enter__(self) -> Path:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "loop,ro", str(self.image), str(self.mount_point)],
            check=True,
        )
        return self.mount_point

    def __exit__(self, *exc_info: object) -> None:
        subprocess.run(["umount", str(self.mount_point)], check=True)
        self.mount_point.rmdir()
