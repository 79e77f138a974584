"""lcow: a layer store for Linux containers that run inside lightweight VMs.

Every read-only image layer becomes an ext4 filesystem image with a fixed-VHD footer
(``layer.vhd``) that a VM attaches and stacks with overlayfs.
"""

# The one place the version is set: pyproject.toml reads it from here. A literal instead of
# importlib.metadata keeps about 30 ms of imports out of every service VM worker's start.
__version__ = "0.1.0"
