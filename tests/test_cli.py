"""The ``lcow tar2vhd`` command, run in-process through click's test runner."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lcow import vhd
from lcow.cli import main
from oracle import e2fsck_clean, ext4_size_bytes

FOOTER_BYTES = 512


def make_tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def small_tar(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar"
    path.write_bytes(make_tar([("etc/hostname", b"lcow\n"), ("bin/true", b"\x7fELF")]))
    return path


def test_tar2vhd_writes_layer(small_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "layer.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", str(small_tar), str(output)])

    assert result.exit_code == 0, result.output
    footer = vhd.parse_footer(output.read_bytes()[-FOOTER_BYTES:])
    assert footer.current_size == output.stat().st_size - FOOTER_BYTES
    e2fsck_clean(output)


def test_tar2vhd_raw_has_no_footer(small_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "layer.img"

    result = CliRunner().invoke(main, ["tar2vhd", "--raw", str(small_tar), str(output)])

    assert result.exit_code == 0, result.output
    assert output.stat().st_size == ext4_size_bytes(output)


def test_tar2vhd_reads_stdin(small_tar: Path, tmp_path: Path) -> None:
    from_file = tmp_path / "from-file.vhd"
    from_stdin = tmp_path / "from-stdin.vhd"

    first = CliRunner().invoke(main, ["tar2vhd", str(small_tar), str(from_file)])
    second = CliRunner().invoke(
        main, ["tar2vhd", "-", str(from_stdin)], input=small_tar.read_bytes()
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert from_stdin.read_bytes() == from_file.read_bytes()


def test_tar2vhd_gzip_equals_plain(small_tar: Path, tmp_path: Path) -> None:
    compressed = tmp_path / "layer.tar.gz"
    compressed.write_bytes(gzip.compress(small_tar.read_bytes()))
    plain_image = tmp_path / "plain.vhd"
    gzip_image = tmp_path / "gzip.vhd"

    CliRunner().invoke(main, ["tar2vhd", str(small_tar), str(plain_image)])
    result = CliRunner().invoke(main, ["tar2vhd", str(compressed), str(gzip_image)])

    assert result.exit_code == 0, result.output
    assert gzip_image.read_bytes() == plain_image.read_bytes()


def test_tar2vhd_truncated_names_entry(small_tar: Path, tmp_path: Path) -> None:
    data = make_tar([("big.bin", b"x" * 100_000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:50_000])
    output = tmp_path / "out.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", str(cut), str(output)])

    assert result.exit_code == 1
    assert "big.bin" in result.output
    assert "Truncated" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar", "layer.tar"]


def test_tar2vhd_not_tar(tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("this is not a tar archive\n" * 100)
    output = tmp_path / "out.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", str(source), str(output)])

    assert result.exit_code == 1
    assert "Unrecognized archive format" in result.output
    assert not output.exists()


def test_tar2vhd_missing_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tar2vhd", str(tmp_path / "nope.tar"), "out.vhd"])

    assert result.exit_code == 1
    assert "nope.tar" in result.output
    assert "No such file" in result.output


def test_tar2vhd_progress_on_request(small_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "layer.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", "--progress", str(small_tar), str(output)])

    assert result.exit_code == 0, result.output
    assert "layer.tar" in result.stderr
    assert "100%" in result.stderr


def test_tar2vhd_quiet_without_terminal(small_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "layer.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", str(small_tar), str(output)])

    assert result.exit_code == 0
    assert result.output == ""


def test_tar2vhd_size_limit(tmp_path: Path) -> None:
    source = tmp_path / "big.tar"
    source.write_bytes(make_tar([("big.bin", b"\1" * (40 << 20))]))
    output = tmp_path / "out.vhd"

    result = CliRunner().invoke(main, ["tar2vhd", "--max-size", "32M", str(source), str(output)])

    assert result.exit_code == 1
    assert "maximum image size" in result.output
    assert str(32 << 20) in result.output
    assert not output.exists()
