"""Pause Python's cyclic garbage collector while a layer is converted or exported.

A conversion makes a few objects per tar entry and keeps an inode object per entry until
the image is written. So each collection of the oldest generation visits a growing heap:
the collector took 1.7 % of the perf samples of a conversion of L3-node-modules. The loops
make no reference cycles, so nothing piles up while the collector waits. Reference
counting frees the objects of each entry as before.
"""

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block, and enable it after if it was before.

    Blocks in two threads may overlap. The block that found the collector enabled enables it
    when it ends, and the other then finishes with it running, as without a pause.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
