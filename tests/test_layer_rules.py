"""Converter rules and image properties checked with e2fsprogs and the kernel."""

from __future__ import annotations

import decimal
import gzip
import io
import os
import re
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from lcow.errors import CorruptInputError, LcowError
from lcow.layer import tarstream
from oracle import loop_mount, run_tool
from tarbuild import device, fifo, hard_link, regular, symlink, tar_bytes
from test_layer_edge_cases import convert_layer, convert_rejected

NS = 1_000_000_000


def test_image_profile_features(tmp_path: Path) -> None:
    image = convert_layer(tar_bytes([regular("f", b"x")]), tmp_path)

    header = run_tool(["dumpe2fs", "-h", str(image)]).stdout
    features = set(re.search(r"Filesystem features:\s+(.*)", header).group(1).split())  # type: ignore[union-attr]

    assert features == {
        "ext_attr",
        "filetype",
        "extent",
        "flex_bg",
        "sparse_super",
        "large_file",
        "huge_file",
        "dir_nlink",
        "extra_isize",
        "metadata_csum",
    }
    assert "Block size:               4096" in header
    assert "Inode size:\t          256" in header
    assert "Journal" not in header


def test_zstd_equals_plain(tmp_path: Path) -> None:
    archive = tar_bytes([regular("etc/hostname", b"lcow\n"), regular("bin/true", b"\x7fELF")])
    plain = convert_layer(archive, tmp_path / "plain")
    (tmp_path / "z").mkdir()
    compressed = tmp_path / "z" / "layer.tar.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(archive))

    from lcow.layer.tar2ext4 import convert_tar

    stats = convert_tar(compressed, tmp_path / "z" / "layer.vhd")

    assert stats.compression == "zstd"
    assert (tmp_path / "z" / "layer.vhd").read_bytes() == plain.read_bytes()


@pytest.mark.root
def test_times_kept(tmp_path: Path) -> None:
    headers = {
        "mtime": "1700000000.123456789",
        "atime": "1600000000.5",
        "ctime": "1650000000.25",
        "LIBARCHIVE.creationtime": "1500000000.75",
    }
    image = convert_layer(tar_bytes([regular("f", b"x", pax_headers=headers)]), tmp_path)

    with loop_mount(image) as root:
        status = os.lstat(root / "f")
    crtime = run_tool(["debugfs", "-R", "stat /f", str(image)]).stdout

    assert status.st_mtime_ns == 1_700_000_000 * NS + 123_456_789
    assert status.st_atime_ns == 1_600_000_000 * NS + 500_000_000
    assert status.st_ctime_ns == 1_650_000_000 * NS + 250_000_000
    # debugfs prints the seconds field and the extra field (nanoseconds << 2) in hex.
    assert f"crtime: {1_500_000_000:#010x}:{750_000_000 << 2:08x}" in crtime


@pytest.mark.root
def test_times_default_to_mtime(tmp_path: Path) -> None:
    image = convert_layer(tar_bytes([regular("f", b"x", mtime=1_700_000_000)]), tmp_path)

    with loop_mount(image) as root:
        status = os.lstat(root / "f")

    assert status.st_atime_ns == 1_700_000_000 * NS
    assert status.st_ctime_ns == 1_700_000_000 * NS


def test_gzip_wrong_length_rejected(tmp_path: Path) -> None:
    compressed = bytearray(gzip.compress(tar_bytes([regular("f", b"payload")])))
    compressed[-1] ^= 0x01  # ISIZE, the uncompressed length modulo 2**32

    error = convert_rejected(bytes(compressed), tmp_path, CorruptInputError)

    assert "gzip" in str(error)


@pytest.mark.root
def test_whiteout_after_same_layer_file(tmp_path: Path) -> None:
    archive = tar_bytes([regular("keep.txt", b"mine\n"), regular(".wh.keep.txt")])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as root:
        assert (root / "keep.txt").read_bytes() == b"mine\n"
        assert sorted(path.name for path in root.iterdir()) == ["keep.txt", "lost+found"]


@pytest.mark.root
def test_file_after_same_layer_whiteout(tmp_path: Path) -> None:
    archive = tar_bytes([regular(".wh.keep.txt"), regular("keep.txt", b"new\n")])

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as root:
        assert (root / "keep.txt").read_bytes() == b"new\n"


@pytest.mark.root
def test_interior_components_normalised(tmp_path: Path) -> None:
    archive = tar_bytes(
        [
            regular("a/./b.txt", b"1"),
            regular("a//c.txt", b"2"),
            regular("a/x/../d.txt", b"3"),
        ]
    )

    image = convert_layer(archive, tmp_path)

    with loop_mount(image) as root:
        # ".." removes the component before it, so "a/x" is never created.
        assert sorted(path.name for path in (root / "a").iterdir()) == ["b.txt", "c.txt", "d.txt"]
        assert (root / "a" / "d.txt").read_bytes() == b"3"


