"""Export layer images as tar layers (Docker's Diff) and check the tars with GNU tar.

A layer built from a table of tar members goes through ``lcow vhd2tar``. GNU tar lists and
extracts the export, and the extraction must equal the kernel's view of the image after the
whiteout rules. Round trips (tar to image to tar, twice) must reach a fixed point on every
corpus layer and on random trees, and an empty layer must stay empty all the way.
"""

from __future__ import annotations

import dataclasses
import decimal
import gzip
import hashlib
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import tarbuild
import treegen
from conftest import CORPUS_LAYER_NAMES
from lcow.cli import main
from lcow.layer import _ustar
from lcow.layer.changes import LayerTree, MergedView, diff_size, layer_changes
from lcow.layer.export import export_tar
from lcow.layer.tar2ext4 import convert_tar
from oracle import (
    compare_trees,
    expected_from_tar_extraction,
    extract_with_gnu_tar,
    format_differences,
    loop_mount,
    snapshot_tree,
    split_lost_found,
)
from readback import gnu_tar_names, open_reader

GIB: Final = 1 << 30
MIB: Final = 1 << 20

# --- one layer with every kind of entry ------------------------------------------------------

LONG_DIRECTORY: Final = "long-" + "d" * 120
LONG_FILE: Final = f"{LONG_DIRECTORY}/" + "f" * 150  # a 276-byte path
LONG_SYMLINK_TARGET: Final = "../" * 10 + "t" * 120  # 150 bytes
NS_MTIME: Final = "1700000000.123456789"
CAPABILITY: Final = treegen.capability_value(effective=True, permitted=1 << 10, inheritable=0)

LAYER_MEMBERS: Final = (
    tarbuild.directory("d", mode=0o750, uid=1000, gid=1000),
    tarbuild.regular("d/kept", b"kept\n"),
    tarbuild.regular("d/.wh.removed", mode=0o600),
    tarbuild.regular(".wh.gone"),
    tarbuild.directory("opq"),
    tarbuild.regular("opq/.wh..wh..opq"),
    tarbuild.regular("opq/inner.txt", b"inner\n"),
    tarbuild.directory("links"),
    tarbuild.regular("links/z", b"shared content\n", mode=0o640, uid=1000, gid=1000),
    tarbuild.hard_link("links/a", "links/z"),
    tarbuild.directory("links/m"),
    tarbuild.hard_link("links/m/deep", "links/z"),
    tarbuild.directory(LONG_DIRECTORY),
    tarbuild.regular(LONG_FILE, b"long\n"),
    tarbuild.hard_link("zz-long-link", LONG_FILE),
    tarbuild.symlink("long-symlink", LONG_SYMLINK_TARGET),
    tarbuild.regular(
        "xattrs.bin",
        b"x",
        pax_headers={
            "SCHILY.xattr.user.comment": "hello",
            "SCHILY.xattr.security.capability": treegen.pax_string(CAPABILITY),
            "mtime": NS_MTIME,
        },
    ),
    tarbuild.directory("dev"),
    tarbuild.device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
    tarbuild.device("dev/nvme", tarfile.BLKTYPE, 259, 65536, mode=0o660),
    tarbuild.fifo("dev/pipe", mode=0o640),
    tarbuild.regular("setuid", b"#!/bin/sh\n", mode=0o4755),
)

# What the export contains: no root and no empty lost+found, whiteouts as .wh. names, an
# opaque marker after its directory.
EXPECTED_MEMBER_NAMES: Final = sorted(
    [
        ".wh.gone",
        "d",
        "d/.wh.removed",
        "d/kept",
        "dev",
        "dev/null",
        "dev/nvme",
        "dev/pipe",
        "links",
        "links/a",
        "links/m",
        "links/m/deep",
        "links/z",
        LONG_DIRECTORY,
        LONG_FILE,
        "long-symlink",
        "opq",
        "opq/.wh..wh..opq",
        "opq/inner.txt",
        "setuid",
        "xattrs.bin",
        "zz-long-link",
    ]
)


@dataclasses.dataclass(frozen=True)
class Exported:
    image: Path
    tar_path: Path
    members: dict[str, tarfile.TarInfo]
    order: list[str]


