"""Read images back with lcow's own reader, in the formats that the oracle helpers use.

:func:`reader_snapshot` records a tree as :func:`oracle.snapshot_tree` records the kernel's
view of it, so a test can compare what ``Ext4Reader`` returns with a loop mount, field by
field. The other helpers open images and turn change lists into plain values for asserts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import oracle
from lcow.disk import open_disk
from lcow.ext4.format import EXT4_ROOT_INO
from lcow.ext4.reader import Ext4Reader, InodeInfo
from lcow.layer.changes import Change, ChangeKind

# ext4 keeps inline file data in the xattr "system.data". Linux (checked with 6.18) does not
# list it, so a snapshot of the reader's view leaves it out as well.
INLINE_DATA_XATTR: Final = b"system.data"
ZERO_CHUNK_BYTES: Final = 1 << 20


@contextlib.contextmanager
def open_reader(image: Path) -> Iterator[Ext4Reader]:
    """Yield a reader for the ext4 in ``image``: raw, fixed VHD or VHDX."""
    with open_disk(image) as disk:
        yield Ext4Reader(disk.device, disk.size_bytes)


def content_sha256(reader: Ext4Reader, inode: InodeInfo) -> str:
    """Return the SHA-256 of a file's logical content, holes read as zeros."""
    digest = hashlib.sha256()
    position = 0
    for offset, data in reader.read_data(inode.number):
        if offset < position:
            raise AssertionError(
                f"inode {inode.number}: read_data returned offset {offset} after {position}"
            )
        for zeros in zero_chunks(offset - position):
            digest.update(zeros)
        digest.update(data)
        position = offset + len(data)
    if position > inode.size:
        raise AssertionError(
            f"inode {inode.number}: read_data returned {position} bytes of a {inode.size}-byte file"
        )
    for zeros in zero_chunks(inode.size - position):
        digest.update(zeros)
    return digest.hexdigest()


def zero_chunks(length: int) -> Iterator[bytes]:
    """Yield ``length`` zero bytes in chunks of at most 1 MiB."""
    zeros = bytes(min(length, ZERO_CHUNK_BYTES))
    while length > 0:
        step = min(length, len(zeros))
        yield zeros[:step]
        length -= step


def reader_snapshot(reader: Ext4Reader, top: int = EXT4_ROOT_INO) -> oracle.Snapshot:
    """Record the tree below inode ``top`` (``top`` itself as ``.``) as snapshot_tree does."""
    entries: list[tuple[bytes, InodeInfo]] = [(oracle.ROOT, reader.inode(top))]
    entries.extend(reader.walk(top))

    names_of_inode: dict[int, list[bytes]] = {}
    for path, inode in entries:
        if not stat.S_ISDIR(inode.mode):
            names_of_inode.setdefault(inode.number, []).append(path)

    snapshot: oracle.Snapshot = {}
    for path, inode in entries:
        names = tuple(sorted(names_of_inode.get(inode.number, [])))
        snapshot[path] = _record(reader, inode, names)
    return dict(sorted(snapshot.items()))


def _record(
    reader: Ext4Reader, inode: InodeInfo, hardlinks: tuple[bytes, ...]
) -> oracle.EntryRecord:
    file_type = stat.S_IFMT(inode.mode)
    is_directory = file_type == stat.S_IFDIR
    sha256 = content_sha256(reader, inode) if file_type == stat.S_IFREG else None
    symlink_target = reader.read_symlink(inode.number) if file_type == stat.S_IFLNK else None
    rdev = None
    if file_type in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = (inode.rdev_major, inode.rdev_minor)
    xattrs = tuple(
        sorted(
            (os.fsdecode(name), value)
            for name, value in inode.xattrs.items()
            if name != INLINE_DATA_XATTR
        )
    )
    return oracle.EntryRecord(
        kind=oracle.FILE_KINDS.get(file_type, f"unknown type {file_type:#o}"),
        mode=stat.S_IMODE(inode.mode),
        uid=inode.uid,
        gid=inode.gid,
        size=None if is_directory else inode.size,
        sha256=sha256,
        mtime_ns=inode.mtime_ns,
        xattrs=xattrs,
        symlink_target=symlink_target,
        rdev=rdev,
        hardlinks=() if is_directory else hardlinks,
    )


def change_pairs(changes: Iterable[Change]) -> list[tuple[str, ChangeKind]]:
    """Return changes as sorted (path, kind) pairs, paths decoded for readable diffs."""
    return sorted((os.fsdecode(change.path), change.kind) for change in changes)


def gnu_tar_names(tar_path: Path) -> list[str]:
    """List a tar's member names with GNU tar, normalized and sorted."""
    result = oracle.run_tool(
        ["tar", "--list", f"--file={tar_path}", "--quoting-style=literal"],
        environment=dict(os.environ, LC_ALL="C.UTF-8"),
    )
    return sorted(posixpath.normpath(line) for line in result.stdout.splitlines())
