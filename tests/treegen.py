"""Random file trees for property tests: a model, hypothesis strategies and a PAX tar writer.

A tree is a list of entries in the order a tar stream lists them. ``write_tar`` turns it
into a PAX tar with the standard library's ``tarfile``, and ``expected_snapshot`` returns
what ``oracle.snapshot_tree`` must record for an image of the tree. A test can then compare
a converted image with the model itself, without trusting any extraction.

The strategies aim at the corners of the layer image format. Trees contain every entry
kind, all 12 mode bits, 32-bit owners and nanosecond timestamps from 1901 to 2446. Extended
attributes come in sizes that fit in the inode and sizes that need the external block.
Names may be exactly 255 bytes long, paths deep, and symlink targets on either side of the
60-byte inline limit. Files may have holes and are written either dense or as GNU PAX 1.0
sparse members.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import random
import struct
import tarfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Final

from hypothesis import strategies as st

import oracle
from oracle import Snapshot

NAME_MAX_BYTES: Final = 255
# Paths stay well below PATH_MAX (4096) so that the full path of an entry under a mount
# point or an extraction folder still works with lstat and GNU tar.
PATH_MAX_BYTES: Final = 3000
INLINE_SYMLINK_MAX_BYTES: Final = 59  # ext4 stores a target in i_block (60 bytes) if shorter
SYMLINK_TARGET_MAX_BYTES: Final = 4000

# ext4 keeps 32 bits of seconds and 2 epoch bits, so times run from -2**31 s
# (1901-12-13T20:45:52Z) to 3 * 2**32 + 2**31 - 1 s (2446-05-10T22:38:55Z). The converter
# clamps a time outside this range to the nearest bound.
MTIME_MIN_NS: Final = -(2**31) * 10**9
MTIME_MAX_NS: Final = (3 * 2**32 + 2**31 - 1) * 10**9 + 999_999_999

ID_MAX: Final = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, which chown reads as "no change"
DEVICE_MAJOR_MAX: Final = 2**12 - 1  # Linux dev_t: 12 bits of major, 20 bits of minor
DEVICE_MINOR_MAX: Final = 2**20 - 1

# Budget for the xattrs of one entry, counted as ext4 counts them in an xattr block:
# a 16-byte entry header, then the name suffix and the value, each padded to 4 bytes.
# The external block has 4096 - 32 bytes of room, so 3000 leaves space for the end marker.
XATTR_BUDGET_BYTES: Final = 3000
XATTR_ENTRY_HEADER_BYTES: Final = 16

# security.capability, struct vfs_cap_data revision 2: a little-endian magic and two
# (permitted, inheritable) pairs of 32-bit masks.
VFS_CAP_REVISION_2: Final = 0x0200_0000
VFS_CAP_FLAGS_EFFECTIVE: Final = 0x0000_0001
CAP_HIGH_MASK: Final = 0x1FF  # capabilities 32..40 (CAP_LAST_CAP is 40 on Linux 6.x)

MIB: Final = 1024 * 1024


class Kind(enum.Enum):
    """The kind of a tree entry. Hard links name an earlier entry of any non-directory kind."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR_DEVICE = "char"
    BLOCK_DEVICE = "block"
    FIFO = "fifo"


@dataclasses.dataclass(frozen=True)
class DataRegion:
    """A stretch of file data at offset, filled with bytes from a seeded generator."""

    offset: int
    length: int
    seed: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def data(self) -> bytes:
        return seeded_bytes(self.seed, self.length)


@dataclasses.dataclass(frozen=True)
class FileData:
    """The content of a regular file: size bytes, zero outside the sorted data regions."""

    size: int
    regions: tuple[DataRegion, ...] = ()

    def __post_init__(self) -> None:
        position = 0
        for region in self.regions:
            if region.offset < position or region.length <= 0:
                raise ValueError(f"data region {region} overlaps or is empty")
            position = region.end
        if position > self.size:
            raise ValueError(f"data regions end at {position}, past the size {self.size}")

    @classmethod
    def dense(cls, size: int, seed: int) -> FileData:
        """Return size bytes of seeded data with no holes."""
        if size == 0:
            return cls(0)
        return cls(size, (DataRegion(0, size, seed),))

    def iter_chunks(self, chunk_bytes: int = 8 * MIB) -> Iterator[bytes]:
        """Yield the whole content in order, holes as zeros, in chunks of at most chunk_bytes."""
        position = 0
        for region in self.regions:
            yield from _zero_chunks(region.offset - position, chunk_bytes)
            yield region.data()
            position = region.end
        yield from _zero_chunks(self.size - position, chunk_bytes)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.iter_chunks():
            digest.update(chunk)
        return digest.hexdigest()