def read_members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(
        fileobj=io.BytesIO(tar_bytes), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as archive:
        return archive.getmembers()


def vhd2tar(image: Path, output: Path, *options: str) -> None:
    result = CliRunner().invoke(main, ["vhd2tar", *options, str(image), str(output)])
    assert result.exit_code == 0, result.output


def export_layer(folder: Path, layer_members: Sequence[tarbuild.Member]) -> Exported:
    """Convert a tar of ``layer_members`` and export the image with ``lcow vhd2tar``."""
    layer_tar = folder / "layer.tar"
    layer_tar.write_bytes(tarbuild.tar_bytes(layer_members))
    image = folder / "layer.vhd"
    convert_tar(layer_tar, image)
    tar_path = folder / "export.tar"

    vhd2tar(image, tar_path)

    members = read_members(tar_path.read_bytes())
    names = [os.fsdecode(oracle.normalize_member_name(m.name)) for m in members]
    return Exported(
        image=image,
        tar_path=tar_path,
        members=dict(zip(names, members, strict=True)),
        order=names,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_layer(tmp_path_factory.mktemp("export"), LAYER_MEMBERS)


def test_export_gnu_tar_lists(exported: Exported) -> None:
    assert gnu_tar_names(exported.tar_path) == EXPECTED_MEMBER_NAMES


def test_export_whiteouts(exported: Exported) -> None:
    gone_whiteout = exported.members[".wh.gone"]
    removed = exported.members["d/.wh.removed"]

    assert gone_whiteout.type == tarfile.REGTYPE
    assert gone_whiteout.size == 0
    assert removed.type == tarfile.REGTYPE
    assert removed.mode == 0o600


def test_export_opaque_marker(exported: Exported) -> None:
    marker = exported.members["opq/.wh..wh..opq"]

    assert marker.type == tarfile.REGTYPE
    assert exported.order.index("opq/.wh..wh..opq") > exported.order.index("opq")
    assert exported.order.index("opq/.wh..wh..opq") < exported.order.index("opq/inner.txt")


def test_export_hard_links(exported: Exported) -> None:
    first = exported.members["links/a"]
    deep = exported.members["links/m/deep"]
    last = exported.members["links/z"]

    assert first.type == tarfile.REGTYPE
    assert first.size == len(b"shared content\n")
    assert deep.type == tarfile.LNKTYPE
    assert deep.linkname == "links/a"
    assert last.type == tarfile.LNKTYPE
    assert last.linkname == "links/a"


def test_export_long_names(exported: Exported) -> None:
    long_file = exported.members[LONG_FILE]
    link_to_long = exported.members["zz-long-link"]
    symlink = exported.members["long-symlink"]

    assert long_file.type == tarfile.REGTYPE
    assert link_to_long.type == tarfile.LNKTYPE
    assert link_to_long.linkname == LONG_FILE
    assert symlink.type == tarfile.SYMTYPE
    assert symlink.linkname == LONG_SYMLINK_TARGET


def test_export_xattrs(exported: Exported) -> None:
    headers = exported.members["xattrs.bin"].pax_headers
    capability = headers["SCHILY.xattr.security.capability"]

    assert headers["SCHILY.xattr.user.comment"] == "hello"
    assert capability.encode("utf-8", "surrogateescape") == CAPABILITY
    assert not any(name.startswith("SCHILY.xattr.trusted.overlay.") for name in headers)


def test_export_mtime_ns(exported: Exported) -> None:
    assert exported.members["xattrs.bin"].pax_headers["mtime"] == NS_MTIME


def test_export_special_files(exported: Exported) -> None:
    null = exported.members["dev/null"]
    nvme = exported.members["dev/nvme"]
    pipe = exported.members["dev/pipe"]

    assert (null.type, null.devmajor, null.devminor, null.mode) == (tarfile.CHRTYPE, 1, 3, 0o666)
    assert (nvme.type, nvme.devmajor, nvme.devminor, nvme.mode) == (
        tarfile.BLKTYPE,
        259,
        65536,
        0o660,
    )
    assert (pipe.type, pipe.mode) == (tarfile.FIFOTYPE, 0o640)
    assert exported.members["setuid"].mode == 0o4755


def assert_extraction_equals_image(exported: Exported, folder: Path) -> None:
    """Check that GNU tar's extraction, whiteouts converted, equals the mounted image."""
    extract_with_gnu_tar(exported.tar_path, folder / "extracted")
    extracted = expected_from_tar_extraction(snapshot_tree(folder / "extracted"))
    del extracted[oracle.ROOT]

    with loop_mount(exported.image) as mountpoint:
        from_kernel, lost_found_problems = split_lost_found(snapshot_tree(mountpoint))
    del from_kernel[oracle.ROOT]

    assert lost_found_problems == []
    differences = compare_trees(from_kernel, extracted)
    assert differences == [], format_differences(differences)


@pytest.mark.root
def test_export_extracts_to_image(exported: Exported, tmp_path: Path) -> None:
    """GNU tar's extraction of the export, whiteouts converted, equals the mounted image."""
    assert_extraction_equals_image(exported, tmp_path)


def test_export_deterministic(exported: Exported, tmp_path: Path) -> None:
    again = tmp_path / "again.tar"
    vhd2tar(exported.image, again)
    in_process = io.BytesIO()
    with open_reader(exported.image) as reader:
        export_tar(reader, in_process)

    assert again.read_bytes() == exported.tar_path.read_bytes()
    assert in_process.getvalue() == exported.tar_path.read_bytes()


# --- header edge cases ----------------------------------------------------------------------

UTF8_NAME: Final = "caf\u00e9.txt".encode()
LATIN1_NAME: Final = b"latin1-\xe9.txt"  # not UTF-8: the PAX header needs hdrcharset=BINARY
NAME_100: Final = "n" * 100  # fills the ustar name field exactly
NAME_101: Final = "m" * 101
DIRECTORY_99: Final = "d" * 99  # 100 bytes with the "/" that tar adds to a directory
DIRECTORY_100: Final = "e" * 100
LONG_BINARY_TARGET: Final = b"target-\xff/" * 12  # 108 bytes, not UTF-8
LARGE_OWNER: Final = 3_000_000  # above 2^21 - 1, the largest 7-digit octal value
BEFORE_EPOCH_MTIME: Final = "-1.5"
FAR_FUTURE_MTIME_S: Final = 8**11 + 5  # above the 11-digit octal mtime field
BINARY_XATTR: Final = b"\x00\xff\xfe binary \x80"
LARGE_DATA: Final = bytes(range(256)) * 800 + b"tail"  # 204804 bytes, not block aligned

EDGE_MEMBERS: Final = (
    tarbuild.regular(UTF8_NAME, b"utf-8 name\n"),
    tarbuild.regular(LATIN1_NAME, b"latin-1 name\n"),
    tarbuild.regular(NAME_100, b"100\n"),
    tarbuild.regular(NAME_101, b"101\n"),
    tarbuild.directory(DIRECTORY_99),
    tarbuild.directory(DIRECTORY_100),
    tarbuild.regular("owner", b"o\n", uid=LARGE_OWNER, gid=LARGE_OWNER + 1),
    tarbuild.regular("before-epoch", pax_headers={"mtime": BEFORE_EPOCH_MTIME}),
    tarbuild.regular("far-future", mtime=FAR_FUTURE_MTIME_S),
    tarbuild.regular(
        "binary-xattr",
        pax_headers={"SCHILY.xattr.user.blob": treegen.pax_string(BINARY_XATTR)},
    ),
    tarbuild.regular("large.bin", LARGE_DATA),
    tarbuild.hard_link(b"link-to-latin1", LATIN1_NAME),
    tarbuild.symlink(b"symlink-\xe9", LONG_BINARY_TARGET),
)


@pytest.fixture(scope="module")
def edge_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_layer(tmp_path_factory.mktemp("export-edges"), EDGE_MEMBERS)


def member(exported: Exported, name: str | bytes) -> tarfile.TarInfo:
    return exported.members[os.fsdecode(name)]


def test_edge_gnu_tar_lists(edge_export: Exported) -> None:
    # gnu_tar_names shows bytes that are not UTF-8 as backslash escapes.
    expected = sorted(
        os.fsencode(name).decode("utf-8", "backslashreplace") for name in edge_export.order
    )

    assert gnu_tar_names(edge_export.tar_path) == expected


def test_edge_non_ascii_names(edge_export: Exported) -> None:
    utf8 = member(edge_export, UTF8_NAME)
    latin1 = member(edge_export, LATIN1_NAME)

    assert utf8.pax_headers["path"] == UTF8_NAME.decode()
    assert os.fsencode(latin1.name) == LATIN1_NAME
    assert latin1.size == len(b"latin-1 name\n")


def test_edge_name_field_boundary(edge_export: Exported) -> None:
    assert "path" not in member(edge_export, NAME_100).pax_headers
    assert member(edge_export, NAME_101).pax_headers["path"] == NAME_101
    assert "path" not in member(edge_export, DIRECTORY_99).pax_headers
    assert member(edge_export, DIRECTORY_100).pax_headers["path"] == DIRECTORY_100 + "/"


def test_edge_large_owner(edge_export: Exported) -> None:
    owner = member(edge_export, "owner")

    assert owner.uid == LARGE_OWNER
    assert owner.gid == LARGE_OWNER + 1
    assert owner.pax_headers["uid"] == str(LARGE_OWNER)


def test_edge_mtimes_outside_ustar(edge_export: Exported) -> None:
    before_epoch = member(edge_export, "before-epoch")
    far_future = member(edge_export, "far-future")

    assert before_epoch.pax_headers["mtime"] == BEFORE_EPOCH_MTIME
    assert before_epoch.mtime == -1.5
    assert far_future.pax_headers["mtime"] == str(FAR_FUTURE_MTIME_S)
    assert far_future.mtime == FAR_FUTURE_MTIME_S


def test_edge_binary_xattr(edge_export: Exported) -> None:
    value = member(edge_export, "binary-xattr").pax_headers["SCHILY.xattr.user.blob"]

    assert value.encode("utf-8", "surrogateescape") == BINARY_XATTR


def test_edge_links_not_utf8(edge_export: Exported) -> None:
    link = member(edge_export, b"link-to-latin1")
    symlink = member(edge_export, b"symlink-\xe9")

    assert link.type == tarfile.LNKTYPE
    assert os.fsencode(link.linkname) == LATIN1_NAME
    assert symlink.type == tarfile.SYMTYPE
    assert os.fsencode(symlink.linkname) == LONG_BINARY_TARGET


def test_edge_large_file_content(edge_export: Exported) -> None:
    with tarfile.open(edge_export.tar_path, encoding="utf-8", errors="surrogateescape") as archive:
        content = archive.extractfile("large.bin")
        assert content is not None
        data = content.read()

    assert data == LARGE_DATA


def test_edge_archive_padding(edge_export: Exported) -> None:
    """The archive ends in two zero blocks and fills its last 10240-byte record, as tarfile."""
    archive = edge_export.tar_path.read_bytes()

    assert len(archive) % 10240 == 0
    assert archive[-1024:] == bytes(1024)


@pytest.mark.root
def test_edge_extracts_to_image(edge_export: Exported, tmp_path: Path) -> None:
    """GNU tar's extraction of the edge cases equals the mounted image."""
    assert_extraction_equals_image(edge_export, tmp_path)


def export_bytes(image: Path) -> bytes:
    output = io.BytesIO()
    with open_reader(image) as reader:
        export_tar(reader, output)
    return output.getvalue()


def test_export_to_pipe(edge_export: Exported) -> None:
    """A pipe gets the bytes that a file object without a descriptor gets."""
    expected = export_bytes(edge_export.image)
    read_end, write_end = os.pipe()
    received = io.BytesIO()

    def drain() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            shutil.copyfileobj(pipe, received)

    reader_thread = threading.Thread(target=drain)
    reader_thread.start()
    try:
        with open_reader(edge_export.image) as reader, os.fdopen(write_end, "wb") as output:
            export_tar(reader, output)
    finally:
        reader_thread.join()

    assert received.getvalue() == expected


def test_export_to_append_mode_file(edge_export: Exported, tmp_path: Path) -> None:
    """sendfile rejects an O_APPEND output, so the export copies through memory instead."""
    expected = export_bytes(edge_export.image)
    tar_path = tmp_path / "appended.tar"
    tar_path.write_bytes(b"")

    with open_reader(edge_export.image) as reader, tar_path.open("ab") as output:
        export_tar(reader, output)

    assert tar_path.read_bytes() == expected


def test_export_after_buffered_bytes(edge_export: Exported, tmp_path: Path) -> None:
    """Bytes the caller left in a BufferedWriter come before the archive."""
    expected = export_bytes(edge_export.image)
    tar_path = tmp_path / "prefixed.tar"

    with open_reader(edge_export.image) as reader, tar_path.open("wb") as output:
        output.write(b"prefix")
        export_tar(reader, output)
        output.write(b"suffix")

    assert tar_path.read_bytes() == b"prefix" + expected + b"suffix"


# --- a sparse file ---------------------------------------------------------------------------

SPARSE_FILE: Final = treegen.FileData(
    3 * MIB + 100,
    (
        treegen.DataRegion(0, 4096, 1),
        treegen.DataRegion(MIB + 512, 100 * 1024, 2),
        treegen.DataRegion(3 * MIB, 100, 3),
    ),
)


def sparse_file_image(folder: Path, name: str, data: treegen.FileData) -> Path:
    """Convert a layer of one sparse file, NAME.bin, to FOLDER/NAME.vhd."""
    layer_tar = folder / f"{name}.tar"
    tree = treegen.Tree((treegen.Entry(f"{name}.bin", treegen.Kind.FILE, data=data, sparse=True),))
    with layer_tar.open("wb") as output:
        treegen.write_tar(tree, output)
    image = folder / f"{name}.vhd"
    convert_tar(layer_tar, image)
    return image


def test_export_sparse_file(tmp_path: Path) -> None:
    """Holes read as zeros, and tarfile and GNU tar both read back the file's bytes."""
    image = sparse_file_image(tmp_path, "sparse", SPARSE_FILE)
    tar_path = tmp_path / "export.tar"
    expected = expected_bytes(SPARSE_FILE, 0, SPARSE_FILE.size)

    vhd2tar(image, tar_path)

    with tarfile.open(tar_path) as archive:
        content = archive.extractfile("sparse.bin")
        assert content is not None
        from_tarfile = content.read()
    from_gnu_tar = subprocess.run(
        [oracle.require_tool("tar"), "--extract", "--to-stdout", f"--file={tar_path}"],
        capture_output=True,
        check=True,
    ).stdout
    assert from_tarfile == expected
    assert from_gnu_tar == expected
    assert export_bytes(image) == tar_path.read_bytes()


# --- a file over 8 GiB -----------------------------------------------------------------------

HUGE_FILE: Final = treegen.FileData(
    8 * GIB + 4097,
    (
        treegen.DataRegion(0, 4096, 1),
        treegen.DataRegion(4 * GIB + 512, 8192, 2),
        treegen.DataRegion(8 * GIB, 4097, 3),
    ),
)


def expected_bytes(data: treegen.FileData, start: int, length: int) -> bytes:
    """Return bytes start..start+length of a file: zeros with its data regions laid over."""
    content = bytearray(length)
    for region in data.regions:
        low = max(start, region.offset)
        high = min(start + length, region.end)
        if low < high:
            piece = region.data()[low - region.offset : high - region.offset]
            content[low - start : high - start] = piece
    return bytes(content)


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of the parts of a sparse file that hold data."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        position = end


@pytest.mark.root
def test_export_huge_sparse_file(tmp_path: Path) -> None:
    """A file over 8 GiB exports with its exact size, and GNU tar reads it from a pipe.

    dd writes what GNU tar extracts with holes for all-zero blocks, so nothing near 8 GiB
    reaches the disk.
    """
    image = sparse_file_image(tmp_path, "huge", HUGE_FILE)
    copy = tmp_path / "huge.copy"
    sink = f"dd of={shlex.quote(str(copy))} bs=1M iflag=fullblock conv=sparse status=none"
    tar = subprocess.Popen(
        [oracle.require_tool("tar"), "--extract", "-vv", "--file=-", f"--to-command={sink}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdin is not None

    with open_reader(image) as reader:
        export_tar(reader, tar.stdin)
    listing, errors = tar.communicate()

    assert tar.returncode == 0, errors.decode()
    assert listing.decode().split()[2] == str(HUGE_FILE.size)
    assert copy.stat().st_size == HUGE_FILE.size
    fd = os.open(copy, os.O_RDONLY)
    try:
        ranges = list(data_ranges(fd, HUGE_FILE.size))
        for start, length in ranges:
            assert os.pread(fd, length, start) == expected_bytes(HUGE_FILE, start, length)
    finally:
        os.close(fd)
    covered = sum(length for _, length in ranges)
    assert covered < 64 * MIB
    for region in HUGE_FILE.regions:
        assert any(
            start <= region.offset and region.end <= start + length for start, length in ranges
        )


# --- round trips -----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    with path.open("rb") as content:
        return hashlib.file_digest(content, "sha256").hexdigest()


def export_file(image: Path, tar_path: Path) -> None:
    with open_reader(image) as reader, tar_path.open("wb") as output:
        export_tar(reader, output)


@dataclasses.dataclass(frozen=True)
class RoundTrip:
    """Digests of tar0 -> image1 -> tar1 -> image2 -> tar2 -> image3."""

    tar_digests: tuple[str, str]  # tar1, tar2
    image_digests: tuple[str, str]  # image2, image3


def round_trip(source: Path, folder: Path) -> RoundTrip:
    tars = [source]
    images = []
    for step in (1, 2, 3):
        image = folder / f"image{step}.img"
        convert_tar(tars[-1], image, vhd_footer=False)
        images.append(image)
        if step < 3:
            tars.append(folder / f"tar{step}.tar")
            export_file(image, tars[-1])
    return RoundTrip(
        tar_digests=(sha256_file(tars[1]), sha256_file(tars[2])),
        image_digests=(sha256_file(images[1]), sha256_file(images[2])),
    )


@pytest.fixture(scope="module", params=CORPUS_LAYER_NAMES)
def corpus_round_trip(
    request: pytest.FixtureRequest, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> RoundTrip:
    name: str = request.param
    folder = tmp_path_factory.mktemp(f"{name}-round-trip")
    try:
        return round_trip(corpus / f"{name}.tar", folder)
    finally:
        # The images and tars of the large layers take hundreds of MB each.
        shutil.rmtree(folder)


def test_corpus_round_trip_tars(corpus_round_trip: RoundTrip) -> None:
    first, second = corpus_round_trip.tar_digests
    assert first == second


def test_corpus_round_trip_images(corpus_round_trip: RoundTrip) -> None:
    first, second = corpus_round_trip.image_digests
    assert first == second


@pytest.fixture(scope="module")
def work_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("round-trip-property")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=oracle.in_ci(),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=treegen.trees(max_entries=15))
def test_random_tree_round_trip(tree: treegen.Tree, work_folder: Path) -> None:
    folder = Path(tempfile.mkdtemp(dir=work_folder))
    try:
        source = folder / "tar0.tar"
        with source.open("wb") as output:
            treegen.write_tar(tree, output)

        result = round_trip(source, folder)

        assert result.tar_digests[0] == result.tar_digests[1]
        assert result.image_digests[0] == result.image_digests[1]
    finally:
        shutil.rmtree(folder)


# --- the empty layer -------------------------------------------------------------------------

EMPTY_STREAMS: Final = {
    "zero bytes": b"",
    "end marker": tarbuild.END_OF_ARCHIVE,
    "gzip end marker": gzip.compress(tarbuild.END_OF_ARCHIVE, mtime=0),
}


@pytest.fixture(params=sorted(EMPTY_STREAMS))
def empty_image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    source = tmp_path / "empty.tar"
    source.write_bytes(EMPTY_STREAMS[request.param])
    image = tmp_path / "empty.vhd"
    convert_tar(source, image)
    return image


def test_empty_layer_image(empty_image: Path) -> None:
    with open_reader(empty_image) as reader:
        paths = [path for path, _ in reader.walk()]

    assert paths == [b"lost+found"]


def test_empty_layer_export(empty_image: Path, tmp_path: Path) -> None:
    tar_path = tmp_path / "export.tar"

    vhd2tar(empty_image, tar_path)

    assert read_members(tar_path.read_bytes()) == []
    assert gnu_tar_names(tar_path) == []


def test_empty_layer_changes(empty_image: Path) -> None:
    with open_reader(empty_image) as reader:
        layer = LayerTree(reader)
        changes = layer_changes(layer, MergedView([]))
        size = diff_size(changes, MergedView([layer]))

    assert changes == []
    assert size == 0


# --- headers against tarfile -----------------------------------------------------------------

# ext4 stores a time as 32 signed bits of seconds and 2 epoch bits, from 1901 to 2446.
EXT4_SECONDS: Final = st.integers(min_value=-(1 << 31), max_value=(1 << 34) - (1 << 31) - 1)
NAMES: Final = st.binary(min_size=1, max_size=300).filter(lambda name: b"\0" not in name)
TEXT_NAMES: Final = st.one_of(
    NAMES,
    st.text(min_size=1, max_size=120).map(lambda text: text.encode("utf-8", "surrogatepass")),
).filter(lambda name: b"\0" not in name)


@dataclasses.dataclass(frozen=True)
class HeaderCase:
    name: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes
    device: tuple[int, int] | None
    xattr_records: list[tuple[bytes, bytes]] | None


@st.composite
def header_cases(draw: st.DrawFn) -> HeaderCase:
    typeflag = draw(st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6"]))
    name = draw(TEXT_NAMES)
    if typeflag == b"5":
        name += b"/"
    xattrs = draw(
        st.dictionaries(
            st.from_regex(rb"\A(user|security|trusted)\.[a-z._-]{1,40}\Z"),
            st.binary(max_size=200),
            max_size=3,
        )
    )
    seconds = draw(EXT4_SECONDS)
    nanoseconds = draw(st.one_of(st.just(0), st.integers(0, 999_999_999)))
    return HeaderCase(
        name=name,
        typeflag=typeflag,
        mode=draw(st.integers(0, 0xFFFF)),
        uid=draw(st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 32) - 1))),
        gid=draw(st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 32) - 1))),
        size=draw(st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)))
        if typeflag == b"0"
        else 0,
        mtime_ns=seconds * 1_000_000_000 + nanoseconds,
        # An image's symlink target may contain NUL, which tarfile keeps in the ustar field.
        linkname=draw(st.one_of(TEXT_NAMES, st.binary(min_size=1, max_size=120)))
        if typeflag in (b"1", b"2")
        else b"",
        device=(draw(st.integers(0, (1 << 12) - 1)), draw(st.integers(0, (1 << 20) - 1)))
        if typeflag in (b"3", b"4")
        else None,
        xattr_records=[(b"SCHILY.xattr." + key, value) for key, value in sorted(xattrs.items())]
        or draw(st.sampled_from([None, []])),
    )


