"""Reference trees and checks for layer images, built on tools that lcow does not contain.

GNU tar extracts a layer into the reference tree, e2fsck (e2fsprogs) checks an image's
metadata, and the kernel's own ext4 driver reads the image back through a loop mount. The
helpers here snapshot both trees in one format, turn the reference into the form that a
converted layer has (overlayfs whiteouts, implicit directories) and list every difference.

Most helpers need root: GNU tar restores owners, device nodes and ``trusted.*`` xattrs only
for root, and only root can attach loop devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import IO, Final, NoReturn, TypeAlias

import pytest
import zstandard

VHD_FOOTER_SIZE_BYTES: Final = 512

# Overlayfs forms of the two whiteout kinds that a layer tar carries as names.
WHITEOUT_PREFIX: Final = b".wh."
OPAQUE_MARKER: Final = b".wh..wh..opq"
OPAQUE_XATTR: Final = "trusted.overlay.opaque"
OPAQUE_XATTR_VALUE: Final = b"y"

# Metadata that the converter gives a directory the tar names only as a parent. The mtime is
# read from the converter when it defines one (see implicit_directory_mtime_ns).
IMPLICIT_DIRECTORY_MODE: Final = 0o755
IMPLICIT_DIRECTORY_OWNER: Final = (0, 0)
DEFAULT_IMPLICIT_DIRECTORY_MTIME_NS: Final = 0

# mke2fs creates lost+found in every ext4 it formats. Layer tars normally do not contain it.
LOST_AND_FOUND: Final = b"lost+found"
LOST_AND_FOUND_MODE: Final = 0o700

ROOT: Final = b"."
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"

# Debian packages that provide each external tool, for the message when one is missing.
TOOL_PACKAGES: Final = {
    "tar": "tar",
    "zstd": "zstd",
    "e2fsck": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "qemu-img": "qemu-utils",
}


# --- skipping ------------------------------------------------------------------------------


def in_ci() -> bool:
    """Return True when the environment variable CI is set to a non-empty value."""
    return bool(os.environ.get("CI"))


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the current test with ``reason``, or fail it when running in CI.

    CI must run every test, so a missing tool, privilege or corpus there is an error in the
    CI setup and not a reason to pass.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so the test fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    """Skip (or fail in CI) unless the tests run as root."""
    if os.geteuid() != 0:
        skip_or_fail("loop mounts, device nodes and trusted.* xattrs need root; run as root")


def require_tool(name: str) -> str:
    """Return the path of the external program ``name``, or skip (fail in CI) without it."""
    path = find_tool(name)
    if path is None:
        package = TOOL_PACKAGES.get(name, name)
        skip_or_fail(f"{name} not found on PATH; install the Debian package {package}")
    return path


def find_tool(name: str) -> str | None:
    """Return the path of ``name`` on PATH or in the sbin folders, where Debian keeps e2fsprogs."""
    search_path = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )
    return shutil.which(name, path=search_path)


class ToolError(RuntimeError):
    """An external program that a test relies on exited with a non-zero status."""


def run_tool(
    arguments: Sequence[str], *, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an external program and return its result, or raise ToolError if it fails."""
    program = require_tool(arguments[0])
    result = subprocess.run(
        [program, *arguments[1:]],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        check=False,
        env=environment,
    )
    if result.returncode != 0:
        raise ToolError(
            f"{' '.join(arguments)} failed with exit status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


# --- snapshots -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class EntryRecord:
    """Metadata and content digest of one path in a tree, as lstat and the xattr calls see it.

    A directory's size is None and is never compared. Each filesystem reports the bytes of
    the blocks that contain its entries, and ext4 reports a multiple of the block size that
    never shrinks. So a correct image and GNU tar's extraction report different sizes.
    Access and change times are not recorded either, because reading a file sets atime and
    the kernel sets ctime to the moment of extraction, which no tool can restore.
    """

    kind: str  # "regular", "directory", "symlink", "character device", ...
    mode: int  # the 12 permission bits: rwx for user, group and others, setuid, setgid, sticky
    uid: int
    gid: int
    size: int | None  # bytes, or None for directories
    sha256: str | None  # hex digest of a regular file's content
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]  # every namespace, sorted by name
    symlink_target: bytes | None
    rdev: tuple[int, int] | None  # (major, minor) of a device node
    hardlinks: tuple[bytes, ...]  # sorted paths that share this inode, () for directories


