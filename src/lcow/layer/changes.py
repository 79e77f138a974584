"""Changes and DiffSize as Docker defines them, from layer images and sandboxes.

A change is a path starting with ``/`` and a kind: 0 modify, 1 add, 2 delete. The rules:

- An entry of the layer is an add when the layers below do not show that path, else a
  modify. A whiteout (character device 0/0) is a delete.
- An opaque directory is a modify (an add when nothing below shows it), and each entry that
  the layers below show inside it, and the layer does not have, is a delete.
- A delete of a directory does not list the directory's children.
- An image's own empty ``lost+found`` is no change: e2fsck wants it in every image.
- A directory that contains a change is listed as modified unless it was added.

When the layers compared are not a layer and its own parent, the two merged views are
compared instead: an entry whose type, permissions, owner or device differs is a modify,
and so is a non-directory whose size, mtime or capability xattr differs, as Docker's
ChangesDirs decides.
"""

import enum
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from lcow.ext4 import format as fmt
from lcow.ext4.reader import Ext4Reader, InodeInfo

OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
CAPABILITY_XATTR: Final = b"security.capability"
LOST_AND_FOUND: Final = b"lost+found"


class ChangeKind(enum.IntEnum):
    """Docker's change kinds (pkg/archive ChangeType)."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclass(slots=True, init=False, unsafe_hash=True)
class Change:
    """One changed path, starting with ``/``."""

    path: Final[bytes]
    kind: Final[ChangeKind]

    def __init__(self, path: bytes, kind: ChangeKind) -> None:
        # Written out so that mypyc compiles it (lcow.compiled).
        self.path = path
        self.kind = kind


def _is_whiteout(inode: InodeInfo) -> bool:
    return inode.file_type == fmt.S_IFCHR and inode.rdev_major == 0 and inode.rdev_minor == 0


def _is_opaque(inode: InodeInfo) -> bool:
    return inode.file_type == fmt.S_IFDIR and inode.xattrs.get(OPAQUE_XATTR) == b"y"


class LayerTree:
    """One layer's tree: an image's root, or a sandbox's ``upper/`` directory."""

    def __init__(self, reader: Ext4Reader, top: int = fmt.EXT4_ROOT_INO) -> None:
        self.reader = reader
        self.top = top
        self._listings: dict[int, dict[bytes, int]] = {}
        self._inodes: dict[int, InodeInfo] = {}

    def inode(self, number: int) -> InodeInfo:
        cached = self._inodes.get(number)
        if cached is None:
            cached = self._inodes[number] = self.reader.inode(number)
        return cached

    def listing(self, directory: int) -> dict[bytes, int]:
        cached = self._listings.get(directory)
        if cached is None:
            cached = {name: number for name, number, _ in self.reader.iterdir(directory)}
            self._listings[directory] = cached
        return cached


class MergedView:
    """The union of layer trees as overlayfs shows it, top layer first."""

    def __init__(self, layers: Sequence[LayerTree]) -> None:
        self.layers = list(layers)

    def lookup(self, path: Sequence[bytes]) -> tuple[LayerTree, InodeInfo] | None:
        """Return the layer and inode that the merged view shows at ``path``, or None."""
        for layer in self.layers:
            node = layer.inode(layer.top)
            hidden_below = _is_opaque(node)
            for index, name in enumerate(path):
                if node.file_type != fmt.S_IFDIR:
                    return None
                number = layer.listing(node.number).get(name)
                if number is None:
                    break
                node = layer.inode(number)
                if _is_whiteout(node):
                    return None
                if index < len(path) - 1 and _is_opaque(node):
                    hidden_below = True
            else:
                return layer, node
            if hidden_below or (node.file_type != fmt.S_IFDIR):
                return None
        return None

    def children(self, path: Sequence[bytes]) -> dict[bytes, tuple[LayerTree, InodeInfo]]:
        """List what the merged view shows in the directory at ``path``."""
        shown: dict[bytes, tuple[LayerTree, InodeInfo]] = {}
        hidden: set[bytes] = set()
        for layer in self.layers:
            node = layer.inode(layer.top)
            found = True
            for name in path:
                number = (
                    layer.listing(node.number).get(name) if node.file_type == fmt.S_IFDIR else None
                )
                if number is None:
                    found = False
                    break
                node = layer.inode(number)
                if _is_whiteout(node):
                    return shown
            if not found:
                continue
            if node.file_type != fmt.S_IFDIR:
                return shown
            for name, number in layer.listing(node.number).items():
                if name in shown or name in hidden:
                    continue
                child = layer.inode(number)
                if _is_whiteout(child):
                    hidden.add(name)
                else:
                    shown[name] = (layer, child)
            if _is_opaque(node):
                return shown
        return shown


def _join(path: Sequence[bytes]) -> bytes:
    return b"/" + b"/".join(path)


def layer_changes(layer: LayerTree, lower: MergedView) -> list[Change]:
    """List the changes ``layer`` makes on top of ``lower`` (its own parent chain)."""
    changes: list[Change] = []
    _walk_layer(layer, lower, layer.top, [], changes)
    return sorted(changes, key=lambda change: change.path)


