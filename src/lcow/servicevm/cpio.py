"""Write initramfs archives: cpio in the "new ASCII" (newc) format that Linux unpacks.

Reference: the kernel's Documentation/driver-api/early-userspace/buffer-format.rst. Each
member is a 110-byte header of ``070701`` and 13 eight-digit hexadecimal fields, the name
with its NUL padded to a multiple of 4 bytes, then the data padded to a multiple of 4. The
archive ends with a member named ``TRAILER!!!``. Several archives may follow each other in
one initrd, and a later member replaces an earlier one of the same name.
"""

import io
import stat
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"070701"
TRAILER: Final = "TRAILER!!!"
ALIGNMENT_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class Member:
    """One file, directory or symlink of an archive; ``data`` is a symlink's target."""

    name: str  # relative to the guest's root, without a leading slash
    mode: int  # file type and permission bits, as in st_mode
    data: bytes = b""
    mtime: int = 0


def _padding(length: int) -> bytes:
    return b"\0" * (-length % ALIGNMENT_BYTES)


def _header(member: Member, inode: int) -> bytes:
    name = member.name.encode() + b"\0"
    fields = (
        inode,
        member.mode,
        0,  # uid: everything in the guest belongs to root
        0,  # gid
        2 if stat.S_ISDIR(member.mode) else 1,  # nlink
        member.mtime,
        len(member.data),
        0,  # devmajor
        0,  # devminor
        0,  # rdevmajor
        0,  # rdevminor
        len(name),
        0,  # check: only used by the "070702" format
    )
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _padding(len(header) + len(name))


def write_archive(members: list[Member]) -> bytes:
    """Return the newc archive of ``members`` in the given order, with the trailer."""
    output = io.BytesIO()
    for inode, member in enumerate([*members, Member(TRAILER, 0)], start=1):
        output.write(_header(member, inode))
        output.write(member.data)
        output.write(_padding(len(member.data)))
    return output.getvalue()
