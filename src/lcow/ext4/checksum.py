"""CRC32C as ext4's metadata_csum uses it.

The kernel's ``crc32c(seed, data)`` continues a raw CRC register: no inversion on entry or
exit. :func:`lcow.crc.crc32c` returns the standard CRC-32C, which inverts both ways, so
``raw(seed, data) == ~standard(data, ~seed)``.
"""

from typing import Final

from lcow.crc import crc32c

_MASK: Final = 0xFFFFFFFF


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """Continue the kernel's raw CRC32C register ``seed`` over ``data``."""
    return ~crc32c(data, ~seed & _MASK) & _MASK


def filesystem_seed(uuid: bytes) -> int:
    """Return the checksum seed of a filesystem without metadata_csum_seed: crc32c(~0, uuid)."""
    return crc32c_raw(_MASK, uuid)
