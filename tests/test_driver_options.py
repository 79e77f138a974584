"""Driver options and the ApplyDiff retry, which the other driver suites do not reach."""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import pytest

from lcow.driver import Driver
from lcow.errors import InvalidArgumentError, ServiceVMError
from lcow.options import DriverOptions
from lcow.servicevm.base import ServiceVM


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("lcow.globalmode=maybe", "use true or false"),
        ("lcow.sandboxsize=0.5", "1 to 16384 GB"),
        ("lcow.sandboxsize=big", "give GB as a number"),
        ("lcow.sandboxformat=qcow2", "vhdx or raw"),
        ("lcow.timeout=-1", "must be positive"),
        ("lcow.timeout=soon", "give seconds"),
        ("lcow.backend=docker", "lcow.backend"),
        ("lcow.hostmount=sometimes", "use true or false"),
        ("lcowglobalmode", "use key=value"),
    ],
)
def test_invalid_option_values(option: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        DriverOptions.parse([option])


def test_option_defaults() -> None:
    options = DriverOptions.parse([])

    assert options.global_mode is False
    assert options.sandbox_size_bytes == 20 << 30
    assert options.sandbox_format == "vhdx"
    assert options.backend == "process"
    assert options.timeout_s == 300.0


def test_other_drivers_options_ignored() -> None:
    assert DriverOptions.parse(["overlay2.size=10G"]) == DriverOptions()


def small_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        archive.addfile(info, io.BytesIO(b"hello\n"))
    return buffer.getvalue()


class _Unseekable(io.RawIOBase):
    """A stream that cannot seek back, as an HTTP request body."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._data.readinto(buffer)


def break_first_service_vm(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the first service VM die right after it starts; return the names handed out."""
    original = driver.service_vms.acquire
    names: list[str] = []

    @contextlib.contextmanager
    def acquire(operation_id: str) -> Iterator[ServiceVM]:
        with original(operation_id) as service_vm:
            names.append(service_vm.name)
            if len(names) == 1:
                service_vm.terminate(stop_timeout_s=0)
            yield service_vm

    monkeypatch.setattr(driver.service_vms, "acquire", acquire)
    return names


def test_apply_diff_retries_before_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service VM that fails before it read anything is replaced once, with the same stream."""
    driver = Driver(tmp_path / "store")
    driver.create("layer")
    names = break_first_service_vm(driver, monkeypatch)

    size = driver.apply_diff("layer", None, io.BufferedReader(_Unseekable(small_tar())))

    assert size == 6
    assert len(names) == 2
    assert (tmp_path / "store" / "layer" / "layer.vhd").exists()
    driver.cleanup()


class _KillsAfterFirstChunk(io.RawIOBase):
    """Give 512 bytes, then stop the service VM, as a crash in the middle of a stream does."""

    def __init__(self, data: bytes, service_vms: list[ServiceVM]) -> None:
        self._data = io.BytesIO(data)
        self._service_vms = service_vms
        self._reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._reads += 1
        if self._reads == 2:
            self._service_vms[0].terminate(stop_timeout_s=0)
        return self._data.readinto(memoryview(buffer)[:512])


def test_apply_diff_no_retry_after_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service VM that fails after it read part of an unseekable stream is not retried."""
    driver = Driver(tmp_path / "store")
    driver.create("layer")
    original = driver.service_vms.acquire
    handed_out: list[ServiceVM] = []

    @contextlib.contextmanager
    def acquire(operation_id: str) -> Iterator[ServiceVM]:
        with original(operation_id) as service_vm:
            handed_out.append(service_vm)
            yield service_vm

    monkeypatch.setattr(driver.service_vms, "acquire", acquire)

    # Unbuffered on purpose: each read of the driver gets one 512-byte chunk.
    stream = cast(IO[bytes], _KillsAfterFirstChunk(small_tar(), handed_out))
    with pytest.raises(ServiceVMError):
        driver.apply_diff("layer", None, stream)

    assert len(handed_out) == 1
    assert not (tmp_path / "store" / "layer" / "layer.vhd").exists()
    driver.cleanup()
