"""CRC-32C (Castagnoli) for ext4's metadata_csum and for VHDX, from the crc32c package.

The package's ``__init__`` imports importlib.metadata, only to set ``__version__``, and its
command line module with argparse. In a service VM worker's start, that took 15 ms
(``python -X importtime -c "import lcow.servicevm.worker"``). lcow needs only
the function in the package's compiled module, ``crc32c._crc32c``, so this module loads that
module by itself. Where a release of the package keeps the function elsewhere, it imports
the package as usual.
"""

import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from typing import Final

COMPILED_MODULE: Final = "crc32c._crc32c"

# crc32c(data, value=0): the standard CRC-32C of data, continuing from value.
Checksum = Callable[[bytes | bytearray | memoryview, int], int]


def _load(compiled_module: str = COMPILED_MODULE) -> Checksum:
    """Return the package's crc32c function, from its compiled module where that exists."""
    imported = sys.modules.get("crc32c")
    if imported is not None:
        function: Checksum = imported.crc32c  # the package's __init__ has run already
        return function

    package = importlib.util.find_spec("crc32c")
    if package is None:
        raise ImportError("the crc32c package is missing: install lcow's dependencies")

    # find_spec locates the package without running its __init__. PathFinder looks for
    # the compiled module in the package's folder, and does not import the package either.
    spec = importlib.machinery.PathFinder.find_spec(
        compiled_module, package.submodule_search_locations
    )
    if spec is None or spec.loader is None:
        import crc32c  # noqa: PLC0415 - only for a package laid out differently

        fallback: Checksum = crc32c.crc32c
        return fallback

    module = importlib.util.module_from_spec(spec)
    # Left out of sys.modules, where the package would lack it as an attribute. A later
    # import of the package loads a copy of its own.
    spec.loader.exec_module(module)
    compiled: Checksum = module.crc32c
    return compiled


crc32c: Final = _load()
