"""Hostile structure in an image ends in a typed error: loops in directories and extents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lcow.errors import CorruptInputError
from lcow.ext4.reader import Ext4Reader, FileDevice
from oracle import run_tool


def make_image(path: Path) -> None:
    """Format a small ext4 with a directory tree and a file of several blocks."""
    with path.open("wb") as file:
        file.truncate(32 << 20)
    run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", str(path)])
    content = path.with_name("content.bin")
    content.write_bytes(bytes(range(256)) * 80)  # five blocks
    for command in ("mkdir /a", "mkdir /a/b", f"write {content} /a/b/services"):
        run_tool(["debugfs", "-w", "-R", command, str(path)])


def walk_all(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = Ext4Reader(FileDevice(fd), os.fstat(fd).st_size)
        for _, inode in reader.walk():
            if inode.file_type == 0o100000:
                for _ in reader.read_data(inode.number):
                    pass
    finally:
        os.close(fd)


def test_walk_of_good_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image)

    walk_all(image)


def test_directory_loop_rejected(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image)
    # A second name for directory /a inside its own child: a cycle no kernel would create.
    run_tool(["debugfs", "-w", "-R", "ln /a /a/b/back", str(image)])

    with pytest.raises(CorruptInputError, match="reachable twice"):
        walk_all(image)


def test_extent_pointing_outside_rejected(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image)
    # Point the file's extent far beyond the end of the filesystem.
    run_tool(["debugfs", "-w", "-R", "sif /a/b/services block[5] 0x7fffffff", str(image)])

    with pytest.raises(CorruptInputError):
        walk_all(image)