Snapshot: TypeAlias = dict[bytes, EntryRecord]

FILE_KINDS: Final = {
    stat.S_IFREG: "regular",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def snapshot_tree(root: Path) -> Snapshot:
    """Record every path under ``root`` (``root`` itself as ``.``), sorted by path.

    Keys are relative paths as bytes, so names that are not valid UTF-8 survive. Symlinks
    are never followed, and hard links are found by the (device, inode) pairs that paths
    share.
    """
    found: dict[bytes, tuple[Path, os.stat_result]] = {}
    pending = [(root, ROOT)]
    while pending:
        path, relative = pending.pop()
        status = path.lstat()
        found[relative] = (path, status)
        if stat.S_ISDIR(status.st_mode):
            for child in path.iterdir():
                name = os.fsencode(child.name)
                pending.append((child, name if relative == ROOT else relative + b"/" + name))

    # Group the non-directories by inode before building records, because each record
    # carries its whole hard-link group.
    inode_paths: dict[tuple[int, int], list[bytes]] = {}
    for relative, (_, status) in found.items():
        if not stat.S_ISDIR(status.st_mode):
            inode_paths.setdefault((status.st_dev, status.st_ino), []).append(relative)

    snapshot: Snapshot = {}
    for relative in sorted(found):
        path, status = found[relative]
        group = inode_paths.get((status.st_dev, status.st_ino), [])
        snapshot[relative] = _record(path, status, tuple(sorted(group)))
    return snapshot


def _record(path: Path, status: os.stat_result, hardlinks: tuple[bytes, ...]) -> EntryRecord:
    file_type = stat.S_IFMT(status.st_mode)
    kind = FILE_KINDS.get(file_type, f"unknown type {file_type:#o}")
    is_directory = file_type == stat.S_IFDIR

    sha256 = None
    if file_type == stat.S_IFREG:
        with path.open("rb") as content:
            sha256 = hashlib.file_digest(content, "sha256").hexdigest()

    symlink_target = None
    if file_type == stat.S_IFLNK:
        symlink_target = os.readlink(os.fsencode(path))  # noqa: PTH115 - Path.readlink normalizes the target

    rdev = None
    if file_type in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = (os.major(status.st_rdev), os.minor(status.st_rdev))

    return EntryRecord(
        kind=kind,
        mode=stat.S_IMODE(status.st_mode),
        uid=status.st_uid,
        gid=status.st_gid,
        size=None if is_directory else status.st_size,
        sha256=sha256,
        mtime_ns=status.st_mtime_ns,
        xattrs=_read_xattrs(path),
        symlink_target=symlink_target,
        rdev=rdev,
        hardlinks=() if is_directory else hardlinks,
    )


def _read_xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    names = sorted(os.listxattr(path, follow_symlinks=False))
    return tuple((name, os.getxattr(path, name, follow_symlinks=False)) for name in names)


# --- the reference tree --------------------------------------------------------------------


def extract_with_gnu_tar(tar_path: Path, dest: Path) -> None:
    """Extract a layer tar (plain, gzip or zstd) into ``dest`` with GNU tar, as root.

    GNU tar detects the compression itself when it reads a file. It restores sparse members
    with their holes without an option, because ``--sparse`` only affects creating an archive
    (checked with GNU tar 1.34).
    """
    dest.mkdir(parents=True, exist_ok=True)
    arguments = [
        "tar",
        "--extract",
        f"--file={tar_path}",
        f"--directory={dest}",
        "--numeric-owner",
        "--same-owner",
        "--same-permissions",
        "--xattrs",
        "--xattrs-include=*",
        # By default GNU tar restores a directory's mtime as soon as it extracts a member
        # outside that directory. A member that comes later and lands in the directory then
        # changes the mtime again (seen with GNU tar 1.34 on bytewise-sorted layers). This
        # option postpones all directory metadata to the end, so mtimes are exact.
        "--delay-directory-restore",
    ]
    # A UTF-8 locale keeps tar from converting PAX names, which are UTF-8, to another charset.
    environment = dict(os.environ, LC_ALL="C.UTF-8")
    run_tool(arguments, environment=environment)


@dataclasses.dataclass(frozen=True, slots=True)
class TarMember:
    """One member of a tar archive, as the standard library's tarfile reads its header."""

    name: bytes  # normalized: no "./" or "/" at the start, no "/" at the end, "." for the root
    size: int  # the header's size field: 0 for hard links, devices and directories


def normalize_member_name(name: str) -> bytes:
    """Return a member name as the path GNU tar extracts it to, relative to the target."""
    normalized = posixpath.normpath(os.fsencode(name)).lstrip(b"/")
    return normalized or ROOT


def list_tar_members(tar_path: Path) -> list[TarMember]:
    """List the members of a plain, gzip or zstd tar in archive order.

    The standard library's tarfile reads the headers, so the member list does not depend on
    lcow's own tar reader. It has no zstd support, so zstd streams go through zstandard.
    """
    with tar_path.open("rb") as raw:
        magic = raw.read(len(ZSTD_MAGIC))
        raw.seek(0)
        stream: IO[bytes] = raw
        if magic == ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            return [
                TarMember(name=normalize_member_name(member.name), size=member.size)
                for member in archive
            ]


def implicit_directory_mtime_ns() -> int:
    """Return the mtime the converter gives implicit directories, or the documented default.

    The converter may define ``IMPLICIT_DIRECTORY_MTIME_NS`` in ``lcow.layer.tar2ext4``. When
    the module or the constant is missing, the value is 0 (1970-01-01).
    """
    try:
        module = importlib.import_module("lcow.layer.tar2ext4")
    except ModuleNotFoundError as error:
        if error.name not in {"lcow.layer", "lcow.layer.tar2ext4"}:
            raise
        return DEFAULT_IMPLICIT_DIRECTORY_MTIME_NS
    value = getattr(module, "IMPLICIT_DIRECTORY_MTIME_NS", DEFAULT_IMPLICIT_DIRECTORY_MTIME_NS)
    if not isinstance(value, int):
        raise TypeError(f"IMPLICIT_DIRECTORY_MTIME_NS must be an int, not {value!r}")
    return value


def expected_from_tar_extraction(
    snapshot: Snapshot,
    *,
    members: Collection[bytes] | None = None,
    implicit_mtime_ns: int | None = None,
) -> Snapshot:
    """Turn a snapshot of GNU tar's extraction into the tree that the converted image contains.

    - A directory that is not in ``members`` (normalized names of the tar's members) was
      created by GNU tar as a parent, with the umask and the current time. The converter
      gives it mode 0755, owner 0:0, no xattrs and ``implicit_mtime_ns``. When ``members`` is
      None, no directory is treated as implicit.
    - ``DIR/.wh..wh..opq`` is removed and DIR gets the xattr ``trusted.overlay.opaque=y``.
    - ``DIR/.wh.NAME`` becomes a character device 0/0 named ``DIR/NAME`` that keeps the
      whiteout's mode, owner, mtime and xattrs.

    Raises ValueError for inputs whose converted form the converter does not define: other
    ``.wh..wh.`` names (aufs metadata), a whiteout next to the path it hides, and a whiteout
    or marker that is not a single regular file.
    """
    if implicit_mtime_ns is None:
        implicit_mtime_ns = implicit_directory_mtime_ns()
    expected = dict(snapshot)

    if members is not None:
        explicit = frozenset(members)
        for path, record in snapshot.items():
            if record.kind == "directory" and path not in explicit:
                uid, gid = IMPLICIT_DIRECTORY_OWNER
                expected[path] = dataclasses.replace(
                    record,
                    mode=IMPLICIT_DIRECTORY_MODE,
                    uid=uid,
                    gid=gid,
                    mtime_ns=implicit_mtime_ns,
                    xattrs=(),
                )

    for path, record in snapshot.items():
        parent, name = posixpath.split(path)
        if not name.startswith(WHITEOUT_PREFIX):
            continue
        _check_single_regular_file(path, record)
        if name == OPAQUE_MARKER:
            directory = parent or ROOT
            del expected[path]
            expected[directory] = _with_xattr(expected[directory], OPAQUE_XATTR, OPAQUE_XATTR_VALUE)
        elif name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            raise ValueError(f"{_show(path)}: unsupported whiteout metadata entry")
        else:
            hidden_path = posixpath.join(parent, name[len(WHITEOUT_PREFIX) :])
            if hidden_path in snapshot:
                raise ValueError(
                    f"{_show(path)}: the layer contains both the whiteout and its path"
                )
            del expected[path]
            expected[hidden_path] = dataclasses.replace(
                record,
                kind="character device",
                size=0,
                sha256=None,
                rdev=(0, 0),
                hardlinks=(hidden_path,),
            )
    return dict(sorted(expected.items()))


def _check_single_regular_file(path: bytes, record: EntryRecord) -> None:
    if record.kind != "regular":
        raise ValueError(f"{_show(path)}: whiteout entry is a {record.kind}, not a regular file")
    if len(record.hardlinks) != 1:
        raise ValueError(f"{_show(path)}: whiteout entry is hard-linked to {record.hardlinks!r}")


def _with_xattr(record: EntryRecord, name: str, value: bytes) -> EntryRecord:
    xattrs = dict(record.xattrs)
    xattrs[name] = value
    return dataclasses.replace(record, xattrs=tuple(sorted(xattrs.items())))


def split_lost_found(snapshot: Snapshot) -> tuple[Snapshot, list[str]]:
    """Return the snapshot without lost+found and the problems found with lost+found.

    An image must contain ``lost+found`` as an empty directory with mode 0700 owned by 0:0.
    Its mtime is not checked. A layer that brings its own lost+found is not handled.
    """
    problems: list[str] = []
    record = snapshot.get(LOST_AND_FOUND)
    if record is None:
        problems.append("lost+found: missing")
    else:
        checks = [
            ("kind", "directory", record.kind),
            ("mode", LOST_AND_FOUND_MODE, record.mode),
            ("uid", 0, record.uid),
            ("gid", 0, record.gid),
        ]
        for field, expected_value, actual_value in checks:
            if expected_value != actual_value:
                problems.append(
                    f"lost+found: {field}: expected {_describe(field, expected_value)}, "
                    f"actual {_describe(field, actual_value)}"
                )

    prefix = LOST_AND_FOUND + b"/"
    children = [path for path in snapshot if path.startswith(prefix)]
    problems.extend(f"{_show(path)}: unexpected entry in lost+found" for path in children)

    remaining = {
        path: entry
        for path, entry in snapshot.items()
        if path != LOST_AND_FOUND and not path.startswith(prefix)
    }
    return remaining, problems


# --- comparison ----------------------------------------------------------------------------


def compare_trees(expected: Snapshot, actual: Snapshot) -> list[str]:
    """List the differences between two snapshots, one line each, sorted by path.

    A line has the form ``PATH: FIELD: expected VALUE, actual VALUE``, or reports a path as
    missing or unexpected. The list is empty when the trees are equal.
    """
    differences: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        expected_record = expected.get(path)
        actual_record = actual.get(path)
        if actual_record is None and expected_record is not None:
            differences.append(f"{_show(path)}: missing (expected a {expected_record.kind})")
        elif expected_record is None and actual_record is not None:
            differences.append(f"{_show(path)}: unexpected {actual_record.kind}")
        elif expected_record is not None and actual_record is not None:
            differences.extend(_compare_records(path, expected_record, actual_record))
    return differences


def _compare_records(path: bytes, expected: EntryRecord, actual: EntryRecord) -> list[str]:
    differences: list[str] = []
    for field in dataclasses.fields(EntryRecord):
        expected_value = getattr(expected, field.name)
        actual_value = getattr(actual, field.name)
        if expected_value == actual_value:
            continue
        if field.name == "xattrs":
            differences.extend(_compare_xattrs(path, dict(expected_value), dict(actual_value)))
        else:
            differences.append(
                f"{_show(path)}: {field.name}: expected {_describe(field.name, expected_value)}, "
                f"actual {_describe(field.name, actual_value)}"
            )
    return differences


def _compare_xattrs(path: bytes, expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    differences: list[str] = []
    for name in sorted(expected.keys() | actual.keys()):
        expected_value = expected.get(name)
        actual_value = actual.get(name)
        if expected_value == actual_value:
            continue
        expected_text = "missing" if expected_value is None else repr(expected_value)
        actual_text = "missing" if actual_value is None else repr(actual_value)
        differences.append(
            f"{_show(path)}: xattr {name}: expected {expected_text}, actual {actual_text}"
        )
    return differences


def _show(path: bytes) -> str:
    return path.decode(errors="backslashreplace")


def _describe(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:#o}"
    if field == "mtime_ns" and isinstance(value, int):
        return f"{value} ({_format_time_ns(value)})"
    if field == "hardlinks" and isinstance(value, tuple):
        return "(" + ", ".join(_show(path) for path in value) + ")"
    return repr(value)


def _format_time_ns(time_ns: int) -> str:
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return "out of datetime's range"
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanoseconds:09d}Z"


def format_differences(differences: Sequence[str], limit: int = 50) -> str:
    """Join the first ``limit`` differences into a failure message with a count."""
    first_lines = "\n".join(differences[:limit])
    omitted_count = len(differences) - limit
    omitted = f"\n... and {omitted_count} more" if omitted_count > 0 else ""
    return f"{len(differences)} differences:\n{first_lines}{omitted}"


# --- images --------------------------------------------------------------------------------


@contextlib.contextmanager
def loop_mount(image: Path, *, read_only: bool = True) -> Iterator[Path]:
    """Attach ``image`` to a free loop device, mount it as ext4 and yield the mount point.

    The mount point is a new temporary directory. On exit, also when the body raises, the
    filesystem is unmounted, the loop device that this call attached is detached and the
    directory is removed. A layer.vhd mounts as a whole because the kernel takes the
    filesystem's size from the superblock and ignores the footer after it.
    """
    require_root()
    with contextlib.ExitStack() as cleanup:
        mountpoint = Path(tempfile.mkdtemp(prefix="lcow-mount-"))
        cleanup.callback(mountpoint.rmdir)

        attach = ["losetup", "--find", "--show"]
        if read_only:
            attach.append("--read-only")
        device = run_tool([*attach, str(image)]).stdout.strip()
        if not device.startswith("/dev/loop"):
            raise ToolError(f"losetup printed {device!r} instead of a loop device path")
        cleanup.callback(run_tool, ["losetup", "--detach", device])

        # nosuid, nodev and noexec because the image is test output: the tests only stat
        # and read its files.
        access = "ro" if read_only else "rw"
        options = f"{access},nosuid,nodev,noexec"
        run_tool(["mount", "-t", "ext4", "-o", options, device, str(mountpoint)])
        cleanup.callback(run_tool, ["umount", str(mountpoint)])

        yield mountpoint


def e2fsck_clean(image: Path) -> None:
    """Raise AssertionError unless ``e2fsck -fn`` finds no problem in the image.

    The image may end with a VHD footer: e2fsck only rejects a file that is shorter than the
    block count in the superblock, and extra bytes after the filesystem are accepted
    (checked with e2fsprogs 1.47.0).
    """
    program = require_tool("e2fsck")
    arguments = ["e2fsck", "-f", "-n", str(image)]
    result = subprocess.run(
        [program, *arguments[1:]],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(arguments)} exited with status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def ext4_size_bytes(image: Path) -> int:
    """Return the filesystem size that the ext4 superblock states (block count x block size)."""
    output = run_tool(["dumpe2fs", "-h", str(image)]).stdout
    fields: dict[str, str] = {}
    for line in output.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields[key.strip()] = value.strip()
    return int(fields["Block count"]) * int(fields["Block size"])


def vhd_virtual_size_bytes(image: Path) -> int:
    """Return the disk size that QEMU reads from a fixed VHD's footer."""
    output = run_tool(["qemu-img", "info", "--output=json", "-f", "vpc", str(image)]).stdout
    info = json.loads(output)
    size = info["virtual-size"]
    if not isinstance(size, int):
        raise ToolError(f"qemu-img info returned a virtual-size of {size!r}")
    return size