def seeded_bytes(seed: int, length: int) -> bytes:
    """Return length reproducible pseudo-random bytes for test data."""
    return random.Random(seed).randbytes(length)  # noqa: S311 (test data, not a secret)


def encode_path(text: str) -> bytes:
    """Return the bytes of a name or path, in which surrogate escapes stand for raw bytes."""
    return text.encode("utf-8", "surrogateescape")


def decode_path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def clamp_mtime_ns(time_ns: int) -> int:
    """Return the time an image stores for time_ns: the nearest time within ext4's range."""
    return min(max(time_ns, MTIME_MIN_NS), MTIME_MAX_NS)


def join_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _zero_chunks(length: int, chunk_bytes: int) -> Iterator[bytes]:
    zeros = bytes(min(length, chunk_bytes))
    while length > 0:
        step = min(length, chunk_bytes)
        yield zeros[:step]
        length -= step


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tar member.

    A hard link uses only path and link_target. Its member repeats the metadata of the
    entry it names, as GNU tar writes hard links.
    """

    path: str  # relative, "/"-separated, without "./" or a trailing "/"; "" is the root
    kind: Kind
    mode: int = 0o644  # the 12 permission bits, setuid, setgid and sticky included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name
    data: FileData | None = None  # regular files only
    sparse: bool = False  # write the file as a GNU PAX 1.0 sparse member
    link_target: str = ""  # a symlink's target, or the path that a hard link names
    major: int = 0
    minor: int = 0


@dataclasses.dataclass(frozen=True)
class Tree:
    """Entries in tar order (see Order), and the prefix of every member name ("" or "./").

    The first name of each hard-linked inode carries the inode, and later names are hard
    links to that first name.
    """

    entries: tuple[Entry, ...]
    member_prefix: str = ""

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self.entries}


RECORD_KINDS: Final = {
    Kind.FILE: "regular",
    Kind.DIRECTORY: "directory",
    Kind.SYMLINK: "symlink",
    Kind.CHAR_DEVICE: "character device",
    Kind.BLOCK_DEVICE: "block device",
    Kind.FIFO: "fifo",
}


def resolve_hard_link(tree: Tree, entry: Entry) -> Entry:
    """Return the entry that carries the inode a hard link names, or entry itself if it is
    not a hard link."""
    entries = tree.by_path()
    while entry.kind is Kind.HARDLINK:
        entry = entries[entry.link_target]
    return entry


def expected_snapshot(tree: Tree, *, implicit_mtime_ns: int | None = None) -> Snapshot:
    """Return the snapshot (as oracle.snapshot_tree records it) of an image of the tree.

    Unless an entry names the root directory, the root has the converter's metadata for
    implicit directories. lost+found is not listed, because oracle.split_lost_found checks
    it.
    """
    if implicit_mtime_ns is None:
        implicit_mtime_ns = oracle.implicit_directory_mtime_ns()
    uid, gid = oracle.IMPLICIT_DIRECTORY_OWNER
    expected: Snapshot = {
        oracle.ROOT: oracle.EntryRecord(
            kind="directory",
            mode=oracle.IMPLICIT_DIRECTORY_MODE,
            uid=uid,
            gid=gid,
            size=None,
            sha256=None,
            mtime_ns=implicit_mtime_ns,
            xattrs=(),
            symlink_target=None,
            rdev=None,
            hardlinks=(),
        )
    }

    names_of_inode: dict[str, list[bytes]] = {}
    for entry in tree.entries:
        origin = resolve_hard_link(tree, entry)
        names_of_inode.setdefault(origin.path, []).append(encode_path(entry.path))

    for entry in tree.entries:
        origin = resolve_hard_link(tree, entry)
        key = encode_path(entry.path) if entry.path else oracle.ROOT
        expected[key] = _expected_record(origin, names_of_inode[origin.path])
    return dict(sorted(expected.items()))


def _expected_record(origin: Entry, names: list[bytes]) -> oracle.EntryRecord:
    size: int | None = 0
    sha256 = None
    symlink_target = None
    rdev = None
    if origin.kind is Kind.DIRECTORY:
        size = None
    elif origin.kind is Kind.FILE:
        data = origin.data if origin.data is not None else FileData(0)
        size = data.size
        sha256 = data.sha256()
    elif origin.kind is Kind.SYMLINK:
        symlink_target = encode_path(origin.link_target)
        size = len(symlink_target)
    elif origin.kind in (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE):
        rdev = (origin.major, origin.minor)
    return oracle.EntryRecord(
        kind=RECORD_KINDS[origin.kind],
        mode=origin.mode,
        uid=origin.uid,
        gid=origin.gid,
        size=size,
        sha256=sha256,
        mtime_ns=clamp_mtime_ns(origin.mtime_ns),
        xattrs=origin.xattrs,
        symlink_target=symlink_target,
        rdev=rdev,
        hardlinks=() if origin.kind is Kind.DIRECTORY else tuple(sorted(names)),
    )


class Order(enum.Enum):
    """How a tree lists its entries in the tar."""

    GENERATION = "generation"  # drawing order: parents first, a folder's entries not contiguous
    DEPTH_FIRST = "depth-first"  # each directory, then all its entries, as tar lists a folder
    DIRECTORIES_LAST = "directories-last"  # each directory after its entries (post-order)


def arrange(entries: Sequence[Entry], order: Order) -> tuple[Entry, ...]:
    """Put entries into order; entries must list parents before children, targets before links.

    With DIRECTORIES_LAST every directory exists implicitly before its own entry sets its
    metadata. A new order may list a hard link before the entry that it names, so the first
    name of each inode in the new order carries the inode, and the other names link to it.
    """
    if order is Order.GENERATION:
        return tuple(entries)
    by_path = {entry.path: entry for entry in entries}
    root_entries = [entry for entry in entries if entry.path == ""]
    children: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.path:
            children.setdefault(entry.path.rpartition("/")[0], []).append(entry)

    ordered: list[Entry] = [] if order is Order.DIRECTORIES_LAST else list(root_entries)

    def visit(directory: str) -> None:
        for entry in children.get(directory, []):
            if entry.kind is not Kind.DIRECTORY:
                ordered.append(entry)
                continue
            if order is Order.DEPTH_FIRST:
                ordered.append(entry)
            visit(entry.path)
            if order is Order.DIRECTORIES_LAST:
                ordered.append(entry)

    visit("")
    if order is Order.DIRECTORIES_LAST:
        ordered.extend(root_entries)

    carriers: dict[str, str] = {}
    arranged: list[Entry] = []
    for entry in ordered:
        origin = entry
        while origin.kind is Kind.HARDLINK:
            origin = by_path[origin.link_target]
        carrier = carriers.setdefault(origin.path, entry.path)
        if carrier == entry.path:
            arranged.append(dataclasses.replace(origin, path=entry.path))
        else:
            arranged.append(Entry(path=entry.path, kind=Kind.HARDLINK, link_target=carrier))
    return tuple(arranged)


# --- Writing the tar -------------------------------------------------------------------

_TAR_TYPES: Final = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIRECTORY: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.HARDLINK: tarfile.LNKTYPE,
    Kind.CHAR_DEVICE: tarfile.CHRTYPE,
    Kind.BLOCK_DEVICE: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}

# The name GNU tar gives the ustar header of a PAX 1.0 sparse member ("%d/GNUSparseFile.%p/%f");
# readers take the real name from GNU.sparse.name. A fixed ASCII name below 100 bytes keeps
# tarfile from adding a competing "path" record.
SPARSE_HEADER_NAME: Final = "GNUSparseFile.0/data"


def format_pax_time(time_ns: int) -> str:
    """Format nanoseconds since the epoch as a PAX time: "-1.25" means 1.25 s before 1970."""
    sign = "-" if time_ns < 0 else ""
    seconds, nanoseconds = divmod(abs(time_ns), 10**9)
    if nanoseconds == 0:
        return f"{sign}{seconds}"
    return f"{sign}{seconds}.{nanoseconds:09d}".rstrip("0")


def pax_string(value: bytes) -> str:
    """Wrap raw bytes as a str for tarfile's pax_headers.

    Values that are not valid UTF-8 make tarfile write a hdrcharset=BINARY record first.
    """
    return value.decode("utf-8", "surrogateescape")


def sparse_map_block(data: FileData) -> bytes:
    """Encode the GNU PAX 1.0 sparse map that precedes the data regions of a sparse member.

    The map is decimal text, one number a line: the region count, then offset and length
    of each region, padded with NULs to a 512-byte boundary. The regions' data follows
    without padding between regions. GNU tar reads each region from whole 512-byte blocks,
    so all regions but the last must be a multiple of 512 bytes long for GNU tar and
    libarchive to agree. A file that ends in a hole gets a final empty region at its
    size, as GNU tar writes it.
    """
    pairs = [(region.offset, region.length) for region in data.regions]
    if not pairs or pairs[-1][0] + pairs[-1][1] < data.size:
        pairs.append((data.size, 0))
    lines = [str(len(pairs))]
    for offset, length in pairs:
        lines.extend((str(offset), str(length)))
    text = ("\n".join(lines) + "\n").encode("ascii")
    padding = -len(text) % tarfile.BLOCKSIZE
    return text + bytes(padding)


def add_member(archive: tarfile.TarFile, entry: Entry, origin: Entry, prefix: str = "") -> None:
    """Write entry to a PAX archive; origin is the entry itself or, for a hard link, its inode."""
    name = prefix + entry.path
    if entry.kind is Kind.DIRECTORY:
        # GNU tar names the root "./" when it archives a folder as ".".
        name = name + "/" if entry.path else "./"
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[entry.kind]
    info.mode = origin.mode
    info.uid = origin.uid
    info.gid = origin.gid
    info.uname = ""
    info.gname = ""
    # The ustar field takes whole non-negative seconds below 8**11; tarfile writes 0 there
    # when the "mtime" record, which carries the nanoseconds, is out of that range.
    info.mtime = max(0, origin.mtime_ns // 10**9)
    pax_headers = {"mtime": format_pax_time(origin.mtime_ns)}
    for xattr_name, value in origin.xattrs:
        pax_headers["SCHILY.xattr." + xattr_name] = pax_string(value)

    payload: BinaryIO | None = None
    if entry.kind is Kind.HARDLINK:
        info.linkname = prefix + entry.link_target
    elif entry.kind is Kind.SYMLINK:
        info.linkname = entry.link_target
    elif entry.kind in (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE):
        info.devmajor = entry.major
        info.devminor = entry.minor
    elif entry.kind is Kind.FILE:
        data = entry.data if entry.data is not None else FileData(0)
        if entry.sparse:
            info.name = SPARSE_HEADER_NAME
            pax_headers.update(
                {
                    "GNU.sparse.major": "1",
                    "GNU.sparse.minor": "0",
                    "GNU.sparse.name": name,
                    "GNU.sparse.realsize": str(data.size),
                }
            )
            payload = _SparsePayload(data)
        else:
            payload = _DensePayload(data)
        info.size = payload.size

    info.pax_headers = pax_headers
    archive.addfile(info, payload)


def write_tar(tree: Tree, destination: BinaryIO) -> None:
    """Write the tree to destination as a PAX tar."""
    # Names that are not UTF-8 go out as raw bytes under a hdrcharset=BINARY record.
    with tarfile.open(
        fileobj=destination,
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as archive:
        for entry in tree.entries:
            add_member(archive, entry, resolve_hard_link(tree, entry), tree.member_prefix)


def tar_bytes(tree: Tree) -> bytes:
    buffer = io.BytesIO()
    write_tar(tree, buffer)
    return buffer.getvalue()


class _ChunkReader(io.RawIOBase):
    """A read-only stream over a chunk iterator, so that tarfile copies file data without
    holding all of it in memory."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""
        self.size = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class _DensePayload(io.BufferedReader):
    def __init__(self, data: FileData) -> None:
        super().__init__(_ChunkReader(data.iter_chunks(), data.size), buffer_size=MIB)
        self.size = data.size


