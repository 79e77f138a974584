"""Build lcow, with the code that runs once per tar entry, block or inode compiled.

Converting and exporting a layer spends nearly all of its time in a loop over the entries,
in the interpreter's per-call and attribute costs. mypyc compiles the modules of that loop,
as they are, from their type annotations to C extensions. The Python sources stay the only
source and are installed beside the extensions. ``LCOW_MYPYC=0`` leaves them interpreted.
In an editable install, extensions built earlier stay in ``src`` until they are deleted.

Three small C extensions are always built. ``lcow.layer._libarchive`` reads each tar
header and data block with one call into libarchive, where ctypes takes a dozen calls of
about 300 ns each. ``lcow.layer._ustar`` builds an exported entry's tar header, which took
1.3 to 3.6 us in Python. ``lcow.ext4._inode`` checks and decodes an inode of an image, which
took about 3.5 us in Python. They need a C compiler and Python's headers. With libarchive's
headers installed (Debian's libarchive-dev), the compiler also checks the libarchive
prototypes.
"""

import os
import runpy

from mypyc.build import mypycify
from setuptools import Extension, setup

# The list lives in the package, whose checks import it. setup.py runs before lcow is
# importable, so it reads the file.
COMPILED_MODULES = runpy.run_path("src/lcow/compiled.py")["COMPILED_MODULES"]


# LCOW_C_WERROR=1 (set by .ci/run and scripts/test.sh) turns the C compiler's warnings into
# errors. Left off for others, so that a newer compiler's new warning does not stop an install.
C_WARNINGS = ["-Wall", "-Wextra", *(["-Werror"] if os.environ.get("LCOW_C_WERROR") == "1" else [])]
PER_ENTRY_CALLS = [
    Extension(
        "lcow.layer._libarchive",
        ["src/lcow/layer/_libarchive.c"],
        extra_compile_args=["-O2", *C_WARNINGS],
    ),
    Extension(
        "lcow.layer._ustar",
        ["src/lcow/layer/_ustar.c"],
        extra_compile_args=["-O2", *C_WARNINGS],
    ),
    Extension(
        "lcow.ext4._inode",
        ["src/lcow/ext4/_inode.c"],
        extra_compile_args=["-O2", *C_WARNINGS],
    ),
]


def compiled_extensions() -> list[object]:
    if os.environ.get("LCOW_MYPYC", "1") == "0":
        return PER_ENTRY_CALLS
    # The group name puts mypyc's shared runtime inside the package, as lcow/native__mypyc,
    # so the service VM's copy of the package carries it.
    compiled = mypycify(
        [
            "--config-file",
            "pyproject.toml",
            *(f"src/{name.replace('.', '/')}.py" for name in COMPILED_MODULES),
        ],
        opt_level="3",
        group_name="lcow.native",
    )
    return [*compiled, *PER_ENTRY_CALLS]


setup(ext_modules=compiled_extensions())
