"""The driver's subcommands of ``lcow``, run in-process through click's test runner."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lcow.cli import CliContext, main
from oracle import e2fsck_clean


def make_tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


BASE_TAR = make_tar([("etc/", None), ("etc/hostname", b"base\n"), ("etc/motd", b"hello\n")])
CHILD_TAR = make_tar(
    [("etc/", None), ("etc/hostname", b"child\n"), ("etc/.wh.motd", b""), ("new", b"n")]
)


def run(root: Path, *arguments: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(main, ["--root", str(root), *arguments], input=stdin)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    assert run(root, "create", "base").exit_code == 0
    assert run(root, "apply-diff", "base", stdin=BASE_TAR).exit_code == 0
    assert run(root, "create", "child", "base").exit_code == 0
    assert run(root, "apply-diff", "child", "base", stdin=CHILD_TAR).exit_code == 0
    return root


def test_apply_diff_prints_size(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run(root, "create", "layer")

    result = run(root, "apply-diff", "layer", stdin=BASE_TAR)

    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(len(b"base\n") + len(b"hello\n"))
    e2fsck_clean(root / "layer" / "layer.vhd")


def test_changes_docker_letters(store: Path) -> None:
    result = run(store, "changes", "child", "base")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["C /etc", "C /etc/hostname", "D /etc/motd", "A /new"]


def test_changes_json(store: Path) -> None:
    result = run(store, "--json", "changes", "child", "base")

    assert json.loads(result.output) == [
        {"Path": "/etc", "Kind": 0},
        {"Path": "/etc/hostname", "Kind": 0},
        {"Path": "/etc/motd", "Kind": 2},
        {"Path": "/new", "Kind": 1},
    ]


def test_diff_size(store: Path) -> None:
    result = run(store, "diff-size", "child", "base")

    assert result.output.strip() == str(len(b"child\n") + len(b"n"))


def test_diff_writes_tar(store: Path, tmp_path: Path) -> None:
    output = tmp_path / "child.tar"

    result = run(store, "diff", "child", "base", "--output", str(output))

    assert result.exit_code == 0, result.output
    with tarfile.open(output) as archive:
        assert sorted(archive.getnames()) == ["etc", "etc/.wh.motd", "etc/hostname", "new"]


def test_exists_exit_status(store: Path) -> None:
    present = run(store, "exists", "base")
    missing = run(store, "exists", "nope")

    assert (present.exit_code, present.output.strip()) == (0, "true")
    assert (missing.exit_code, missing.output.strip()) == (1, "false")


def test_get_prints_folder(store: Path) -> None:
    result = run(store, "get", "base")

    assert result.output.strip() == str(store / "base")


def test_ls_lists_layers(store: Path) -> None:
    run(store, "create-rw", "sandbox", "child")

    result = run(store, "--json", "ls")

    assert json.loads(result.output) == [
        {"ID": "base", "Kind": "layer", "Parent": ""},
        {"ID": "child", "Kind": "layer", "Parent": "base"},
        {"ID": "sandbox", "Kind": "sandbox", "Parent": "child"},
    ]


def test_status_lists_settings(store: Path) -> None:
    result = run(store, "--storage-opt", "lcow.sandboxformat=raw", "--json", "status")
    status = dict(json.loads(result.output))

    assert status["Layers"] == "2"
    assert status["Sandbox format"] == "raw"
    assert status["Root"] == str(store)


def test_metadata_names_image(store: Path) -> None:
    result = run(store, "--json", "metadata", "base")

    assert json.loads(result.output)["LayerImage"] == str(store / "base" / "layer.vhd")


def test_remove_then_missing(store: Path) -> None:
    removed = run(store, "remove", "child")
    again = run(store, "remove", "child")

    assert removed.exit_code == 0
    assert again.exit_code == 0
    assert not (store / "child").exists()


def test_create_existing_fails(store: Path) -> None:
    result = run(store, "create", "base")

    assert result.exit_code == 1
    assert result.output.strip() == "Error: failed to create layer base: it exists"


def test_invalid_id_one_line(store: Path) -> None:
    result = run(store, "create", "../escape")

    assert result.exit_code == 1
    assert "invalid layer id '../escape'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (store.parent / "escape").exists()


def test_unknown_option_lists_valid(tmp_path: Path) -> None:
    result = run(tmp_path / "store", "--storage-opt", "lcow.bogus=1", "status")

    assert result.exit_code == 1
    assert "lcow.bogus" in result.output
    assert "lcow.globalmode" in result.output


def test_apply_diff_corrupt_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run(root, "create", "layer")

    result = run(root, "apply-diff", "layer", stdin=BASE_TAR[:700])

    assert result.exit_code == 1
    assert "failed to apply diff to layer layer" in result.output
    assert sorted(p.name for p in (root / "layer").iterdir()) == [".lock", "layerchain.json"]


@pytest.mark.parametrize(
    ("storage_opts", "spares", "prestart"),
    [
        ((), False, False),  # one operation: no spare would serve it
        ((), True, True),  # image import: one ApplyDiff per layer
        (("lcow.prestart=true",), False, True),  # the user's option wins
        (("lcow.prestart=false",), True, False),
    ],
)
def test_command_store_spares(
    tmp_path: Path, storage_opts: tuple[str, ...], spares: bool, prestart: bool
) -> None:
    context = CliContext(root=tmp_path / "root", storage_opts=storage_opts, json_output=False)
    driver = context.driver(spares=spares)
    try:
        assert driver.options.prestart is prestart
        assert driver.service_vms.prestart is prestart
    finally:
        driver.cleanup()