class _SparsePayload(io.BufferedReader):
    def __init__(self, data: FileData) -> None:
        map_block = sparse_map_block(data)
        chunks = iter([map_block, *(region.data() for region in data.regions)])
        size = len(map_block) + sum(region.length for region in data.regions)
        super().__init__(_ChunkReader(chunks, size), buffer_size=MIB)
        self.size = size


# --- Strategies ------------------------------------------------------------------------

_NAME_CHARACTERS: Final = st.characters(codec="utf-8", exclude_characters="/\x00")
_PLAIN_CHARACTERS: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def fit_to_bytes(text: str, length: int, filler: str = "x") -> str:
    """Cut valid UTF-8 text at a character boundary to at most length bytes, then pad it
    with filler to exactly length bytes."""
    fitted = encode_path(text)[:length].decode("utf-8", "ignore")
    return fitted + filler * (length - len(encode_path(fitted)))


def _is_usable_name(name: str) -> bool:
    return name not in (".", "..") and not name.startswith(".wh.")


_RAW_NAMES: Final = st.lists(
    st.integers(1, 255).filter(lambda byte: byte != ord("/")), min_size=1, max_size=16
).map(bytes)


@st.composite
def names(draw: st.DrawFn, max_bytes: int = NAME_MAX_BYTES) -> str:
    """Draw a file name of at most max_bytes bytes.

    Most names are short text with spaces, UTF-8 and control characters. Some are exactly
    255 bytes long, and some are raw bytes that are mostly not valid UTF-8, because a tar
    stores names as bytes and the layer image keeps them as they are.
    """
    shape = draw(st.integers(0, 9))
    if shape == 0 and max_bytes >= NAME_MAX_BYTES:
        seed_text = draw(st.text(_NAME_CHARACTERS, min_size=1, max_size=8))
        name = fit_to_bytes(seed_text * NAME_MAX_BYTES, NAME_MAX_BYTES)
    elif shape == 1:
        name = decode_path(draw(_RAW_NAMES)[:max_bytes])
    else:
        name = draw(st.text(_NAME_CHARACTERS, min_size=1, max_size=16))
        name = fit_to_bytes(name, min(len(encode_path(name)), max_bytes))
    if not _is_usable_name(name):
        name = decode_path(encode_path("n" + name)[:max_bytes])
    return name


