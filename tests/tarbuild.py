"""Build small tar layers for tests: members with explicit fields, raw headers and GNU tar.

Most inputs go through the standard library's ``tarfile`` with every TarInfo field set by
the caller, so a test table shows the whole member. Where ``tarfile`` cannot write the input
(a base-256 negative time, a header followed by too little data, a volume label), the test
assembles the archive from :func:`ustar_header`, :func:`padded` and :data:`END_OF_ARCHIVE`.
GNU tar builds the sparse, volume-label and multi-volume archives from a folder.

Names are ``str`` or ``bytes``. Bytes that are not valid UTF-8 reach the header unchanged,
because every archive here is written with the UTF-8 codec and the ``surrogateescape``
error handler.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, Literal, TypeAlias

import oracle

BLOCK_BYTES: Final = 512  # tar headers and data are laid out in 512-byte blocks
END_OF_ARCHIVE: Final = bytes(2 * BLOCK_BYTES)  # a tar ends with two zero blocks

DEFAULT_MTIME_S: Final = 1_700_000_000  # 2023-11-14T22:13:20Z; any fixed time keeps runs equal

# ustar header fields: (offset, length) in bytes, POSIX.1-2001 "ustar Interchange Format".
NAME_FIELD: Final = (0, 100)
MODE_FIELD: Final = (100, 8)
UID_FIELD: Final = (108, 8)
GID_FIELD: Final = (116, 8)
SIZE_FIELD: Final = (124, 12)
MTIME_FIELD: Final = (136, 12)
CHECKSUM_FIELD: Final = (148, 8)
TYPEFLAG_OFFSET: Final = 156
LINKNAME_FIELD: Final = (157, 100)
MAGIC_FIELD: Final = (257, 8)  # "ustar\0" and version "00"

USTAR_MAGIC: Final = b"ustar\x0000"
GNU_MAGIC: Final = b"ustar  \x00"  # GNU tar's pre-POSIX magic and version

# tarfile.USTAR_FORMAT, GNU_FORMAT or PAX_FORMAT
TarFormat: TypeAlias = Literal[0, 1, 2]

NAME_ENCODING: Final = "utf-8"
NAME_ERRORS: Final = "surrogateescape"


@dataclasses.dataclass(frozen=True)
class Member:
    """One tar member: its header fields and, for a regular file, its content."""

    info: tarfile.TarInfo
    data: bytes | None = None


def text_name(name: str | bytes) -> str:
    """Return ``name`` as the ``str`` that tarfile encodes back to the same bytes."""
    if isinstance(name, bytes):
        return name.decode(NAME_ENCODING, NAME_ERRORS)
    return name


def _info(
    name: str | bytes,
    kind: bytes,
    *,
    mode: int,
    mtime: int,
    uid: int,
    gid: int,
    uname: str,
    gname: str,
    pax_headers: Mapping[str, str] | None,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(text_name(name))
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = uid
    info.gid = gid
    info.uname = uname
    info.gname = gname
    if pax_headers is not None:
        info.pax_headers = dict(pax_headers)
    return info


def regular(
    name: str | bytes,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    mtime: int = DEFAULT_MTIME_S,
    uid: int = 0,
    gid: int = 0,
    uname: str = "",
    gname: str = "",
    pax_headers: Mapping[str, str] | None = None,
) -> Member:
    """Return a regular file member holding ``data``."""
    info = _info(
        name,
        tarfile.REGTYPE,
        mode=mode,
        mtime=mtime,
        uid=uid,
        gid=gid,
        uname=uname,
        gname=gname,
        pax_headers=pax_headers,
    )
    info.size = len(data)
    return Member(info, data)


def directory(
    name: str | bytes,
    *,
    mode: int = 0o755,
    mtime: int = DEFAULT_MTIME_S,
    uid: int = 0,
    gid: int = 0,
) -> Member:
    """Return a directory member."""
    info = _info(
        name,
        tarfile.DIRTYPE,
        mode=mode,
        mtime=mtime,
        uid=uid,
        gid=gid,
        uname="",
        gname="",
        pax_headers=None,
    )
    return Member(info)


def symlink(name: str | bytes, target: str | bytes, *, mtime: int = DEFAULT_MTIME_S) -> Member:
    """Return a symbolic link member pointing at ``target``."""
    info = _info(
        name,
        tarfile.SYMTYPE,
        mode=0o777,
        mtime=mtime,
        uid=0,
        gid=0,
        uname="",
        gname="",
        pax_headers=None,
    )
    info.linkname = text_name(target)
    return Member(info)


def hard_link(name: str | bytes, target: str | bytes) -> Member:
    """Return a hard link member that gives the earlier member ``target`` another name."""
    info = _info(
        name,
        tarfile.LNKTYPE,
        mode=0o644,
        mtime=DEFAULT_MTIME_S,
        uid=0,
        gid=0,
        uname="",
        gname="",
        pax_headers=None,
    )
    info.linkname = text_name(target)
    return Member(info)


def device(name: str, kind: bytes, major: int, minor: int, *, mode: int) -> Member:
    """Return a character (``tarfile.CHRTYPE``) or block (``tarfile.BLKTYPE``) device."""
    info = _info(
        name,
        kind,
        mode=mode,
        mtime=DEFAULT_MTIME_S,
        uid=0,
        gid=0,
        uname="",
        gname="",
        pax_headers=None,
    )
    info.devmajor = major
    info.devminor = minor
    return Member(info)


def fifo(name: str, *, mode: int) -> Member:
    """Return a FIFO (named pipe) member."""
    info = _info(
        name,
        tarfile.FIFOTYPE,
        mode=mode,
        mtime=DEFAULT_MTIME_S,
        uid=0,
        gid=0,
        uname="",
        gname="",
        pax_headers=None,
    )
    return Member(info)


def tar_bytes(
    members: Iterable[Member],
    *,
    tar_format: TarFormat = tarfile.PAX_FORMAT,
) -> bytes:
    """Return a whole archive of ``members`` in archive order, end marker included.

    tarfile pads the archive with zeros to a multiple of 10240 bytes after the end marker,
    as GNU tar does with its default blocking factor of 20.
    """
    output = io.BytesIO()
    with tarfile.open(
        fileobj=output,
        mode="w",
        format=tar_format,
        encoding=NAME_ENCODING,
        errors=NAME_ERRORS,
    ) as archive:
        for member in members:
            content = None if member.data is None else io.BytesIO(member.data)
            archive.addfile(member.info, content)
    return output.getvalue()


def member_bytes(member: Member, *, tar_format: TarFormat = tarfile.PAX_FORMAT) -> bytes:
    """Return the header blocks and padded data of one member, without the end marker."""
    header = member.info.tobuf(tar_format, NAME_ENCODING, NAME_ERRORS)
    return header + padded(member.data or b"")


# --- raw headers ---------------------------------------------------------------------------


def padded(data: bytes) -> bytes:
    """Return ``data`` padded with zeros to a whole number of 512-byte blocks."""
    return data + bytes(-len(data) % BLOCK_BYTES)


def octal_field(value: int, length: int) -> bytes:
    """Return ``value`` as zero-padded octal digits and a NUL, ``length`` bytes in all."""
    digits = f"{value:o}".encode().rjust(length - 1, b"0")
    if len(digits) != length - 1:
        raise ValueError(f"{value} does not fit in a {length}-byte octal field")
    return digits + b"\0"


def base256_field(value: int, length: int) -> bytes:
    """Return ``value`` in the GNU base-256 form of a numeric field, ``length`` bytes long.

    The field is the big-endian two's complement of ``value``, with the top bit of the first
    byte set as the base-256 marker. A negative value therefore starts with 0xff and a
    positive one with 0x80. GNU tar 1.34 and Python's tarfile read this form back exactly.
    """
    limit = 1 << (8 * length - 2)  # one bit for the marker, one for the sign
    if not -limit <= value < limit:
        raise ValueError(f"{value} does not fit in a {length}-byte base-256 field")
    field = bytearray(value.to_bytes(length, "big", signed=True))
    field[0] |= 0x80
    return bytes(field)


def ustar_header(
    name: bytes,
    *,
    typeflag: bytes,
    size: int = 0,
    mode: int = 0o644,
    mtime: int = DEFAULT_MTIME_S,
    mtime_field: bytes | None = None,
    linkname: bytes = b"",
    magic: bytes = USTAR_MAGIC,
) -> bytes:
    """Return one 512-byte header block with the given fields and a correct checksum.

    ``mtime_field``, when given, is written as the 12 bytes of the mtime field in place of
    the octal form of ``mtime`` (for a base-256 time). Owner fields are 0.
    """
    block = bytearray(BLOCK_BYTES)

    def put(field: tuple[int, int], value: bytes) -> None:
        offset, length = field
        if len(value) > length:
            raise ValueError(f"{value!r} is longer than the {length}-byte header field")
        block[offset : offset + len(value)] = value

    put(NAME_FIELD, name)
    put(MODE_FIELD, octal_field(mode, MODE_FIELD[1]))
    put(UID_FIELD, octal_field(0, UID_FIELD[1]))
    put(GID_FIELD, octal_field(0, GID_FIELD[1]))
    put(SIZE_FIELD, octal_field(size, SIZE_FIELD[1]))
    put(MTIME_FIELD, mtime_field or octal_field(mtime, MTIME_FIELD[1]))
    block[TYPEFLAG_OFFSET : TYPEFLAG_OFFSET + 1] = typeflag
    put(LINKNAME_FIELD, linkname)
    put(MAGIC_FIELD, magic)

    # The checksum is the sum of all header bytes with the checksum field read as spaces,
    # written as six octal digits, a NUL and a space.
    offset, length = CHECKSUM_FIELD
    block[offset : offset + length] = b" " * length
    checksum = sum(block)
    block[offset : offset + length] = f"{checksum:06o}".encode() + b"\0 "
    return bytes(block)


# --- GNU tar -------------------------------------------------------------------------------


def gnu_tar_create(folder: Path, output: Path, *options: str) -> Path:
    """Archive the content of ``folder`` into ``output`` with GNU tar and return ``output``.

    Members are sorted by name and owned by 0:0, so the archive depends on the files only.
    ``options`` come before the member list (for example ``--sparse``, ``--format=gnu``).
    """
    arguments = [
        "tar",
        "--create",
        f"--file={output}",
        f"--directory={folder}",
        "--sort=name",
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        *options,
        ".",
    ]
    oracle.run_tool(arguments)
    return output


def pax_records(records: Mapping[bytes, bytes]) -> bytes:
    """Return the data of a PAX header: one ``LENGTH KEY=VALUE\\n`` line per record.

    LENGTH counts the whole line, its own digits included, so it is found by iteration.
    """
    lines = []
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        lines.append(str(length).encode() + body)
    return b"".join(lines)


def header_typeflags(archive: bytes) -> list[bytes]:
    """Return the typeflag of each header in an uncompressed archive, in archive order.

    The walk follows the octal size fields from header to header and stops at the first
    zero block, so it lists extension headers ('x', 'g', 'L', 'K') as well as members.
    """
    typeflags = []
    offset = 0
    size_offset, size_length = SIZE_FIELD
    while offset + BLOCK_BYTES <= len(archive):
        block = archive[offset : offset + BLOCK_BYTES]
        if not any(block):
            break
        typeflags.append(block[TYPEFLAG_OFFSET : TYPEFLAG_OFFSET + 1])
        size = int(block[size_offset : size_offset + size_length].rstrip(b"\0 ") or b"0", 8)
        offset += BLOCK_BYTES + len(padded(bytes(size)))
    return typeflags
