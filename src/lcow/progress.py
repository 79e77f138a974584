"""Progress bars on stderr for the ``lcow`` command, drawn by tqdm.

tqdm's import reads its own version with importlib.metadata, which took 22 ms of the 116 ms
that ``python -X importtime -c "import lcow.cli"`` reported. So tqdm is imported only for a
bar that draws. With the bar off (``--no-progress``, or stderr not a terminal), a command
gets a bar that does nothing.
"""

import sys
from types import TracebackType
from typing import Any, Protocol, Self


class ProgressBar(Protocol):
    """The part of a tqdm bar that lcow's commands use."""

    def update(self, n: float = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> Any: ...


class _HiddenBar:
    """A bar that is off: it counts nothing and draws nothing."""

    def update(self, n: float = 1) -> bool | None:
        return None

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


def byte_bar(description: str, total_bytes: int | None, *, enabled: bool) -> ProgressBar:
    """Return a bar on stderr that counts bytes up to ``total_bytes`` (None: unknown)."""
    if not enabled:
        return _HiddenBar()

    from tqdm import tqdm  # noqa: PLC0415 - imported only for a bar that draws

    bar: ProgressBar = tqdm(
        total=total_bytes,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
    )
    return bar