def _walk_layer(
    layer: LayerTree, lower: MergedView, directory: int, path: list[bytes], out: list[Change]
) -> None:
    for name, number in sorted(layer.listing(directory).items()):
        child_path = [*path, name]
        inode = layer.inode(number)
        if _is_own_lost_and_found(layer, path, name, inode):
            continue
        below = lower.lookup(child_path)
        if _is_whiteout(inode):
            out.append(Change(_join(child_path), ChangeKind.DELETE))
            continue
        out.append(
            Change(_join(child_path), ChangeKind.ADD if below is None else ChangeKind.MODIFY)
        )
        if inode.file_type != fmt.S_IFDIR:
            continue
        if _is_opaque(inode) and below is not None and below[1].file_type == fmt.S_IFDIR:
            own = layer.listing(number)
            out.extend(
                Change(_join([*child_path, hidden]), ChangeKind.DELETE)
                for hidden in sorted(lower.children(child_path))
                if hidden not in own
            )
        _walk_layer(layer, lower, number, child_path, out)


def _is_own_lost_and_found(
    layer: LayerTree, path: list[bytes], name: bytes, inode: InodeInfo
) -> bool:
    """Tell whether this is an image's empty lost+found, which no tar put there."""
    return (
        not path
        and name == LOST_AND_FOUND
        and layer.top == fmt.EXT4_ROOT_INO
        and inode.file_type == fmt.S_IFDIR
        and not layer.listing(inode.number)
    )


def _differs(old: InodeInfo, new: InodeInfo) -> bool:
    if (old.mode, old.uid, old.gid, old.rdev_major, old.rdev_minor) != (
        new.mode,
        new.uid,
        new.gid,
        new.rdev_major,
        new.rdev_minor,
    ):
        return True
    if stat.S_ISDIR(new.mode):
        return False  # a directory's size and mtime are no measure of change, as in Docker
    if old.size != new.size or old.mtime_ns != new.mtime_ns:
        return True
    return old.xattrs.get(CAPABILITY_XATTR) != new.xattrs.get(CAPABILITY_XATTR)


def tree_changes(new: MergedView, old: MergedView) -> list[Change]:
    """List the changes that turn the merged view ``old`` into ``new``."""
    changes: list[Change] = []
    _compare(new, old, [], changes)
    return sorted(changes, key=lambda change: change.path)


def _compare(new: MergedView, old: MergedView, path: list[bytes], out: list[Change]) -> bool:
    """Append the changes below ``path``; return True when there was any."""
    new_children = new.children(path)
    old_children = old.children(path)
    changed = False
    for name in sorted(set(new_children) | set(old_children)):
        child_path = [*path, name]
        if not path and name == LOST_AND_FOUND and _empty_or_missing(new, old, name):
            continue  # the images' own lost+found, which no tar put there
        if name not in new_children:
            out.append(Change(_join(child_path), ChangeKind.DELETE))
            changed = True
            continue
        _, new_inode = new_children[name]
        if name not in old_children:
            out.append(Change(_join(child_path), ChangeKind.ADD))
            if stat.S_ISDIR(new_inode.mode):
                _list_added(new, child_path, out)
            changed = True
            continue
        _, old_inode = old_children[name]
        both_dirs = stat.S_ISDIR(new_inode.mode) and stat.S_ISDIR(old_inode.mode)
        position = len(out)
        inner = both_dirs and _compare(new, old, child_path, out)
        if _differs(old_inode, new_inode) or inner:
            out.insert(position, Change(_join(child_path), ChangeKind.MODIFY))
            changed = True
        if stat.S_ISDIR(new_inode.mode) and not both_dirs:
            _list_added(new, child_path, out)
    return changed


def _empty_or_missing(new: MergedView, old: MergedView, name: bytes) -> bool:
    """Tell whether ``name`` at the root is an empty directory, or absent, in both views."""
    for view in (new, old):
        found = view.children([]).get(name)
        if found is None:
            continue
        _, inode = found
        if inode.file_type != fmt.S_IFDIR or view.children([name]):
            return False
    return True


def _list_added(view: MergedView, path: list[bytes], out: list[Change]) -> None:
    for name, (_, inode) in sorted(view.children(path).items()):
        out.append(Change(_join([*path, name]), ChangeKind.ADD))
        if stat.S_ISDIR(inode.mode):
            _list_added(view, [*path, name], out)


def diff_size(changes: Sequence[Change], view: MergedView) -> int:
    """Sum the sizes of added and modified non-directories, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        found = view.lookup(change.path.lstrip(b"/").split(b"/"))
        if found is None:
            continue
        layer, inode = found
        if stat.S_ISDIR(inode.mode):
            continue
        key = (id(layer), inode.number)
        if key in seen:
            continue
        seen.add(key)
        total += inode.size
    return total


def iter_paths(changes: Sequence[Change]) -> Iterator[tuple[str, int]]:
    """Yield (path, kind) pairs as Docker's API returns them."""
    for change in changes:
        yield change.path.decode("utf-8", "surrogateescape"), int(change.kind)