_MODES: Final = st.one_of(
    st.sampled_from([0o755, 0o644, 0o7777, 0o4755, 0o2755, 0o1777, 0o0]),
    st.integers(0, 0o7777),
)
_IDS: Final = st.one_of(
    st.sampled_from([0, 1, 65534, 65535, 65536, 2**31, ID_MAX]),
    st.integers(0, ID_MAX),
)
_MTIMES_NS: Final = st.one_of(
    st.sampled_from(
        [
            0,
            MTIME_MIN_NS,
            MTIME_MAX_NS,
            -1_000_000_001,  # 1 s and 1 ns before the epoch
            -1_250_000_000,
            (2**31 - 1) * 10**9 + 999_999_999,  # the last nanosecond of signed 32-bit time
            2**31 * 10**9,
            2**32 * 10**9 + 1,
            # Outside ext4's range: the image stores the nearest bound (clamp_mtime_ns).
            MTIME_MIN_NS - 1,
            MTIME_MAX_NS + 1,
            -(2**40) * 10**9 + 7,
            2**40 * 10**9 + 7,
        ]
    ),
    # libarchive 3.6 drops the sign of a PAX time between -1 s and 0 s ("-0.25" reads as
    # 0.25), so the second before the epoch cannot round-trip; the converter documents it.
    st.integers(MTIME_MIN_NS, MTIME_MAX_NS).filter(lambda ns: not -1_000_000_000 < ns < 0),
)
_MAJORS: Final = st.one_of(
    st.sampled_from([0, 1, 255, 256, DEVICE_MAJOR_MAX]), st.integers(0, DEVICE_MAJOR_MAX)
)
_MINORS: Final = st.one_of(
    st.sampled_from([0, 1, 255, 256, 65535, 65536, DEVICE_MINOR_MAX]),
    st.integers(0, DEVICE_MINOR_MAX),
)


