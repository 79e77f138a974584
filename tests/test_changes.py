"""Changes and DiffSize of layer images, as Docker's graph drivers report them.

Layers come from tables of tar members, so each test states the input and the exact change
list it expects. layer_changes reads a layer against its own parents, and tree_changes
compares two merged views, as Docker's ChangesDirs does for any other pair of layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest

import tarbuild
import treegen
from lcow.layer.changes import (
    ChangeKind,
    LayerTree,
    MergedView,
    diff_size,
    iter_paths,
    layer_changes,
    tree_changes,
)
from lcow.layer.tar2ext4 import convert_tar
from readback import change_pairs, open_reader

MODIFY: Final = ChangeKind.MODIFY
ADD: Final = ChangeKind.ADD
DELETE: Final = ChangeKind.DELETE

LATER_MTIME_S: Final = tarbuild.DEFAULT_MTIME_S + 3600


class Layers:
    """Layer images built from member tables, bottom first, opened for reading."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.trees: list[LayerTree] = []

    def add(self, members: Sequence[tarbuild.Member]) -> LayerTree:
        index = len(self.trees)
        source = self.folder / f"layer{index}.tar"
        source.write_bytes(tarbuild.tar_bytes(members))
        image = self.folder / f"layer{index}.vhd"
        convert_tar(source, image)
        tree = LayerTree(self.stack.enter_context(open_reader(image)))
        self.trees.append(tree)
        return tree

    def view(self, count: int) -> MergedView:
        """Return the merged view of the lowest ``count`` layers."""
        return MergedView(list(reversed(self.trees[:count])))


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[Layers]:
    with contextlib.ExitStack() as stack:
        yield Layers(tmp_path, stack)


# --- Docker's graphtest case ------------------------------------------------------------------

FILE_COUNT: Final = 20
FILE_BYTES: Final = 64
SEED: Final = 6  # the seed in the names of added files, as in Docker's graphtest


def graphtest_base() -> list[tarbuild.Member]:
    members = [tarbuild.directory("directory-0")]
    for index in range(FILE_COUNT):
        content = treegen.seeded_bytes(index, FILE_BYTES)
        members.append(tarbuild.regular(f"directory-0/file-{index}", content))
    return members


def graphtest_child() -> list[tarbuild.Member]:
    """Rewrite file-i when i % 3 == 0, add file-6-i when i % 3 == 1, delete the rest."""
    members = [tarbuild.directory("directory-0", mtime=LATER_MTIME_S)]
    for index in range(FILE_COUNT):
        content = treegen.seeded_bytes(1000 + index, FILE_BYTES)
        if index % 3 == 0:
            name = f"directory-0/file-{index}"
            members.append(tarbuild.regular(name, content, mtime=LATER_MTIME_S))
        elif index % 3 == 1:
            name = f"directory-0/file-{SEED}-{index}"
            members.append(tarbuild.regular(name, content, mtime=LATER_MTIME_S))
        else:
            members.append(tarbuild.regular(f"directory-0/.wh.file-{index}"))
    return members


def graphtest_expected() -> list[tuple[str, ChangeKind]]:
    expected = [("/directory-0", MODIFY)]
    for index in range(FILE_COUNT):
        if index % 3 == 0:
            expected.append((f"/directory-0/file-{index}", MODIFY))
        elif index % 3 == 1:
            expected.append((f"/directory-0/file-{SEED}-{index}", ADD))
        else:
            expected.append((f"/directory-0/file-{index}", DELETE))
    return sorted(expected)


def test_graphtest_changes(layers: Layers) -> None:
    base = layers.add(graphtest_base())
    child = layers.add(graphtest_child())

    changes = layer_changes(child, MergedView([base]))

    assert len(changes) == 21
    assert change_pairs(changes) == graphtest_expected()
    assert sum(1 for change in changes if change.kind == MODIFY) == 8
    assert sum(1 for change in changes if change.kind == ADD) == 7
    assert sum(1 for change in changes if change.kind == DELETE) == 6


def test_graphtest_api_form(layers: Layers) -> None:
    base = layers.add(graphtest_base())
    child = layers.add(graphtest_child())

    pairs = list(iter_paths(layer_changes(child, MergedView([base]))))

    assert ("/directory-0", 0) in pairs
    assert ("/directory-0/file-6-1", 1) in pairs
    assert ("/directory-0/file-2", 2) in pairs


def test_graphtest_diff_size(layers: Layers) -> None:
    base = layers.add(graphtest_base())
    child = layers.add(graphtest_child())
    changes = layer_changes(child, MergedView([base]))

    size = diff_size(changes, layers.view(2))

    assert size == 14 * FILE_BYTES


def test_graphtest_tree_changes(layers: Layers) -> None:
    """Comparing the merged views gives the same list as reading the child layer."""
    layers.add(graphtest_base())
    layers.add(graphtest_child())

    changes = tree_changes(layers.view(2), layers.view(1))

    assert change_pairs(changes) == graphtest_expected()
    assert diff_size(changes, layers.view(2)) == 14 * FILE_BYTES


# --- an opaque directory over two layers ----------------------------------------------------

