"""The modules that lcow's build compiles with mypyc, and checks on the compiled forms.

setup.py compiles :data:`COMPILED_MODULES`: they run once per tar entry or inode, and
compiled they convert layers 1.1 to 1.4 times and export them 1.1 to 1.4 times faster
(docs/benchmarks.md). In an editable
install the extensions sit beside their sources and Python imports them first, so a
source edited after the build has no effect until the next build; :func:`stale_modules`
finds such modules.
"""

import importlib.util
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

EXTENSION_SUFFIX: Final = ".so"


def _origin(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"failed to find lcow's module {module}")
    return Path(spec.origin)


def compiled_modules() -> list[str]:
    """Return the modules of :data:`COMPILED_MODULES` that Python imports compiled."""
    return [name for name in COMPILED_MODULES if _origin(name).suffix == EXTENSION_SUFFIX]


def stale_modules() -> list[str]:
    """Return the compiled modules whose source beside them is newer than the extension.

    Only an editable install has sources beside its extensions that a person edits. pip
    writes an installed package's files in no set order, so there the result is meaningless.
    """
    stale = []
    for name in compiled_modules():
        extension = _origin(name)
        source = extension.with_name(name.rsplit(".", 1)[1] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            stale.append(name)
    return stale


def describe() -> str:
    """Say how lcow runs here: compiled by mypyc, partly, or as pure Python."""
    compiled = compiled_modules()
    if len(compiled) == len(COMPILED_MODULES):
        return f"compiled by mypyc ({len(compiled)} modules)"
    if compiled:
        return f"partly compiled by mypyc: {', '.join(compiled)}"
    return "pure Python (built with LCOW_MYPYC=0, or mypyc failed)"