_XATTR_VALUES: Final = st.one_of(
    st.binary(max_size=24),  # fits in the inode next to a short name
    st.builds(seeded_bytes, st.integers(0, 2**32), st.integers(25, 300)),
    st.builds(seeded_bytes, st.integers(0, 2**32), st.integers(300, 1500)),
)
_XATTR_SUFFIXES: Final = st.one_of(
    st.text(_PLAIN_CHARACTERS, min_size=1, max_size=24),
    st.text(_PLAIN_CHARACTERS, min_size=100, max_size=200),
)


def capability_value(effective: bool, permitted: int, inheritable: int) -> bytes:
    """Encode a valid security.capability value (struct vfs_cap_data, revision 2, 20 bytes).

    permitted and inheritable are 41-bit masks of capabilities 0..40.
    """
    magic = VFS_CAP_REVISION_2 | (VFS_CAP_FLAGS_EFFECTIVE if effective else 0)
    return struct.pack(
        "<5I",
        magic,
        permitted & 0xFFFF_FFFF,
        inheritable & 0xFFFF_FFFF,
        (permitted >> 32) & CAP_HIGH_MASK,
        (inheritable >> 32) & CAP_HIGH_MASK,
    )


def xattr_cost_bytes(name: str, value: bytes) -> int:
    """Return the bytes one xattr takes in an ext4 xattr block (see XATTR_BUDGET_BYTES)."""
    suffix = name.split(".", 1)[1]
    return XATTR_ENTRY_HEADER_BYTES + -(-len(suffix) // 4) * 4 + -(-len(value) // 4) * 4


@st.composite
def xattr_sets(draw: st.DrawFn, kind: Kind) -> tuple[tuple[str, bytes], ...]:
    """Draw the xattrs of an entry of this kind, within XATTR_BUDGET_BYTES in all.

    The kernel reads user.* only on regular files and directories and security.capability
    only matters on regular files, so other kinds get trusted.* alone.
    """
    namespaces = ["trusted."]
    if kind in (Kind.FILE, Kind.DIRECTORY):
        namespaces.append("user.")
    xattrs: dict[str, bytes] = {}
    if kind is Kind.FILE and draw(st.integers(0, 3)) == 0:
        permitted = draw(st.integers(0, 2**41 - 1))
        inheritable = draw(st.integers(0, 2**41 - 1))
        xattrs["security.capability"] = capability_value(
            draw(st.booleans()), permitted, inheritable
        )

    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 5]))):
        suffix = draw(_XATTR_SUFFIXES)
        name = draw(st.sampled_from(namespaces)) + suffix
        if name.startswith("trusted.overlay."):  # overlayfs reserves these
            continue
        xattrs[name] = draw(_XATTR_VALUES)

    within_budget: dict[str, bytes] = {}
    used = 0
    for name, value in xattrs.items():
        cost = xattr_cost_bytes(name, value)
        if used + cost <= XATTR_BUDGET_BYTES:
            within_budget[name] = value
            used += cost
    return tuple(sorted(within_budget.items()))