OPAQUE_LOWER: Final = (
    tarbuild.directory("d1"),
    tarbuild.regular("d1/old.txt", b"old\n"),
    tarbuild.directory("d1/olddir"),
    tarbuild.regular("d1/olddir/x.txt", b"x\n"),
    tarbuild.directory("gone"),
    tarbuild.regular("gone/y.txt", b"y\n"),
    tarbuild.regular("keep.txt", b"keep\n"),
)
OPAQUE_UPPER: Final = (
    tarbuild.directory("d1", mtime=LATER_MTIME_S),
    tarbuild.regular("d1/.wh..wh..opq"),
    tarbuild.regular("d1/foo.txt", b"foo\n"),
    tarbuild.directory("d1/sub"),
    tarbuild.regular("d1/sub/bar.txt", b"bar\n"),
    tarbuild.regular(".wh.gone"),
)
OPAQUE_EXPECTED: Final = sorted(
    [
        ("/d1", MODIFY),
        ("/d1/foo.txt", ADD),
        ("/d1/sub", ADD),
        ("/d1/sub/bar.txt", ADD),
        ("/d1/old.txt", DELETE),
        ("/d1/olddir", DELETE),
        ("/gone", DELETE),
    ]
)


def test_opaque_changes(layers: Layers) -> None:
    lower = layers.add(OPAQUE_LOWER)
    upper = layers.add(OPAQUE_UPPER)

    changes = layer_changes(upper, MergedView([lower]))

    assert change_pairs(changes) == OPAQUE_EXPECTED


def test_opaque_tree_changes(layers: Layers) -> None:
    layers.add(OPAQUE_LOWER)
    layers.add(OPAQUE_UPPER)

    changes = tree_changes(layers.view(2), layers.view(1))

    assert change_pairs(changes) == OPAQUE_EXPECTED


def test_opaque_diff_size(layers: Layers) -> None:
    lower = layers.add(OPAQUE_LOWER)
    upper = layers.add(OPAQUE_UPPER)
    changes = layer_changes(upper, MergedView([lower]))

    size = diff_size(changes, layers.view(2))

    assert size == len(b"foo\n") + len(b"bar\n")


# --- comparing with a layer that is not the parent ------------------------------------------

CAPABILITY: Final = treegen.capability_value(effective=True, permitted=1 << 12, inheritable=0)
MODE_ONLY_CONTENT: Final = b"same size, same mtime\n"

GRANDPARENT: Final = (
    tarbuild.directory("a"),
    tarbuild.regular("a/file1", b"one\n"),
    tarbuild.directory("b"),
    tarbuild.directory("b/c"),
    tarbuild.regular("b/c/deep.txt", b"deep\n"),
    tarbuild.regular("mode.txt", MODE_ONLY_CONTENT, mode=0o644),
    tarbuild.directory("x"),
    tarbuild.directory("x/y"),
    tarbuild.regular("x/y/z.txt", b"z\n"),
    tarbuild.directory("untouched"),
    tarbuild.regular("untouched/u.txt", b"u\n"),
    tarbuild.regular("cap.bin", b"\x7fELF"),
    tarbuild.regular("note.txt", b"note\n"),
    tarbuild.regular("owner.txt", b"owner\n"),
)
# The parent changes metadata only, adds a file and repeats one without any difference.
PARENT: Final = (
    tarbuild.regular("mode.txt", MODE_ONLY_CONTENT, mode=0o600),
    tarbuild.regular("a/new.txt", b"new file\n"),
    tarbuild.regular("untouched/u.txt", b"u\n"),
    tarbuild.regular(
        "cap.bin",
        b"\x7fELF",
        pax_headers={"SCHILY.xattr.security.capability": treegen.pax_string(CAPABILITY)},
    ),
    tarbuild.regular("note.txt", b"note\n", pax_headers={"SCHILY.xattr.user.note": "x"}),
    tarbuild.regular("owner.txt", b"owner\n", uid=1000, gid=1000),
)
# The grandchild deletes a directory and rewrites a file two directories deep.
GRANDCHILD: Final = (
    tarbuild.regular(".wh.b"),
    tarbuild.regular("x/y/z.txt", b"zz\n", mtime=LATER_MTIME_S),
)
GRANDCHILD_EXPECTED: Final = sorted(
    [
        ("/a", MODIFY),
        ("/a/new.txt", ADD),
        ("/b", DELETE),
        ("/cap.bin", MODIFY),
        ("/mode.txt", MODIFY),
        ("/owner.txt", MODIFY),
        ("/x", MODIFY),
        ("/x/y", MODIFY),
        ("/x/y/z.txt", MODIFY),
    ]
)


def test_grandchild_tree_changes(layers: Layers) -> None:
    """Grandchild against grandparent.

    A mode, owner or capability change is a modify. A directory whose only change is
    inside it is modified, a deleted directory hides its children, a file repeated without a
    difference is no change, and neither is a user xattr alone, as in Docker's ChangesDirs.
    """
    layers.add(GRANDPARENT)
    layers.add(PARENT)
    layers.add(GRANDCHILD)

    changes = tree_changes(layers.view(3), layers.view(1))

    assert change_pairs(changes) == GRANDCHILD_EXPECTED