@pytest.mark.root
def test_whiteout_of_longest_name(tmp_path: Path) -> None:
    """A whiteout of a 255-byte name is 259 bytes long and still fits: ext4 stores the name."""
    name = "n" * 255
    image = convert_layer(tar_bytes([regular(".wh." + name)]), tmp_path)

    with loop_mount(image) as root:
        status = os.lstat(root / name)
        assert stat.S_ISCHR(status.st_mode)
        assert status.st_rdev == 0


def test_whiteout_of_too_long_name_rejected(tmp_path: Path) -> None:
    error = convert_rejected(tar_bytes([regular(".wh." + "n" * 256)]), tmp_path, LcowError)

    assert "260 bytes" in str(error)


def _pax_time_ns(value: str) -> int:
    """Return the ns of a PAX time such as "-1.5", exactly, the sign applying to all of it."""
    return int(decimal.Decimal(value) * NS)


def test_entry_fields_match_tarfile() -> None:
    """TarReader decodes each header field as Python's tarfile reads it from the same bytes."""
    # Every time has a fraction of its own, so no two fields can be swapped unnoticed.
    times = {"atime": "1700000001.25", "ctime": "-1.5", "LIBARCHIVE.creationtime": "86400.75"}
    xattrs = {
        "SCHILY.xattr.user.note": "kept",
        "SCHILY.xattr.user.binary": "a\x00b",
        "SCHILY.xattr.user.empty": "",
    }
    members = [
        regular("file", b"data" * 1000, mode=0o4755, uid=1000, gid=2**31, pax_headers=times),
        regular("dated", b"x", pax_headers={"mtime": "-100000.125", **xattrs}),
        regular("changed", b"ctime only", pax_headers={"ctime": "1600000000.375"}),
        regular("created", b"", pax_headers={"LIBARCHIVE.creationtime": "1500000000.625"}),
        device("char", tarfile.CHRTYPE, 1, 3, mode=0o666),
        device("block", tarfile.BLKTYPE, 4095, 1048575, mode=0o600),
        fifo("pipe", mode=0o640),
        symlink("link", "file"),
        hard_link("again", "file"),
    ]
    archive = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(archive)) as expected_archive:
        expected = expected_archive.getmembers()

    ahead = tarstream.ReadAhead(tarstream.LayerStream(io.BytesIO(archive)))
    try:
        with tarstream.TarReader(ahead) as reader:
            decoded = []
            contents = []
            for entry in reader:
                decoded.append(entry)
                contents.append(b"".join(bytes(block) for _offset, block in reader.data_blocks()))
    finally:
        ahead.close()

    assert [entry.path for entry in decoded] == [info.name.encode() for info in expected]
    with tarfile.open(fileobj=io.BytesIO(archive)) as expected_archive:
        for data, info in zip(contents, expected, strict=True):
            extracted = expected_archive.extractfile(info) if info.isreg() else None
            assert data == (b"" if extracted is None else extracted.read())

    for entry, info in zip(decoded, expected, strict=True):
        pax = info.pax_headers
        assert entry.header_offset == info.offset
        assert entry.permissions == info.mode
        assert entry.uid == info.uid
        assert entry.gid == info.gid
        assert entry.mtime_ns == _pax_time_ns(pax.get("mtime", str(info.mtime)))
        assert entry.atime_ns == (_pax_time_ns(pax["atime"]) if "atime" in pax else None)
        assert entry.ctime_ns == (_pax_time_ns(pax["ctime"]) if "ctime" in pax else None)
        birthtime = pax.get("LIBARCHIVE.creationtime")
        assert entry.birthtime_ns == (None if birthtime is None else _pax_time_ns(birthtime))
        # libarchive lists an entry's xattrs in the reverse order of its PAX records.
        assert sorted(entry.xattrs) == sorted(
            (name.removeprefix("SCHILY.xattr.").encode(), value.encode())
            for name, value in pax.items()
            if name.startswith("SCHILY.xattr.")
        )
        if info.islnk():
            assert entry.file_type == 0
            assert entry.hardlink == info.linkname.encode()
            continue
        assert entry.hardlink is None
        assert entry.file_type == _FILE_TYPES[info.type]
        assert entry.size == info.size
        assert entry.symlink == (info.linkname.encode() if info.issym() else None)
        if info.ischr() or info.isblk():
            assert entry.rdev_major == info.devmajor
            assert entry.rdev_minor == info.devminor


_FILE_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
    tarfile.SYMTYPE: stat.S_IFLNK,
}


def test_damaged_header_error_names_its_byte(tmp_path: Path) -> None:
    """A header with a wrong checksum is named by the byte where it starts in the tar."""
    first = regular("first", b"x" * 3000)
    archive = bytearray(
        tar_bytes([first, regular("second", b"y")], tar_format=tarfile.USTAR_FORMAT)
    )
    second_header = 512 + 3072  # the first header, then its data padded to 512-byte blocks
    assert archive[second_header : second_header + 6] == b"second"
    archive[second_header + 148 : second_header + 156] = b"0000000\0"  # chksum

    error = convert_rejected(bytes(archive), tmp_path, CorruptInputError)

    assert f"read the tar header at byte {second_header}" in str(error)