@st.composite
def file_data(draw: st.DrawFn) -> FileData:
    """Draw file content: empty, block-sized, up to 3 MiB, or with holes up to 64 MiB."""
    seed = draw(st.integers(0, 2**32))
    shape = draw(st.sampled_from(["small", "boundary", "large", "holes"]))
    if shape == "small":
        return FileData.dense(draw(st.integers(0, 20_000)), seed)
    if shape == "boundary":
        return FileData.dense(draw(st.sampled_from([0, 1, 4095, 4096, 4097, 65536])), seed)
    if shape == "large":
        return FileData.dense(draw(st.integers(MIB, 3 * MIB)), seed)

    # Only the last region may have a length that is not a multiple of 512 bytes, because
    # GNU tar reads each region of a sparse member from whole tar blocks. Offsets are free.
    regions: list[DataRegion] = []
    position = draw(st.sampled_from([0, 1, 4096, 5000, 300_000]))
    count = draw(st.integers(1, 6))
    for index in range(count):
        length = draw(st.integers(1, 40)) * tarfile.BLOCKSIZE
        if index == count - 1:
            length += draw(st.integers(0, tarfile.BLOCKSIZE - 1))
        regions.append(DataRegion(position, length, seed + index))
        position += length + draw(st.sampled_from([1, 4096, 8192, 70_000, 4 * MIB]))
    trailing_hole = draw(st.sampled_from([0, 1, 4096, 8 * MIB]))
    return FileData(regions[-1].end + trailing_hole, tuple(regions))


