"""The output folder: a tmpfs that the run mounts and unmounts, /dev/shm, or a given folder.

Outputs go to memory by default, so that the disk under /var does not set the pace of
either side. Only the folder the run creates is removed at the end.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

TMPFS_SIZE: Final = "16g"  # the shell route on a 3.7 GB tar needs its tree and its image at once


@contextlib.contextmanager
def output_folder(requested: Path | None) -> Iterator[Path]:
    """Yield an empty folder for outputs and remove it, or unmount it, afterwards."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="lcow-bench-", dir=requested))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return

    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp(prefix="lcow-bench-", dir="/dev/shm"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return

    mount_point = Path(tempfile.mkdtemp(prefix="lcow-bench-"))
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={TMPFS_SIZE},mode=0700",
            "lcow-bench",
            str(mount_point),
        ],
        check=True,
    )
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], check=False)
        if unmounted.returncode == 0:
            mount_point.rmdir()
        else:
            print(f"bench: failed to unmount {mount_point}; unmount it by hand", file=sys.stderr)
