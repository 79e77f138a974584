"""Shared fixtures: the corpus of real layers, and the ``root`` marker.

The corpus is found through one setting, the environment variable ``LCOW_CORPUS`` (default
``/var/cache/lcow-corpus``). Its layers are in ``$LCOW_CORPUS/out/layers``, and docs/corpus.md
describes how to build it. Tests that need it skip with the reason when it is missing, and fail
instead when the environment variable ``CI`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest

from oracle import require_root, skip_or_fail

DEFAULT_CORPUS: Final = Path("/var/cache/lcow-corpus")

CORPUS_LAYER_NAMES: Final = (
    "L1-base",  # debootstrap minbase: a whole root filesystem, device nodes, hard links
    "L2-umoci",  # a diff by umoci: whiteouts and parents that only exist implicitly
    "L2-buildah",  # the same diff by buildah's overlay driver: whiteouts and opaque markers
    "L3-node-modules",  # npm packages: about 56,000 small files
    "L4-big-files",  # compilers from Debian packages: few entries, files over 30 MB
)
CORPUS_LAYER_SUFFIXES: Final = (".tar", ".tar.gz")
CORPUS_LAYER_FILES: Final = tuple(
    name + suffix for name in CORPUS_LAYER_NAMES for suffix in CORPUS_LAYER_SUFFIXES
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip or fail tests marked ``root`` when the tests do not run as root."""
    if item.get_closest_marker("root") is not None:
        require_root()


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Return the folder that contains the corpus layers, ``$LCOW_CORPUS/out/layers``."""
    root = Path(os.environ.get("LCOW_CORPUS") or DEFAULT_CORPUS)
    layers = root / "out" / "layers"
    missing = [name for name in CORPUS_LAYER_FILES if not (layers / name).is_file()]
    if missing:
        skip_or_fail(
            f"corpus layers missing in {layers}: {', '.join(missing)}; build the corpus "
            "(docs/corpus.md) or point LCOW_CORPUS at one"
        )
    return layers


@pytest.fixture(scope="module", params=CORPUS_LAYER_FILES)
def corpus_layer(request: pytest.FixtureRequest, corpus: Path) -> Path:
    """Return the path of one corpus layer, so that a test using it runs once per layer file."""
    name: str = request.param
    return corpus / name