def decimal_seconds(time_ns: int) -> str:
    """A time in ns as decimal seconds without trailing zeros, as PAX records carry it."""
    return format(decimal.Decimal(time_ns).scaleb(-9).normalize(), "f")


def tarfile_header(case: HeaderCase) -> bytes:
    """What tarfile writes for the entry in PAX_FORMAT, utf-8 with surrogateescape."""
    info = tarfile.TarInfo(case.name.decode("utf-8", "surrogateescape"))
    info.type = case.typeflag
    info.mode = case.mode & 0o7777
    info.uid, info.gid, info.size = case.uid, case.gid, case.size
    info.mtime = case.mtime_ns // 1_000_000_000
    info.uname = info.gname = ""
    info.linkname = case.linkname.decode("utf-8", "surrogateescape")
    if case.device is not None:
        info.devmajor, info.devminor = case.device
    # lcow's mtime record comes first, as from a caller that sets it in pax_headers.
    records = {}
    if case.mtime_ns % 1_000_000_000 or not 0 <= info.mtime < 8**11:
        records["mtime"] = decimal_seconds(case.mtime_ns)
    for keyword, value in case.xattr_records or []:
        records[keyword.decode("ascii")] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = records
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@settings(max_examples=2000, derandomize=oracle.in_ci())
@given(case=header_cases())
def test_header_matches_tarfile(case: HeaderCase) -> None:
    built = _ustar.header(
        case.name,
        case.typeflag,
        case.mode,
        case.uid,
        case.gid,
        case.size,
        case.mtime_ns,
        case.linkname,
        case.device,
        case.xattr_records,
    )
    assert built == tarfile_header(case)


@pytest.mark.parametrize(
    ("time_ns", "text"),
    [
        (-1_500_000_000, "-1.5"),
        (-500_000_000, "-0.5"),
        (-1, "-0.000000001"),
        (1_700_000_000_123_456_789, "1700000000.123456789"),
        (((1 << 34) - (1 << 31) - 1) * 1_000_000_000 + 1, "15032385535.000000001"),
    ],
)
def test_header_mtime_record(time_ns: int, text: str) -> None:
    built = _ustar.header(b"f", b"0", 0o644, 0, 0, 0, time_ns, b"", None, None)
    assert f" mtime={text}\n".encode() in built[512:1024]
    assert decimal_seconds(time_ns) == text


def test_header_rejects_a_bad_device() -> None:
    with pytest.raises(ValueError, match="device"):
        _ustar.header(b"dev/x", b"3", 0o600, 0, 0, 0, 0, b"", (1 << 21, 0), None)
