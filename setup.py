"""Build lcow, with the modules that run once per tar entry or inode compiled by mypyc.

Converting and exporting a layer spends nearly all of its time in a loop over the entries,
in the interpreter's per-call and attribute costs. mypyc compiles these modules, as they
are, from their type annotations to C extensions. The Python sources stay the only source
and are installed beside the extensions. ``LCOW_MYPYC=0`` builds lcow as pure Python. In
an editable install, extensions built earlier stay in ``src`` until they are deleted.
"""

import os
import runpy

from mypyc.build import mypycify
from setuptools import setup

# The list lives in the package, whose checks import it. setup.py runs before lcow is
# importable, so it reads the file.
COMPILED_MODULES = runpy.run_path("src/lcow/compiled.py")["COMPILED_MODULES"]


def compiled_extensions() -> list[object]:
    if os.environ.get("LCOW_MYPYC", "1") == "0":
        return []
    # The group name puts mypyc's shared runtime inside the package, as lcow/native__mypyc,
    # so the service VM's copy of the package carries it.
    return mypycify(
        [
            "--config-file",
            "pyproject.toml",
            *(f"src/{name.replace('.', '/')}.py" for name in COMPILED_MODULES),
        ],
        opt_level="3",
        group_name="lcow.native",
    )


setup(ext_modules=compiled_extensions())
