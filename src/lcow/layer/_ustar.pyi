"""Types of the C extension lcow.layer._ustar (src/lcow/layer/_ustar.c)."""

def header(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    linkname: bytes,
    device: tuple[int, int] | None,
    xattr_records: list[tuple[bytes, bytes]] | None,
    /,
) -> bytes: ...