def test_grandchild_diff_size(layers: Layers) -> None:
    layers.add(GRANDPARENT)
    layers.add(PARENT)
    layers.add(GRANDCHILD)
    changes = tree_changes(layers.view(3), layers.view(1))

    size = diff_size(changes, layers.view(3))

    expected = len(b"new file\n") + len(b"\x7fELF") + len(MODE_ONLY_CONTENT)
    assert size == expected + len(b"owner\n") + len(b"zz\n")


def test_parent_tree_changes(layers: Layers) -> None:
    """The parent's own changes, read against the grandparent, as the layer lists them."""
    layers.add(GRANDPARENT)
    parent = layers.add(PARENT)

    from_views = tree_changes(layers.view(2), layers.view(1))
    from_layer = layer_changes(parent, layers.view(1))

    assert ("/untouched/u.txt", MODIFY) not in change_pairs(from_views)
    assert ("/note.txt", MODIFY) not in change_pairs(from_views)
    assert ("/untouched/u.txt", MODIFY) in change_pairs(from_layer)
    assert ("/note.txt", MODIFY) in change_pairs(from_layer)


def test_type_change_tree_changes(layers: Layers) -> None:
    """A file replaced by a directory is a modify, and the directory's content is added."""
    layers.add([tarbuild.regular("thing", b"file\n")])
    layers.add(
        [
            tarbuild.regular(".wh.thing"),
            tarbuild.directory("thing"),
            tarbuild.regular("thing/inside", b"i\n"),
        ]
    )

    changes = tree_changes(layers.view(2), layers.view(1))

    assert change_pairs(changes) == [("/thing", MODIFY), ("/thing/inside", ADD)]


# --- whiteouts and opaque directories in the layers below ---------------------------------------


def test_new_opaque_folder_added(layers: Layers) -> None:
    """An opaque directory that nothing below shows is an add, with no deletes inside."""
    lower = layers.add([tarbuild.regular("keep.txt", b"keep\n")])
    upper = layers.add(
        [
            tarbuild.directory("fresh"),
            tarbuild.regular("fresh/.wh..wh..opq"),
            tarbuild.regular("fresh/file", b"f\n"),
        ]
    )

    changes = layer_changes(upper, MergedView([lower]))

    assert change_pairs(changes) == [("/fresh", ADD), ("/fresh/file", ADD)]


def test_readded_after_delete(layers: Layers) -> None:
    """A file that the parent deleted and the child makes again is an add."""
    bottom = layers.add([tarbuild.directory("d"), tarbuild.regular("d/f", b"first\n")])
    middle = layers.add([tarbuild.regular("d/.wh.f")])
    child = layers.add([tarbuild.regular("d/f", b"second\n")])

    changes = layer_changes(child, MergedView([middle, bottom]))

    assert change_pairs(changes) == [("/d", MODIFY), ("/d/f", ADD)]


def test_opaque_below_hides(layers: Layers) -> None:
    """Entries that an opaque directory of the parent hides are not in the layers below."""
    bottom = layers.add(
        [
            tarbuild.directory("d"),
            tarbuild.regular("d/a", b"a\n"),
            tarbuild.regular("d/b", b"b\n"),
        ]
    )
    middle = layers.add(
        [
            tarbuild.directory("d"),
            tarbuild.regular("d/.wh..wh..opq"),
            tarbuild.regular("d/c", b"c\n"),
        ]
    )
    child = layers.add([tarbuild.regular("d/a", b"new a\n"), tarbuild.regular("d/.wh.c")])

    changes = layer_changes(child, MergedView([middle, bottom]))

    assert change_pairs(changes) == [("/d", MODIFY), ("/d/a", ADD), ("/d/c", DELETE)]


def test_opaque_below_tree_changes(layers: Layers) -> None:
    """The same three layers, compared as merged views with the bottom layer."""
    layers.add(
        [
            tarbuild.directory("d"),
            tarbuild.regular("d/a", b"a\n"),
            tarbuild.regular("d/b", b"b\n"),
        ]
    )
    layers.add(
        [
            tarbuild.directory("d"),
            tarbuild.regular("d/.wh..wh..opq"),
            tarbuild.regular("d/c", b"c\n"),
        ]
    )
    layers.add([tarbuild.regular("d/a", b"new a\n"), tarbuild.regular("d/.wh.c")])

    changes = tree_changes(layers.view(3), layers.view(1))

    assert change_pairs(changes) == [("/d", MODIFY), ("/d/a", MODIFY), ("/d/b", DELETE)]


def test_hard_links_diff_size(layers: Layers) -> None:
    """DiffSize counts a file with several names once."""
    lower = layers.add([tarbuild.regular("base", b"b\n")])
    upper = layers.add(
        [
            tarbuild.regular("data", bytes(1000)),
            tarbuild.hard_link("data-link", "data"),
            tarbuild.directory("sub"),
            tarbuild.hard_link("sub/data-link", "data"),
        ]
    )
    changes = layer_changes(upper, MergedView([lower]))

    size = diff_size(changes, layers.view(2))

    assert size == 1000
