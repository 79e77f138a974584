"""What a service VM worker and the ``lcow`` command load when they start.

Every safe-mode operation without a ready spare starts a worker, and every ``lcow`` command
starts an interpreter, so modules imported for nothing slow both down. These tests import
the modules in a fresh interpreter and check which modules came with them. They also check
lcow.crc, which loads the crc32c package's compiled module without the package's
``__init__``, and the loading of libarchive by its soname or $LIBARCHIVE.
"""

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import click
import crc32c as crc32c_package
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lcow import crc
from lcow.cli import SUBCOMMAND_MODULES, main
from lcow.layer import tarstream
from lcow.servicevm import vmbuild

# Modules that only slow the start down. importlib.metadata (12 to 22 ms with the email
# package it imports) comes with the crc32c package's __init__ and with tqdm, and
# http.server comes with the plugin.
NOT_AT_START = ("importlib.metadata", "crc32c", "tqdm", "http.server", "libarchive")


def _loaded_modules(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the names in its sys.modules."""
    program = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    names: list[str] = json.loads(result.stdout)
    return set(names)


@pytest.mark.parametrize("module", ["lcow.servicevm.worker", "lcow.cli", "lcow.driver", "lcow.crc"])
def test_import_leaves_out_slow_modules(module: str) -> None:
    loaded = _loaded_modules(f"import {module}")

    assert module in loaded
    assert sorted(name for name in NOT_AT_START if name in loaded) == []


def test_cli_import_leaves_out_driver() -> None:
    loaded = _loaded_modules("import lcow.cli")

    assert "lcow.driver" not in loaded
    assert "lcow.servicevm.manager" not in loaded
    assert "lcow.vhdx" not in loaded


def test_subcommand_modules_match_commands() -> None:
    context = click.Context(main)

    listed = main.list_commands(context)

    assert set(listed) == {"tar2vhd", "vhd2tar", *SUBCOMMAND_MODULES}
    for name, module in SUBCOMMAND_MODULES.items():
        command = main.get_command(context, name)
        assert command is not None
        assert command.callback is not None
        assert command.callback.__module__ == module


def test_hidden_progress_bar_does_not_import_tqdm() -> None:
    loaded = _loaded_modules(
        "from lcow.progress import byte_bar\n"
        "with byte_bar('layer.tar', 10, enabled=False) as bar:\n"
        "    bar.update(10)\n"
        "    bar.set_postfix_str('done')\n"
    )

    assert "tqdm" not in loaded


def test_progress_bar_draws_on_stderr() -> None:
    program = (
        "from lcow.progress import byte_bar\n"
        "bar = byte_bar('layer.tar', 2048, enabled=True)\n"
        "bar.update(2048)\n"
        "bar.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout == ""
    assert "layer.tar" in result.stderr
    assert "2.00k" in result.stderr


def test_crc32c_check_value() -> None:
    # The check value of CRC-32C (iSCSI) in the catalogue of parametrised CRC algorithms.
    assert crc.crc32c(b"123456789", 0) == 0xE3069283


def _bitwise_crc32c(data: bytes, value: int) -> int:
    """Compute CRC-32C bit by bit: the reflected polynomial 0x82F63B78, inverted."""
    register = ~value & 0xFFFFFFFF
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ (0x82F63B78 if register & 1 else 0)
    return ~register & 0xFFFFFFFF


@given(st.binary(max_size=512), st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_crc32c_matches_bitwise_crc(data: bytes, value: int) -> None:
    expected = _bitwise_crc32c(data, value)

    assert crc.crc32c(data, value) == expected
    assert crc.crc32c(bytearray(data), value) == expected
    assert crc.crc32c(memoryview(data), value) == expected


def test_crc32c_reuses_an_imported_package() -> None:
    assert crc._load() is crc32c_package.crc32c


def test_crc32c_falls_back_to_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the package imported, _load looks for the compiled module by name.
    monkeypatch.delitem(sys.modules, "crc32c")

    checksum = crc._load("crc32c._moved_crc32c")

    assert checksum(b"123456789", 0) == 0xE3069283
    assert "crc32c" in sys.modules


def test_crc32c_loads_compiled_module_alone() -> None:
    loaded = _loaded_modules(
        "import lcow.crc\nassert lcow.crc.crc32c(b'123456789', 0) == 0xE3069283"
    )

    assert "crc32c" not in loaded
    assert "crc32c._crc32c" not in loaded


def _libarchive_load(library: str) -> subprocess.CompletedProcess[str]:
    """Import tarstream with $LIBARCHIVE set to ``library``; print the library it opened."""
    return subprocess.run(
        [sys.executable, "-c", "import lcow.layer.tarstream as t; print(t._lib._name)"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "LIBARCHIVE": library},
    )


def test_libarchive_from_environment_is_opened() -> None:
    assert tarstream.LIBARCHIVE_SONAME == "libarchive.so.13"
    # The service VM's initrd names the library by its full path, as this process maps it.
    real = next(
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libarchive.so" in line
    )

    result = _libarchive_load(real)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == real


def test_libarchive_missing_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "libarchive-missing.so"

    result = _libarchive_load(str(missing))

    assert result.returncode != 0
    assert f"failed to load libarchive ({missing})" in result.stderr
    assert "Fix or unset LIBARCHIVE" in result.stderr


def test_libarchive_without_its_functions() -> None:
    libc = ctypes.util.find_library("c") or "libc.so.6"

    result = _libarchive_load(libc)

    assert result.returncode != 0
    assert f"failed to load libarchive ({libc})" in result.stderr
    assert "archive_read_new" in result.stderr


def test_service_vm_build_finds_every_guest_package() -> None:
    tree = vmbuild.InitrdTree()

    vmbuild._add_python_runtime(tree, sys.executable)

    site = PurePosixPath(vmbuild.GUEST_SITE)
    copied = {
        path.parts[len(site.parts)]
        for path in tree.members
        if path.is_relative_to(site) and path != site
    }
    for package in vmbuild.GUEST_PACKAGES:
        if package != "lcow":  # added from its own archive
            assert package in copied
    assert any(path.name.startswith("_crc32c.") for path in tree.members)