@st.composite
def symlink_targets(draw: st.DrawFn) -> str:
    """Draw a target, inline (at most 59 bytes) or in a block (60 to 4000 bytes)."""
    length = draw(
        st.one_of(
            st.sampled_from([1, INLINE_SYMLINK_MAX_BYTES, INLINE_SYMLINK_MAX_BYTES + 1, 101]),
            st.integers(1, INLINE_SYMLINK_MAX_BYTES),
            st.integers(INLINE_SYMLINK_MAX_BYTES + 1, SYMLINK_TARGET_MAX_BYTES),
        )
    )
    text = draw(st.text(st.one_of(_NAME_CHARACTERS, st.just("/")), min_size=1, max_size=12))
    return fit_to_bytes(text * (length // max(1, len(encode_path(text))) + 1), length)


_KINDS: Final = (
    Kind.FILE,
    Kind.DIRECTORY,
    Kind.SYMLINK,
    Kind.HARDLINK,
    Kind.CHAR_DEVICE,
    Kind.BLOCK_DEVICE,
    Kind.FIFO,
)


@st.composite
def trees(draw: st.DrawFn, max_entries: int = 30) -> Tree:
    """Draw a tree of up to max_entries entries, optionally below a deep directory chain
    and with an entry ("./") that sets the root directory's metadata."""
    entries: list[Entry] = []
    directories = [""]
    children: dict[str, set[bytes]] = {"": {b"lost+found"}}  # every image has lost+found

    if draw(st.booleans()):
        entries.append(
            Entry(
                path="",
                kind=Kind.DIRECTORY,
                mode=draw(_MODES),
                uid=draw(_IDS),
                gid=draw(_IDS),
                mtime_ns=draw(_MTIMES_NS),
                xattrs=draw(xattr_sets(Kind.DIRECTORY)),
            )
        )

    def add_directory(parent: str, name: str) -> None:
        path = join_path(parent, name)
        entry = Entry(
            path=path,
            kind=Kind.DIRECTORY,
            mode=draw(_MODES),
            uid=draw(_IDS),
            gid=draw(_IDS),
            mtime_ns=draw(_MTIMES_NS),
            xattrs=draw(xattr_sets(Kind.DIRECTORY)),
        )
        entries.append(entry)
        children[parent].add(encode_path(name))
        children[path] = set()
        directories.append(path)

    chain_depth = draw(st.sampled_from([0, 0, 3, 40]))
    parent = ""
    for _ in range(chain_depth):
        add_directory(parent, "d")
        parent = directories[-1]

    for _ in range(draw(st.integers(1, max_entries))):
        # Half of the entries go into the newest directory, which builds deep paths.
        parent = directories[-1] if draw(st.booleans()) else draw(st.sampled_from(directories))
        room = PATH_MAX_BYTES - len(encode_path(parent)) - 1
        if room < 1:
            continue
        name = draw(names(max_bytes=min(NAME_MAX_BYTES, room)))
        if encode_path(name) in children[parent]:
            continue
        path = join_path(parent, name)

        linkable = [entry for entry in entries if entry.kind is not Kind.DIRECTORY]
        kind = draw(st.sampled_from(_KINDS))
        if kind is Kind.HARDLINK and not linkable:
            kind = Kind.FILE

        if kind is Kind.DIRECTORY:
            add_directory(parent, name)
            continue
        children[parent].add(encode_path(name))

        if kind is Kind.HARDLINK:
            target = draw(st.sampled_from(linkable))
            entries.append(Entry(path=path, kind=Kind.HARDLINK, link_target=target.path))
            continue

        entry = Entry(
            path=path,
            kind=kind,
            # A symlink's own mode is always 0777 on Linux, so the tar states exactly that.
            mode=0o777 if kind is Kind.SYMLINK else draw(_MODES),
            uid=draw(_IDS),
            gid=draw(_IDS),
            mtime_ns=draw(_MTIMES_NS),
            xattrs=draw(xattr_sets(kind)),
        )
        if kind is Kind.FILE:
            data = draw(file_data())
            entry = dataclasses.replace(entry, data=data, sparse=draw(st.booleans()))
        elif kind is Kind.SYMLINK:
            entry = dataclasses.replace(entry, link_target=draw(symlink_targets()))
        elif kind in (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE):
            entry = dataclasses.replace(entry, major=draw(_MAJORS), minor=draw(_MINORS))
        entries.append(entry)

    return Tree(
        entries=arrange(entries, draw(st.sampled_from(Order))),
        member_prefix=draw(st.sampled_from(["", "./"])),
    )


def all_kinds_tree() -> Tree:
    """Return a fixed tree with every entry kind and the boundary values the strategies aim at."""
    capability = capability_value(effective=True, permitted=(1 << 10) | (1 << 40), inheritable=0)
    holes = FileData(9 * MIB, (DataRegion(4096, 8192, 3), DataRegion(4 * MIB + 100, 1000, 4)))
    entries = [
        Entry(
            "dir",
            Kind.DIRECTORY,
            mode=0o2755,
            uid=1000,
            gid=1000,
            mtime_ns=1_700_000_000_123_456_789,
            xattrs=(("user.note", b"fits in the inode"),),
        ),
        Entry("dir/sticky", Kind.DIRECTORY, mode=0o1777, mtime_ns=-1_000_000_001),
        Entry("dir/empty", Kind.FILE, mode=0o4755, mtime_ns=MTIME_MIN_NS, data=FileData(0)),
        Entry(
            "dir/block-plus-one",
            Kind.FILE,
            uid=ID_MAX,
            gid=ID_MAX - 1,
            mtime_ns=MTIME_MAX_NS,
            data=FileData.dense(4097, 1),
            xattrs=(
                ("security.capability", capability),
                ("trusted.large", seeded_bytes(2, 1500)),
                ("user.small", b"v"),
            ),
        ),
        Entry("dir/holes-sparse", Kind.FILE, mtime_ns=-1_250_000_000, data=holes, sparse=True),
        Entry("dir/holes-dense", Kind.FILE, mode=0o600, data=holes),
        Entry("dir/inline", Kind.SYMLINK, mode=0o777, link_target="t" * INLINE_SYMLINK_MAX_BYTES),
        Entry("dir/in-block", Kind.SYMLINK, mode=0o777, link_target="../" * 100 + "target"),
        Entry("dir/hard", Kind.HARDLINK, link_target="dir/block-plus-one"),
        Entry("dir/fifo", Kind.FIFO, mode=0o4640, xattrs=(("trusted.fifo", b"x" * 200),)),
        Entry("dir/fifo-link", Kind.HARDLINK, link_target="dir/fifo"),
        Entry("dev", Kind.DIRECTORY, mode=0o755),
        Entry("dev/null", Kind.CHAR_DEVICE, mode=0o666, major=1, minor=3),
        Entry(
            "dev/largest",
            Kind.CHAR_DEVICE,
            mode=0o600,
            major=DEVICE_MAJOR_MAX,
            minor=DEVICE_MINOR_MAX,
        ),
        Entry("dev/nvme", Kind.BLOCK_DEVICE, mode=0o660, gid=6, major=259, minor=65536),
        Entry(fit_to_bytes("\u00e9" * NAME_MAX_BYTES, NAME_MAX_BYTES), Kind.FILE, data=FileData(0)),
        Entry("a name with spaces, \u00fc and \u2603", Kind.FILE, data=FileData.dense(10, 5)),
    ]
    parent = "deep"
    entries.append(Entry(parent, Kind.DIRECTORY, mode=0o700))
    for level in range(12):
        parent = join_path(parent, f"level-{level:02d}-" + "x" * 200)
        entries.append(Entry(parent, Kind.DIRECTORY, mode=0o750))
    entries.append(Entry(join_path(parent, "leaf"), Kind.FILE, data=FileData.dense(100, 6)))
    return Tree(tuple(entries))
