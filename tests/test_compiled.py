"""The mypyc build: the tests run the compiled modules, and stale extensions are found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lcow import compiled
from oracle import skip_or_fail


def test_tests_run_compiled_modules() -> None:
    """The suite checks the code that an installed lcow runs, which is the compiled one."""
    if os.environ.get("LCOW_MYPYC") == "0":
        pytest.skip("lcow was built without mypyc (LCOW_MYPYC=0)")
    built = compiled.compiled_modules()
    if not built:
        skip_or_fail("lcow was built without mypyc; `pip install -e .` compiles it")
    assert built == list(compiled.COMPILED_MODULES)
    assert compiled.stale_modules() == []
    assert compiled.describe() == f"compiled by mypyc ({len(built)} modules)"


def built_module(folder: Path, stem: str, suffix: str, *, built_s: int, edited_s: int) -> Path:
    """Make an empty extension built at ``built_s`` and its source edited at ``edited_s``."""
    folder.mkdir(exist_ok=True)
    extension = folder / f"{stem}.cpython-311-x86_64-linux-gnu.so"
    extension.write_bytes(b"")
    source = folder / f"{stem}{suffix}"
    source.write_text("")
    os.utime(extension, (built_s, built_s))
    os.utime(source, (edited_s, edited_s))
    return extension


def test_stale_extension_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source edited after the build makes its extension stale; an older one does not."""
    folder = tmp_path / "ext4"
    extension = built_module(folder, "writer", ".py", built_s=1_000_000, edited_s=2_000_000)
    source = folder / "writer.py"

    def origin(name: str) -> Path:
        return extension if name == "lcow.ext4.writer" else Path(f"/{name}.py")

    monkeypatch.setattr(compiled, "_origin", origin)
    monkeypatch.setattr(compiled, "_find", lambda name: tmp_path / f"{name}.so")
    monkeypatch.setattr(compiled, "editable", lambda: True)
    assert compiled.compiled_modules() == ["lcow.ext4.writer"]
    assert compiled.stale_modules() == ["lcow.ext4.writer"]
    assert compiled.describe() == "partly compiled by mypyc: lcow.ext4.writer"

    os.utime(source, (500_000, 500_000))
    assert compiled.stale_modules() == []


def test_installed_package_is_never_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside an editable install, a newer source does not mean an edited one."""
    extension = tmp_path / "writer.cpython-311-x86_64-linux-gnu.so"
    extension.write_bytes(b"")
    source = tmp_path / "writer.py"
    source.write_text("")
    os.utime(extension, (1_000_000, 1_000_000))

    monkeypatch.setattr(compiled, "_origin", lambda name: extension)
    monkeypatch.setattr(compiled, "editable", lambda: False)
    assert compiled.stale_modules() == []


def test_build_without_mypyc_described(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build with LCOW_MYPYC=0 still has its C extensions, so it is not called pure Python."""
    monkeypatch.setattr(compiled, "_origin", lambda name: Path(f"/{name}.py"))
    assert compiled.compiled_modules() == []
    assert compiled.describe() == "interpreted, without mypyc (built with LCOW_MYPYC=0)"


def test_missing_or_stale_c_extension_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C extension that was never built, or whose .c source is newer, needs a build."""
    extension = built_module(tmp_path, "_libarchive", ".c", built_s=2_000_000, edited_s=1_000_000)
    source = tmp_path / "_libarchive.c"
    built = {"lcow.layer._libarchive": extension}

    monkeypatch.setattr(compiled, "_extensions", dict)  # no mypyc extension to compare
    monkeypatch.setattr(compiled, "_find", built.get)
    monkeypatch.setattr(compiled, "C_EXTENSIONS", ("lcow.layer._libarchive",))
    monkeypatch.setattr(compiled, "editable", lambda: True)
    assert compiled.stale_modules() == []

    os.utime(source, (3_000_000, 3_000_000))
    assert compiled.stale_modules() == ["lcow.layer._libarchive"]

    built.clear()
    assert compiled.stale_modules() == ["lcow.layer._libarchive"]
