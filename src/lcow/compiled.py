"""The modules that lcow's build compiles with mypyc, and checks on the compiled forms.

setup.py compiles :data:`COMPILED_MODULES` because they run once per tar entry or inode
(docs/benchmarks.md measures the gain). In an editable install the extensions sit beside
their sources and Python imports them first. So a source edited after the build has no
effect until the next build, and :func:`stale_modules` finds such modules.

The value classes these modules make once per entry, inode or extent declare their own
``__init__`` (with ``init=False`` on ``@dataclass``). mypyc compiles a written-out
``__init__``, while the one the dataclass decorator generates runs as interpreted Python.
Making an object of three fields took 458 ns with the generated ``__init__`` (947 ns when
frozen) and 63 ns with its own. Fields that a frozen dataclass would protect are ``Final``
instead, so mypy keeps them from being assigned. Such classes keep their hash through
``unsafe_hash=True``, which is sound because no field changes after ``__init__``.

NOTE: in the compiled build, ``copy.copy`` and ``pickle`` fail on these classes, because
their ``__new__`` calls the written-out ``__init__`` without arguments. lcow copies and
pickles none of them.
"""

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Final

COMPILED_MODULES: Final = (
    "lcow.ext4.checksum",
    "lcow.ext4.extents",
    "lcow.ext4.format",
    "lcow.ext4.layout",
    "lcow.ext4.reader",
    "lcow.ext4.writer",
    "lcow.ext4.xattr",
    "lcow.layer.changes",
    "lcow.layer.export",
    "lcow.layer.tar2ext4",
    "lcow.layer.tarstream",
)

# Written in C and built even with LCOW_MYPYC=0, because lcow imports them unconditionally.
C_EXTENSIONS: Final = ("lcow.ext4._inode", "lcow.layer._libarchive", "lcow.layer._ustar")

EXTENSION_SUFFIX: Final = ".so"


def _origin(module: str) -> Path:
    found = _find(module)
    if found is None:
        raise ImportError(f"failed to find lcow's module {module}")
    return found


def _find(module: str) -> Path | None:
    """Return the file Python imports ``module`` from, or None when there is none."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def _extensions() -> dict[str, Path]:
    """Map each module of :data:`COMPILED_MODULES` that Python imports compiled to its file."""
    origins = {name: _origin(name) for name in COMPILED_MODULES}
    return {name: path for name, path in origins.items() if path.suffix == EXTENSION_SUFFIX}


def compiled_modules() -> list[str]:
    """Return the modules of :data:`COMPILED_MODULES` that Python imports compiled."""
    return list(_extensions())


def editable() -> bool:
    """Return whether lcow is an editable install, as pip records it in direct_url.json."""
    try:
        recorded = importlib.metadata.distribution("lcow").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not recorded:
        return False
    return bool(json.loads(recorded).get("dir_info", {}).get("editable", False))


def stale_modules() -> list[str]:
    """Return the extension modules whose source beside them is newer than the extension.

    Only an editable install is checked. pip writes an installed package's files in no set
    order, so there a source may be newer than its extension without being edited.
    """
    if not editable():
        return []
    stale = []
    for name, extension in _extensions().items():
        if _newer_source(extension, name, ".py"):
            stale.append(name)
    for name in C_EXTENSIONS:
        built = _find(name)
        if built is None or _newer_source(built, name, ".c"):
            stale.append(name)  # a missing C extension needs a build as much as a stale one
    return stale


def _newer_source(extension: Path, name: str, suffix: str) -> bool:
    source = extension.with_name(name.rsplit(".", 1)[1] + suffix)
    return source.exists() and source.stat().st_mtime > extension.stat().st_mtime


def describe() -> str:
    """Return how lcow runs here: compiled by mypyc, partly, or interpreted."""
    compiled = compiled_modules()
    if len(compiled) == len(COMPILED_MODULES):
        return f"compiled by mypyc ({len(compiled)} modules)"
    if compiled:
        return f"partly compiled by mypyc: {', '.join(compiled)}"
    # The C extensions of C_EXTENSIONS are built either way, so this is not pure Python.
    return "interpreted, without mypyc (built with LCOW_MYPYC=0)"
