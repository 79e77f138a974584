"""lcow: a layer store for Linux containers that run inside lightweight VMs.

Every read-only image layer becomes an ext4 filesystem image with a fixed-VHD footer
(``layer.vhd``) that a VM attaches and stacks with overlayfs.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lcow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
