"""Conversion and export run with the cyclic garbage collector paused, and leave no cycles
per chunk or per file."""

from __future__ import annotations

import gc
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lcow import gcpause
from lcow.layer.export import export_tar, open_image
from lcow.layer.tar2ext4 import convert_tar
from lcow.layer.tarstream import READ_AHEAD_CHUNK_BYTES

FILES = 40
FILE_BYTES = 1 << 20
CHUNKS = FILES * FILE_BYTES // READ_AHEAD_CHUNK_BYTES


@pytest.fixture
def collector_enabled() -> Iterator[None]:
    """Start each test with the collector on, and leave it on whatever the test does."""
    gc.enable()
    try:
        yield
    finally:
        gc.enable()


def write_layer(path: Path, files: int) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for index in range(files):
            info = tarfile.TarInfo(f"data/file-{index:02d}")
            info.size = FILE_BYTES
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(bytes([index]) * FILE_BYTES))
    return path


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return write_layer(tmp_path / "layer.tar", FILES)


def cyclic_objects_left(action: Callable[[], object]) -> int:
    """Run ``action`` with the collector off and return how many objects it left in cycles."""
    gc.collect()
    gc.disable()
    try:
        action()
        return gc.collect()
    finally:
        gc.enable()


def export(image: Path, output: io.BytesIO) -> int:
    """Export ``image`` into ``output`` and return the number of entries."""
    reader, fd = open_image(image)
    try:
        return export_tar(reader, output).entries
    finally:
        os.close(fd)


@pytest.mark.usefixtures("collector_enabled")
def test_paused_restores_an_enabled_collector() -> None:
    with gcpause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_enabled")
def test_paused_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    with gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


@pytest.mark.usefixtures("collector_enabled")
def test_paused_restores_collector_after_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), gcpause.paused():
        raise RuntimeError("inside")
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_enabled")
def test_conversion_pauses_the_collector(layer: Path, tmp_path: Path) -> None:
    states: list[bool] = []
    convert_tar(layer, tmp_path / "layer.vhd", on_read=lambda _count: states.append(gc.isenabled()))
    assert len(states) >= CHUNKS
    assert not any(states)
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_enabled")
def test_conversion_leaves_no_cycles_per_chunk(layer: Path, tmp_path: Path) -> None:
    # A conversion leaves a few cycles whatever its size: its read-ahead thread and buffers.
    # One cycle per read chunk would show as a difference of at least CHUNKS objects.
    small = write_layer(tmp_path / "small.tar", 1)
    left_small = cyclic_objects_left(lambda: convert_tar(small, tmp_path / "small.vhd"))
    left_large = cyclic_objects_left(lambda: convert_tar(layer, tmp_path / "layer.vhd"))
    assert left_large - left_small < CHUNKS // 4


class _RecordingOutput(io.BytesIO):
    """An in-memory tar output that records whether the collector ran at each write."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[bool] = []

    def write(self, data: object) -> int:
        self.states.append(gc.isenabled())
        return super().write(data)  # type: ignore[arg-type]


@pytest.mark.usefixtures("collector_enabled")
def test_export_pauses_the_collector(layer: Path, tmp_path: Path) -> None:
    image = tmp_path / "layer.vhd"
    convert_tar(layer, image)
    output = _RecordingOutput()
    assert export(image, output) == FILES + 1  # the files and their folder
    assert output.states
    assert not any(output.states)
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_enabled")
def test_export_leaves_no_cycles_per_file(layer: Path, tmp_path: Path) -> None:
    image = tmp_path / "layer.vhd"
    convert_tar(layer, image)
    assert cyclic_objects_left(lambda: export(image, io.BytesIO())) < FILES // 2
