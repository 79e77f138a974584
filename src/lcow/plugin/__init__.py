"""The Docker graph-driver plugin server (``lcow serve``)."""

from typing import Final

DEFAULT_SOCKET: Final = "/run/docker/plugins/lcow.sock"
