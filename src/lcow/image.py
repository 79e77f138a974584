"""Import container images into the layer store, and name them.

Sources
    ``docker save`` archive
        ``manifest.json`` lists each image's ``Config``, ``RepoTags`` and ``Layers``. A layer
        file is a plain or gzip tar, at ``<id>/layer.tar`` (classic Docker), ``<digest>.tar``
        (skopeo) or ``blobs/sha256/<hex>`` (Docker 25 and later).
    OCI image layout (OCI image-spec v1.1, ``image-layout.md``)
        A folder, or a tar of one, with ``oci-layout``, ``index.json`` and content-addressed
        ``blobs/<algorithm>/<hex>``. The manifest is chosen by the annotation
        ``org.opencontainers.image.ref.name``; an index nested in ``index.json`` is resolved
        to the manifest of this machine's platform.
    rootfs tarball
        A plain, gzip or zstd tar that becomes an image of one layer, as ``docker import``
        makes it. Its config is generated here without a creation time, so the same
        tarball always gets the same config digest.

    A compressed archive is first decompressed into an unnamed temporary file in the data
    root, because reading an archive's members by name needs random access. Archives and
    layers are read as streams and never held in memory as a whole.

Layer ids
    Each layer is stored under the hex part of Docker's chain id (image-spec ``config.md``):
    chainID(L1) = diffID(L1), chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln)). A layer
    whose ``layer.vhd`` exists is not converted again.

Verification
    Every blob is hashed while it streams and checked against its descriptor's digest and
    size; every layer's uncompressed tar is checked against the config's ``rootfs.diff_ids``.
    A mismatch fails the import, and the import removes the layers it created. Layers are
    decompressed in this process to compute the diff id, as dockerd does, and ApplyDiff gets
    the plain tar; parsing the tar still happens in a service VM.

Image names
    ``<root>/images.json`` maps each name to ``{"config", "layers", "top", "created"}``; it is
    replaced atomically. Imports and removals hold an exclusive flock on
    ``<root>/images.lock`` while they run. So they run one at a time per data root, and a
    layer that one import reuses cannot vanish through another import's cleanup or an
    ``image rm``. Reading the names (``list_images``) takes no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

from lcow.driver import Driver
from lcow.errors import (
    CorruptInputError,
    FailedPreconditionError,
    InvalidArgumentError,
    LcowError,
    NotFoundError,
    UnsupportedError,
)
from lcow.layer.tarstream import GZIP_MAGIC, READ_CHUNK_BYTES, ZSTD_MAGIC, LayerStream

log = logging.getLogger(__name__)

IMAGES_FILE: Final = "images.json"
IMAGES_LOCK: Final = "images.lock"
IMAGES_TEMPORARY_PREFIX: Final = ".images.json."
TEMPORARY_SUFFIX: Final = ".tmp"

# Manifests, indexes and configs are a few kilobytes. A larger file is not image metadata,
# and the limit keeps such a file from being read into memory.
MAX_METADATA_BYTES: Final = 16 << 20
MAX_LINK_DEPTH: Final = 8  # symlinks followed to find an archive member (docker save uses one)
MAX_NAME_LENGTH: Final = 1024  # bounds the keys of images.json and the lines of `image ls`

DOCKER_MANIFEST: Final = "manifest.json"
OCI_LAYOUT_FILE: Final = "oci-layout"
OCI_INDEX: Final = "index.json"
OCI_LAYOUT_MAJOR_VERSION: Final = "1"
REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION: Final = "io.containerd.image.name"  # Docker 25 writes it too

MANIFEST_MEDIA_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
INDEX_MEDIA_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
# The layer stream's compression is detected from its first bytes, so the media type only
# has to say that the blob is a tar. Encrypted and other layer kinds are rejected.
LAYER_MEDIA_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

# Go's GOARCH names, which image platforms use, for Python's platform.machine().
GO_ARCHITECTURES: Final = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

DIGEST_FORMS: Final = {
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "sha512": re.compile(r"[0-9a-f]{128}"),
}
BLOB_PATH: Final = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)")
LEGACY_CONFIG_PATH: Final = re.compile(r"([0-9a-f]{64})\.json")


# --- digests and chain ids -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:<64 hex digits>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: object, subject: str) -> Digest:
        """Parse ``algorithm:hex``; raise CorruptInputError naming ``subject`` when invalid."""
        if isinstance(text, str):
            algorithm, _, hex_digits = text.partition(":")
            form = DIGEST_FORMS.get(algorithm)
            if form is not None and form.fullmatch(hex_digits):
                return cls(algorithm, hex_digits)
        raise CorruptInputError(
            f"failed to read {subject}: invalid digest {text!r}; expected sha256:<64 hex digits> "
            "or sha512:<128 hex digits>"
        )

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Return Docker's chain ids for a stack of layers given by diff ids, base layer first."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            parent_and_layer = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(parent_and_layer).hexdigest())
    return chain


def layer_id_of(chain_id: str) -> str:
    """Return the store's layer id for a chain id: its hex part."""
    return chain_id.partition(":")[2]


# --- results and progress ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One named image, as ``images.json`` stores it."""

    name: str
    config: str  # digest of the image config
    layers: tuple[str, ...]  # chain ids, base layer first
    top: str | None  # layer id of the top layer; None for an image without layers
    created: str | None  # the config's creation time (RFC 3339), when it has one

    @property
    def layer_ids(self) -> tuple[str, ...]:
        return tuple(layer_id_of(chain_id) for chain_id in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "layers": list(self.layers),
            "top": self.top,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, name: str, value: Any) -> ImageRecord:
        return cls(
            name=name,
            config=str(value["config"]),
            layers=tuple(str(chain_id) for chain_id in value["layers"]),
            top=None if value["top"] is None else str(value["top"]),
            created=None if value.get("created") is None else str(value["created"]),
        )


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Outcome of an import: the image's record and the layers it converted or reused."""

    image: ImageRecord
    converted: tuple[str, ...]  # layer ids converted by this import
    present: tuple[str, ...]  # layer ids that were complete in the store already
    removed: tuple[str, ...]  # layers of an image the name pointed to before, now unused


class ImportProgress(Protocol):
    """Receiver of an import's progress, one step (a layer, a decompression) at a time.

    ``advance`` may be called from a thread other than the one that called ``begin``.
    """

    def begin(self, description: str, total_bytes: int | None) -> None: ...

    def advance(self, count_bytes: int) -> None: ...

    def end(self, outcome: str) -> None: ...


class _NoProgress:
    def begin(self, description: str, total_bytes: int | None) -> None:
        pass

    def advance(self, count_bytes: int) -> None:
        pass

    def end(self, outcome: str) -> None:
        pass


# --- files of an archive or a folder -------------------------------------------------------


def _normalize_member(name: str) -> str | None:
    """Return an archive path relative to the archive's root; None when it leaves the root."""
    normalized = posixpath.normpath(name.lstrip("/"))
    if normalized == ".." or normalized.startswith("../"):
        return None
    return normalized


class _Files(Protocol):
    """The files of an image archive or folder, addressed by their path inside it."""

    label: str

    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int: ...

    def open(self, path: str) -> IO[bytes]: ...


def _missing_file(files: _Files, path: str) -> NotFoundError:
    return NotFoundError(
        f"failed to read {path} in {files.label}: no such file; the image is incomplete, "
        "so export or copy it again"
    )


class _FolderFiles:
    """The files of an image folder: an OCI layout or an extracted docker-save archive."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.label = str(folder)

    def _path(self, path: str) -> Path:
        relative = _normalize_member(path)
        if relative is None:
            raise CorruptInputError(
                f"failed to read {path} in {self.label}: the path leads out of the image folder"
            )
        return self.folder / relative

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def size(self, path: str) -> int:
        try:
            return self._path(path).stat().st_size
        except FileNotFoundError as err:
            raise _missing_file(self, path) from err

    def open(self, path: str) -> IO[bytes]:
        try:
            return open(self._path(path), "rb")
        except FileNotFoundError as err:
            raise _missing_file(self, path) from err


class _TarFiles:
    """The members of an uncompressed image archive, found by name, read as streams."""

    def __init__(
        self,
        archive: tarfile.TarFile,
        members: Mapping[str, tarfile.TarInfo],
        prefix: str,
        label: str,
    ) -> None:
        self.archive = archive
        self.members = members  # by normalized name, see _index_members
        self.prefix = prefix  # "" or "<folder>/" when the layout is a folder in the tar
        self.label = label

    def _member(self, path: str) -> tarfile.TarInfo:
        name = _normalize_member(self.prefix + path)
        for _ in range(MAX_LINK_DEPTH):
            member = self.members.get(name) if name is not None else None
            if member is None:
                raise _missing_file(self, path)
            if member.isfile():
                return member
            if member.issym():
                name = _normalize_member(
                    posixpath.join(posixpath.dirname(member.name), member.linkname)
                )
            elif member.islnk():
                name = _normalize_member(member.linkname)
            else:
                break
        raise CorruptInputError(
            f"failed to read {path} in {self.label}: it is not a regular file, or a link to one "
            f"within {MAX_LINK_DEPTH} steps"
        )

    def exists(self, path: str) -> bool:
        try:
            self._member(path)
        except LcowError:
            return False
        return True

    def size(self, path: str) -> int:
        return self._member(path).size

    def open(self, path: str) -> IO[bytes]:
        stream = self.archive.extractfile(self._member(path))
        if stream is None:
            raise CorruptInputError(f"failed to read {path} in {self.label}: no file data")
        return stream


def _index_members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for member in archive:
        name = _normalize_member(member.name)
        if name is not None:
            members[name] = member
    return members


def _read_metadata(files: _Files, path: str) -> bytes:
    size = files.size(path)
    if size > MAX_METADATA_BYTES:
        raise CorruptInputError(
            f"failed to read {path} in {files.label}: {size} bytes is more than the "
            f"{MAX_METADATA_BYTES} bytes that image metadata may have"
        )
    with files.open(path) as stream:
        return stream.read(MAX_METADATA_BYTES + 1)


def _parse_json(data: bytes, subject: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise CorruptInputError(f"failed to parse {subject}: {err}") from err


def _blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _read_blob(files: _Files, digest: Digest, size_bytes: int | None, subject: str) -> bytes:
    """Read a small blob (manifest, index, config) and check its digest and size."""
    path = _blob_path(digest)
    data = _read_metadata(files, path)
    actual = Digest.of(data, digest.algorithm)
    if actual != digest:
        raise CorruptInputError(
            f"failed to verify {subject} {path} in {files.label}: its content has digest "
            f"{actual}, but {digest} is expected; the image is corrupt or was changed after "
            "it was written, so export or pull it again"
        )
    if size_bytes is not None and len(data) != size_bytes:
        raise CorruptInputError(
            f"failed to verify {subject} {path} in {files.label}: it has {len(data)} bytes, but "
            f"its descriptor states {size_bytes}"
        )
    return data


# --- what an import reads: the image plan --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LayerBlob:
    """Location of one layer's bytes and the digest they must have."""

    label: str  # the path in the archive or the file name, for messages
    size_bytes: int
    digest: Digest | None  # expected digest of the blob as stored; None when the source has none
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True, slots=True)
class _ImagePlan:
    """One image of a source: its config's digest and diff ids, and its layer blobs."""

    config_digest: Digest
    diff_ids: tuple[Digest, ...]
    created: str | None
    default_name: str
    layers: tuple[_LayerBlob, ...]  # one per diff id, base layer first


def _parse_config(data: bytes, subject: str) -> tuple[tuple[Digest, ...], str | None]:
    """Return the diff ids and creation time of an image config."""
    config = _parse_json(data, subject)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise CorruptInputError(
            f'failed to read {subject}: it has no rootfs of type "layers", so it is not an '
            "image config"
        )
    diff_id_texts = rootfs.get("diff_ids")
    if not isinstance(diff_id_texts, list):
        raise CorruptInputError(f"failed to read {subject}: rootfs.diff_ids is not a list")

    diff_ids = tuple(Digest.parse(text, f"rootfs.diff_ids of {subject}") for text in diff_id_texts)
    for diff_id in diff_ids:
        if diff_id.algorithm != "sha256":
            raise UnsupportedError(
                f"failed to import the image of {subject}: diff id {diff_id} is not sha256, the "
                "only algorithm that chain ids and lcow's layer hashing use"
            )
    created = config.get("created")
    return diff_ids, created if isinstance(created, str) else None


def _blob_factory(files: _Files, path: str) -> Callable[[], IO[bytes]]:
    return lambda: files.open(path)


# docker save archives


def _normalize_reference(name: str) -> str:
    """Return a reference in Docker's full form, as ``docker.io/library/debian:latest``."""
    first, slash, rest = name.partition("/")
    if not slash:
        name = f"docker.io/library/{name}"
    elif first == "index.docker.io":
        name = f"docker.io/{rest}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    last_component = name.rsplit("/", 1)[-1]
    if ":" not in last_component and "@" not in name:
        name += ":latest"
    return name


def _select_docker_image(
    entries: list[dict[str, Any]], name: str | None, label: str
) -> dict[str, Any]:
    if name is not None:
        expected_reference = _normalize_reference(name)
        matches = [
            entry
            for entry in entries
            if any(
                tag == name or _normalize_reference(tag) == expected_reference
                for tag in entry.get("RepoTags") or []
            )
        ]
        if len(matches) == 1:
            return matches[0]
    if len(entries) == 1:
        return entries[0]
    tags = ", ".join(tag for entry in entries for tag in entry.get("RepoTags") or []) or "none"
    requested = f"no image is tagged {name!r}" if name else f"it holds {len(entries)} images"
    raise InvalidArgumentError(
        f"failed to choose an image in {label}: {requested}; give one of its tags ({tags}) as NAME"
    )


def _describe_docker_save(files: _Files, name: str | None) -> _ImagePlan:
    subject = f"{DOCKER_MANIFEST} in {files.label}"
    entries = _parse_json(_read_metadata(files, DOCKER_MANIFEST), subject)
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise CorruptInputError(f"failed to read {subject}: expected a list of image objects")
    if not entries:
        raise CorruptInputError(f"failed to read {subject}: it lists no image")
    entry = _select_docker_image(entries, name, files.label)

    config_path = entry.get("Config")
    layer_paths = entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise CorruptInputError(f"failed to read {subject}: an image has no Config or Layers")
    config_data = _read_metadata(files, config_path)
    config_digest = Digest.of(config_data)
    _check_config_name(config_path, config_digest, files.label)
    diff_ids, created = _parse_config(config_data, f"{config_path} in {files.label}")
    if len(layer_paths) != len(diff_ids):
        raise CorruptInputError(
            f"failed to read {subject}: the image lists {len(layer_paths)} layers, but its config "
            f"{config_path} has {len(diff_ids)} diff ids"
        )

    layers = tuple(
        _LayerBlob(
            label=str(path),
            size_bytes=files.size(str(path)),
            digest=_digest_in_path(str(path)),
            open=_blob_factory(files, str(path)),
        )
        for path in layer_paths
    )
    tags = entry.get("RepoTags") or []
    default_name = str(tags[0]) if tags else str(config_digest)
    return _ImagePlan(config_digest, diff_ids, created, default_name, layers)


def _digest_in_path(path: str) -> Digest | None:
    """Return the digest that a content-addressed path (``blobs/sha256/<hex>``) promises."""
    match = BLOB_PATH.fullmatch(_normalize_member(path) or "")
    if match is None:
        return None
    return Digest.parse(f"{match[1]}:{match[2]}", path)


def _check_config_name(path: str, digest: Digest, label: str) -> None:
    # docker save names the config after the image id, which is the config's digest.
    normalized = _normalize_member(path) or ""
    legacy = LEGACY_CONFIG_PATH.fullmatch(normalized)
    expected = Digest("sha256", legacy[1]) if legacy else _digest_in_path(normalized)
    if expected is not None and expected != digest:
        raise CorruptInputError(
            f"failed to verify config {path} in {label}: its content has digest {digest}, but "
            f"its name promises {expected}; the archive is corrupt or was changed after it "
            "was written, so save it again"
        )


# OCI image layouts


def _check_layout_version(files: _Files) -> None:
    subject = f"{OCI_LAYOUT_FILE} in {files.label}"
    layout = _parse_json(_read_metadata(files, OCI_LAYOUT_FILE), subject)
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or version.split(".")[0] != OCI_LAYOUT_MAJOR_VERSION:
        raise UnsupportedError(
            f"failed to read {subject}: imageLayoutVersion {version!r} is not supported; lcow "
            f"reads layout version {OCI_LAYOUT_MAJOR_VERSION}.x"
        )


def _descriptor_names(descriptor: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return a descriptor's full image name and ref name annotations."""
    annotations = descriptor.get("annotations")
    if not isinstance(annotations, dict):
        return None, None
    full = annotations.get(CONTAINERD_NAME_ANNOTATION)
    ref = annotations.get(REF_NAME_ANNOTATION)
    return (full if isinstance(full, str) else None), (ref if isinstance(ref, str) else None)


def _name_matches(descriptor: dict[str, Any], name: str) -> bool:
    full, ref = _descriptor_names(descriptor)
    # NAME may add a repository to the tag that the layout stores: "corpus:full" picks "full".
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
    return name in (full, ref) or (tag is not None and tag == ref)


def _select_oci_manifest(
    manifests: list[dict[str, Any]], name: str | None, label: str
) -> dict[str, Any]:
    if name is not None:
        matches = [descriptor for descriptor in manifests if _name_matches(descriptor, name)]
        if len(matches) == 1:
            return matches[0]
    if len(manifests) == 1:
        return manifests[0]
    refs = ", ".join(
        ref for ref in (_descriptor_names(descriptor)[1] for descriptor in manifests) if ref
    )
    requested = f"no manifest is named {name!r}" if name else f"it holds {len(manifests)} images"
    raise InvalidArgumentError(
        f"failed to choose an image in {label}: {requested}; give one of the names "
        f"({refs or 'none'}) as NAME"
    )


def _host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", GO_ARCHITECTURES.get(machine, machine)


def _select_platform(files: _Files, index: dict[str, Any], subject: str) -> dict[str, Any]:
    manifests = _manifest_list(index, subject)
    host = _host_platform()
    for descriptor in manifests:
        target = descriptor.get("platform")
        if isinstance(target, dict) and (target.get("os"), target.get("architecture")) == host:
            return descriptor
    if len(manifests) == 1:
        return manifests[0]
    platforms = ", ".join(
        f"{target.get('os')}/{target.get('architecture')}"
        for target in (descriptor.get("platform") for descriptor in manifests)
        if isinstance(target, dict)
    )
    raise UnsupportedError(
        f"failed to choose a platform in {subject} of {files.label}: none is {host[0]}/{host[1]} "
        f"(it has {platforms or 'no platforms'})"
    )


def _manifest_list(index: Any, subject: str) -> list[dict[str, Any]]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(item, dict) for item in manifests):
        raise CorruptInputError(f"failed to read {subject}: it has no list of manifests")
    if not manifests:
        raise CorruptInputError(f"failed to read {subject}: it lists no manifest")
    return manifests


def _resolve_manifest(files: _Files, descriptor: dict[str, Any]) -> tuple[Digest, bytes]:
    """Follow a descriptor through nested indexes to an image manifest; return it verified."""
    for _ in range(MAX_LINK_DEPTH):
        digest = Digest.parse(descriptor.get("digest"), f"a manifest descriptor in {files.label}")
        size = descriptor.get("size")
        data = _read_blob(files, digest, size if isinstance(size, int) else None, "manifest")
        document = _parse_json(data, f"manifest {digest} in {files.label}")
        if not isinstance(document, dict):
            raise CorruptInputError(
                f"failed to read manifest {digest} in {files.label}: not an object"
            )
        media_type = descriptor.get("mediaType") or document.get("mediaType")
        if media_type in INDEX_MEDIA_TYPES or "manifests" in document:
            descriptor = _select_platform(files, document, f"index {digest}")
            continue
        if media_type is not None and media_type not in MANIFEST_MEDIA_TYPES:
            raise UnsupportedError(
                f"failed to read manifest {digest} in {files.label}: media type {media_type} "
                "is not an image manifest"
            )
        return digest, data
    raise CorruptInputError(
        f"failed to read the index of {files.label}: indexes nest deeper than {MAX_LINK_DEPTH}"
    )


def _describe_oci_layout(files: _Files, name: str | None) -> _ImagePlan:
    _check_layout_version(files)
    subject = f"{OCI_INDEX} in {files.label}"
    manifests = _manifest_list(_parse_json(_read_metadata(files, OCI_INDEX), subject), subject)
    selected = _select_oci_manifest(manifests, name, files.label)
    full_name, ref_name = _descriptor_names(selected)
    manifest_digest, manifest_data = _resolve_manifest(files, selected)

    manifest_subject = f"manifest {manifest_digest} in {files.label}"
    manifest = _parse_json(manifest_data, manifest_subject)
    config_descriptor = manifest.get("config")
    layer_descriptors = manifest.get("layers")
    if not isinstance(config_descriptor, dict) or not isinstance(layer_descriptors, list):
        raise CorruptInputError(f"failed to read {manifest_subject}: it has no config or layers")

    config_digest = Digest.parse(
        config_descriptor.get("digest"), f"the config of {manifest_subject}"
    )
    config_size = config_descriptor.get("size")
    config_data = _read_blob(
        files, config_digest, config_size if isinstance(config_size, int) else None, "config"
    )
    diff_ids, created = _parse_config(config_data, f"config {config_digest} in {files.label}")
    if len(layer_descriptors) != len(diff_ids):
        raise CorruptInputError(
            f"failed to read {manifest_subject}: it lists {len(layer_descriptors)} layers, but its "
            f"config has {len(diff_ids)} diff ids"
        )

    layers = tuple(
        _oci_layer(files, descriptor, manifest_subject) for descriptor in layer_descriptors
    )
    default_name = full_name or ref_name or str(config_digest)
    return _ImagePlan(config_digest, diff_ids, created, default_name, layers)


def _oci_layer(files: _Files, descriptor: Any, manifest_subject: str) -> _LayerBlob:
    if not isinstance(descriptor, dict):
        raise CorruptInputError(f"failed to read {manifest_subject}: a layer is not a descriptor")
    digest = Digest.parse(descriptor.get("digest"), f"a layer of {manifest_subject}")
    media_type = descriptor.get("mediaType")
    if media_type is not None and media_type not in LAYER_MEDIA_TYPES:
        raise UnsupportedError(
            f"failed to import layer {digest} of {manifest_subject}: media type {media_type} is "
            "not a tar layer (encrypted and other layer kinds are not supported)"
        )
    size = descriptor.get("size")
    if not isinstance(size, int) or size < 0:
        raise CorruptInputError(
            f"failed to read layer {digest} of {manifest_subject}: invalid size {size!r}"
        )
    path = _blob_path(digest)
    return _LayerBlob(label=path, size_bytes=size, digest=digest, open=_blob_factory(files, path))


# rootfs tarballs


def _describe_rootfs(
    label: str, size_bytes: int, diff_id: Digest, opener: Callable[[], IO[bytes]]
) -> _ImagePlan:
    """Describe a rootfs tarball as an image of one layer, with a generated config."""
    os_name, architecture = _host_platform()
    config = {
        "architecture": architecture,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": [str(diff_id)]},
    }
    config_data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = Digest.of(config_data)
    blob = _LayerBlob(label=label, size_bytes=size_bytes, digest=None, open=opener)
    return _ImagePlan(config_digest, (diff_id,), None, str(config_digest), (blob,))


# --- opening a source ----------------------------------------------------------------------


def _describe_folder(folder: Path, name: str | None) -> _ImagePlan:
    files = _FolderFiles(folder)
    if files.exists(DOCKER_MANIFEST):
        return _describe_docker_save(files, name)
    if files.exists(OCI_LAYOUT_FILE):
        return _describe_oci_layout(files, name)
    raise InvalidArgumentError(
        f"failed to import {folder}: the folder has neither {OCI_LAYOUT_FILE} (an OCI image "
        f"layout) nor {DOCKER_MANIFEST} (an extracted docker save archive)"
    )


def _is_docker_manifest(files: _Files) -> bool:
    """Tell whether the archive has a top-level manifest.json in docker save's form."""
    if not files.exists(DOCKER_MANIFEST) or files.size(DOCKER_MANIFEST) > MAX_METADATA_BYTES:
        return False
    try:
        entries = json.loads(_read_metadata(files, DOCKER_MANIFEST))
    except ValueError:
        return False
    return isinstance(entries, list) and all(
        isinstance(entry, dict) and "Layers" in entry for entry in entries
    )


def _oci_prefix(members: Mapping[str, tarfile.TarInfo], label: str) -> str | None:
    """Return where the OCI layout sits in a tar: "", "<folder>/", or None when it has none."""
    if OCI_LAYOUT_FILE in members:
        return ""
    prefixes = sorted(
        name[: -len(OCI_LAYOUT_FILE)]
        for name in members
        if name.endswith("/" + OCI_LAYOUT_FILE) and name.count("/") == 1
    )
    if len(prefixes) > 1:
        raise InvalidArgumentError(
            f"failed to import {label}: it contains several OCI layouts ({', '.join(prefixes)}); "
            "extract the one to import and give its folder"
        )
    return prefixes[0] if prefixes else None


def _describe_archive(
    archive: tarfile.TarFile, members: Mapping[str, tarfile.TarInfo], label: str, name: str | None
) -> _ImagePlan | None:
    """Describe a docker save archive or a tar of an OCI layout; None for other tars."""
    files = _TarFiles(archive, members, "", label)
    if _is_docker_manifest(files):
        return _describe_docker_save(files, name)
    prefix = _oci_prefix(members, label)
    if prefix is None:
        return None
    return _describe_oci_layout(_TarFiles(archive, members, prefix, label), name)


def _open_tar(
    stream: IO[bytes], label: str, stack: contextlib.ExitStack
) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]] | None:
    """Open a plain tar for reading members by name; None when tarfile cannot read it."""
    try:
        archive = stack.enter_context(tarfile.open(fileobj=stream, mode="r:"))  # noqa: SIM115
    except tarfile.TarError as err:
        # libarchive in the service VM reads tar dialects that tarfile does not. Only an
        # image archive has to be readable here, so such a file is taken as a rootfs.
        log.info("reading %s as a rootfs tarball: tarfile cannot read it (%s)", label, err)
        return None

    # The first header was valid, so a later error means a damaged tar, not another format.
    try:
        return archive, _index_members(archive)
    except tarfile.TarError as err:
        raise CorruptInputError(
            f"failed to read the tar archive {label}: {err}; the file is truncated or corrupt"
        ) from err


def _decompress_to_spool(
    source: Path, folder: Path, stack: contextlib.ExitStack, progress: ImportProgress
) -> tuple[IO[bytes], Digest]:
    """Decompress ``source`` into an unnamed temporary file; return it and the tar's sha256."""
    spool = stack.enter_context(tempfile.TemporaryFile(dir=folder))  # noqa: SIM115
    progress.begin(f"decompress {source.name}", source.stat().st_size)
    try:
        with open(source, "rb", buffering=0) as raw:
            blob = _BlobReader(raw, str(source), None, progress.advance)
            counted = io.BufferedReader(blob, READ_CHUNK_BYTES)
            stream = LayerStream(counted)
            try:
                buffer = memoryview(bytearray(READ_CHUNK_BYTES))
                while count := stream.readinto(buffer):
                    spool.write(buffer[:count])
            finally:
                stream.close()
        spool.flush()
    except OSError as err:
        raise LcowError(
            f"failed to decompress {source} into {folder}: {err}; the data root needs free "
            "space for the uncompressed archive"
        ) from err
    progress.end("decompressed")
    spool.seek(0)
    return spool, Digest("sha256", stream.digest.hexdigest())


def _hash_file(path: Path, progress: ImportProgress) -> Digest:
    progress.begin(f"hash {path.name}", path.stat().st_size)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        while chunk := stream.read(READ_CHUNK_BYTES):
            digest.update(chunk)
            progress.advance(len(chunk))
    progress.end("hashed")
    return Digest("sha256", digest.hexdigest())


def _spool_opener(spool: IO[bytes]) -> Callable[[], IO[bytes]]:
    def open_spool() -> IO[bytes]:
        # A duplicate descriptor, so closing the layer stream keeps the spool open.
        stream = os.fdopen(os.dup(spool.fileno()), "rb", buffering=0)
        stream.seek(0)
        return stream

    return open_spool


def _read_source(
    source: Path,
    name: str | None,
    scratch: Path,
    stack: contextlib.ExitStack,
    progress: ImportProgress,
) -> _ImagePlan:
    """Open ``source``, tell its kind from its content and describe the image to import."""
    if source.is_dir():
        return _describe_folder(source, name)

    with open(source, "rb") as head:
        magic = head.read(len(ZSTD_MAGIC))
    if not magic:
        raise InvalidArgumentError(f"failed to import {source}: the file is empty")

    diff_id: Digest | None = None
    if magic.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
        plain, diff_id = _decompress_to_spool(source, scratch, stack, progress)
        opener = _spool_opener(plain)
        size_bytes = os.fstat(plain.fileno()).st_size
    else:
        plain = stack.enter_context(open(source, "rb"))  # noqa: SIM115
        opener = _blob_factory(_FolderFiles(source.parent), source.name)
        size_bytes = source.stat().st_size

    opened = _open_tar(plain, str(source), stack)
    if opened is not None:
        plan = _describe_archive(*opened, str(source), name)
        if plan is not None:
            return plan

    if diff_id is None:
        diff_id = _hash_file(source, progress)
    return _describe_rootfs(source.name, size_bytes, diff_id, opener)


# --- verified layer streams ----------------------------------------------------------------


class _BlobReader(io.RawIOBase):
    """Read a blob as stored (compressed or not), counting and optionally hashing its bytes."""

    def __init__(
        self, raw: IO[bytes], label: str, algorithm: str | None, on_read: Callable[[int], None]
    ) -> None:
        super().__init__()
        self._raw = raw
        self._label = label
        self._on_read = on_read
        self.hash = hashlib.new(algorithm) if algorithm else None
        self.size_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            chunk = self._raw.read(len(view))
        except (tarfile.TarError, EOFError) as err:
            # tarfile raises these for an archive member cut short. ApplyDiff's feeder only
            # reports OSError and ValueError, so the error becomes a CorruptInputError.
            raise CorruptInputError(
                f"failed to read {self._label}: {err}; the archive is truncated or corrupt"
            ) from err
        count = len(chunk)
        if count:
            view[:count] = chunk
            if self.hash is not None:
                self.hash.update(chunk)
            self.size_bytes += count
            self._on_read(count)
        return count


class _LayerReader(io.RawIOBase):
    """Uncompressed tar of one layer blob, verified against the blob digest and diff id.

    A mismatch raises CorruptInputError from the read that reaches the end of the stream.
    So ApplyDiff fails before it renames the layer image into place, and ``failure`` keeps
    the error. When decompression or conversion fails and the blob's digest is wrong, the
    digest mismatch is reported instead, because it is the cause.
    """

    def __init__(
        self, blob: _LayerBlob, diff_id: Digest, description: str, on_read: Callable[[int], None]
    ) -> None:
        super().__init__()
        self._blob = blob
        self._diff_id = diff_id
        self._description = description
        self._raw = blob.open()
        algorithm = blob.digest.algorithm if blob.digest is not None else None
        self._counter = _BlobReader(self._raw, blob.label, algorithm, on_read)
        self._buffered = io.BufferedReader(self._counter, READ_CHUNK_BYTES)
        try:
            self._layer = LayerStream(self._buffered)
        except BaseException:
            self._raw.close()
            raise
        self._layer_closed = False
        self.verified = False
        self.failure: CorruptInputError | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            count = self._layer.readinto(memoryview(buffer).cast("B"))
        except CorruptInputError as err:
            failure = self.blob_failure()
            if failure is not None:
                raise failure from err
            raise
        if not count and not self.verified:
            self._verify()
        return count

    def blob_failure(self) -> CorruptInputError | None:
        """Return the digest mismatch that explains a failed read or conversion, if any.

        Unless the mismatch is known already, this reads the rest of the blob to hash it.
        """
        if self.failure is None and not self.verified and self._blob.digest is not None:
            # The gzip reader's thread must stop before this thread reads the blob.
            self._close_layer()
            self._drain_blob()
            try:
                self._check_blob()
            except CorruptInputError as err:
                self.failure = err
        return self.failure

    def finish(self) -> None:
        """Read what the converter left unread, then verify (once) that the digests match."""
        if not self.verified:
            self._layer.drain()
            self._verify()

    def _drain_blob(self) -> None:
        while self._buffered.read(READ_CHUNK_BYTES):
            pass

    def _close_layer(self) -> None:
        if not self._layer_closed:
            self._layer_closed = True
            self._layer.close()

    def _verify(self) -> None:
        # Bytes after the end of a compressed stream belong to the blob and its digest.
        self._drain_blob()
        try:
            self._check_blob()
            self._check_diff_id()
        except CorruptInputError as err:
            self.failure = err
            raise
        self.verified = True

    def _check_blob(self) -> None:
        blob = self._blob
        failed = f"failed to verify {self._description} ({blob.label})"
        if self._counter.size_bytes != blob.size_bytes:
            raise CorruptInputError(
                f"{failed}: it has {self._counter.size_bytes} bytes, but {blob.size_bytes} bytes "
                "are expected; the image is truncated or was changed after it was written, so "
                "export or pull it again"
            )
        if blob.digest is None or self._counter.hash is None:
            return
        actual = Digest(blob.digest.algorithm, self._counter.hash.hexdigest())
        if actual != blob.digest:
            raise CorruptInputError(
                f"{failed}: its content has digest {actual}, but the manifest expects "
                f"{blob.digest}; the image is corrupt or was changed after it was written, so "
                "export or pull it again"
            )

    def _check_diff_id(self) -> None:
        actual = Digest("sha256", self._layer.digest.hexdigest())
        if actual != self._diff_id:
            raise CorruptInputError(
                f"failed to verify {self._description} ({self._blob.label}): its uncompressed "
                f"tar has digest {actual}, but the config's rootfs.diff_ids expects "
                f"{self._diff_id}; the image is corrupt or was changed after it was written, "
                "so export or pull it again"
            )

    def close(self) -> None:
        if not self.closed:
            self._close_layer()
            self._raw.close()
        super().close()


# --- converting the layers -----------------------------------------------------------------


def _has_layer_image(driver: Driver, layer_id: str) -> bool:
    return driver.exists(layer_id) and "LayerImage" in driver.get_metadata(layer_id)


def _convert_layer(
    driver: Driver,
    layer_id: str,
    parent: str | None,
    blob: _LayerBlob,
    diff_id: Digest,
    description: str,
    progress: ImportProgress,
) -> None:
    with _LayerReader(blob, diff_id, description, progress.advance) as layer:
        stream = io.BufferedReader(layer, READ_CHUNK_BYTES)
        try:
            driver.apply_diff(layer_id, parent, stream)
        except LcowError as err:
            failure = layer.blob_failure()
            if failure is not None:
                raise failure from err
            raise
        layer.finish()


def _remove_created(driver: Driver, created: list[str]) -> None:
    """Remove the layers a failed import created, top layer first; log what stays."""
    for layer_id in reversed(created):
        try:
            driver.remove(layer_id)
        except (LcowError, OSError) as err:
            log.warning("failed to remove layer %s after a failed import: %s", layer_id, err)
        else:
            log.info("removed layer %s, which the failed import had created", layer_id)


def _import_layers(
    driver: Driver, plan: _ImagePlan, progress: ImportProgress
) -> tuple[list[str], list[str], list[str]]:
    """Convert the layers that the store lacks; return chain ids, converted and present ids."""
    chain = chain_ids([str(diff_id) for diff_id in plan.diff_ids])
    layer_ids = [layer_id_of(chain_id) for chain_id in chain]
    present = [layer_id for layer_id in layer_ids if _has_layer_image(driver, layer_id)]

    # Check that every blob to convert exists before the first conversion starts.
    for layer_id, blob in zip(layer_ids, plan.layers, strict=True):
        if layer_id not in present:
            blob.open().close()

    converted: list[str] = []
    created: list[str] = []
    with contextlib.ExitStack() as undo:
        undo.callback(_remove_created, driver, created)
        parent: str | None = None
        for position, (layer_id, blob, diff_id) in enumerate(
            zip(layer_ids, plan.layers, plan.diff_ids, strict=True), start=1
        ):
            description = f"layer {position} of {len(layer_ids)} {layer_id[:12]}"
            if layer_id in present:
                progress.begin(description, None)
                progress.end("present")
            else:
                if not driver.exists(layer_id):
                    driver.create(layer_id, parent)
                    created.append(layer_id)
                progress.begin(description, blob.size_bytes)
                _convert_layer(driver, layer_id, parent, blob, diff_id, description, progress)
                progress.end("converted")
                converted.append(layer_id)
            parent = layer_id
        undo.pop_all()
    return chain, converted, present


# --- image names ---------------------------------------------------------------------------


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _images_lock(root: Path) -> Iterator[None]:
    """Hold the exclusive flock that imports and removals of one data root take."""
    fd = os.open(root / IMAGES_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            log.info("waiting for another image import or removal in %s to finish", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _remove_stale_temporaries(root)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    # Only a holder of the lock writes temporaries, so those that exist now are left over.
    for stale in root.glob(IMAGES_TEMPORARY_PREFIX + "*" + TEMPORARY_SUFFIX):
        log.info("deleting %s, left by a process that stopped", stale)
        stale.unlink(missing_ok=True)


def _load_images(root: Path) -> dict[str, ImageRecord]:
    path = root / IMAGES_FILE
    try:
        data = json.loads(path.read_bytes())
        return {name: ImageRecord.from_json(name, value) for name, value in data.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptInputError(
            f"failed to read image names {path}: {err!r}; restore the file or delete it (the "
            "layers stay in the store, but lose their names)"
        ) from err


def _save_images(root: Path, images: Mapping[str, ImageRecord]) -> None:
    """Replace ``images.json`` atomically: write a temporary file, fsync it, rename it."""
    document = {name: images[name].to_json() for name in sorted(images)}
    data = (json.dumps(document, indent=2) + "\n").encode()
    fd, temporary = tempfile.mkstemp(
        prefix=IMAGES_TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=root
    )
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, root / IMAGES_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(root)


def validate_name(name: str) -> str:
    """Return ``name`` when it can name an image; raise InvalidArgumentError if not."""
    if (
        not name
        or len(name) > MAX_NAME_LENGTH
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise InvalidArgumentError(
            f"invalid image name {name!r}: use 1 to {MAX_NAME_LENGTH} printable characters "
            "without spaces, such as docker.io/library/debian:bookworm"
        )
    return name


def list_images(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Return the named images of the data root ``root``, sorted by name."""
    images = _load_images(Path(root))
    return [images[name] for name in sorted(images)]


def _unused_layers(record: ImageRecord, others: Iterable[ImageRecord]) -> list[str]:
    """Return the layer ids of ``record`` that no image in ``others`` uses, top layer first."""
    needed = {layer_id for other in others for layer_id in other.layer_ids}
    return [layer_id for layer_id in reversed(record.layer_ids) if layer_id not in needed]


def _check_no_children(driver: Driver, unused: Sequence[str], image: str) -> None:
    """Raise unless each layer to remove has children only among the layers to remove.

    A layer outside every image (a container's layer, for one) may have an image layer as
    its parent, and removing that parent would break the child's chain.
    """
    removable = set(unused)
    for layer_id in driver.layer_ids():
        if layer_id in removable:
            continue
        try:
            chain = driver.chain(layer_id)
        except NotFoundError:
            continue  # another process removed it since layer_ids() listed it
        if chain and chain[0].name in removable:
            raise FailedPreconditionError(
                f"failed to remove image {image}: layer {layer_id} has the image's layer "
                f"{chain[0].name} as its parent; remove layer {layer_id} first "
                f"(lcow remove {layer_id})"
            )


def _remove_layers(driver: Driver, layer_ids: Sequence[str], image: str) -> None:
    for index, layer_id in enumerate(layer_ids):
        try:
            driver.remove(layer_id)
        except LcowError as err:
            left = " ".join(layer_ids[index:])
            raise FailedPreconditionError(
                f"failed to remove layer {layer_id} of image {image}: {err}; the name is gone, "
                f"and the layers {left} remain: remove each with `lcow remove ID` once no "
                "process uses it"
            ) from err
        log.info("removed layer %s of image %s", layer_id, image)


def remove_image(driver: Driver, name: str) -> list[str]:
    """Remove the name ``name`` and the layers no other image uses; return their ids.

    Layers go top first. Nothing changes when a layer outside every image has one of them
    as its parent. When a layer cannot be removed (it is in use), the name is already gone
    and the error lists the layers that remain.
    """
    with _images_lock(driver.root):
        images = _load_images(driver.root)
        record = images.pop(name, None)
        if record is None:
            raise NotFoundError(
                f"failed to remove image {name}: no such image in {driver.root}; "
                "`lcow image ls` lists the names"
            )
        unused = _unused_layers(record, images.values())
        _check_no_children(driver, unused, name)
        _save_images(driver.root, images)
        log.info("removed image name %s", name)
        _remove_layers(driver, unused, name)
    return unused


def _replace_name(driver: Driver, record: ImageRecord) -> list[str]:
    """Store ``record`` under its name; remove the layers only a replaced image used."""
    images = _load_images(driver.root)
    previous = images.get(record.name)
    images[record.name] = record
    _save_images(driver.root, images)
    if previous is None or previous == record:
        return []

    unused = _unused_layers(previous, images.values())
    try:
        _check_no_children(driver, unused, f"{previous.config} (the former {record.name})")
        _remove_layers(driver, unused, f"{previous.config} (the former {record.name})")
    except LcowError as err:
        log.warning("kept the layers of the image that %s named before: %s", record.name, err)
        return []
    return unused


def import_image(
    driver: Driver,
    source: str | os.PathLike[str],
    name: str | None = None,
    *,
    progress: ImportProgress | None = None,
) -> ImportResult:
    """Import the image in ``source`` into the store and name it.

    ``source`` is a docker save archive, an OCI image layout (a folder or a tar of one) or a
    rootfs tarball, and the kind is detected from the content. ``name`` chooses the image
    when the source contains several, and it is the name the image gets. The default name
    is the archive's first tag, the layout's ref name, or else the config digest. A name
    that pointed to another image moves to this one, and the layers that only the other
    image used are removed.

    On error, the layers this import created are removed and ``images.json`` is unchanged.
    """
    if name is not None:
        validate_name(name)
    source_path = Path(source)
    report = progress if progress is not None else _NoProgress()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_images_lock(driver.root))
        plan = _read_source(source_path, name, driver.root, stack, report)
        image_name = validate_name(name or plan.default_name)
        log.info("importing %s as %s: %d layers", source_path, image_name, len(plan.layers))

        chain, converted, present = _import_layers(driver, plan, report)
        record = ImageRecord(
            name=image_name,
            config=str(plan.config_digest),
            layers=tuple(chain),
            top=layer_id_of(chain[-1]) if chain else None,
            created=plan.created,
        )
        removed = _replace_name(driver, record)

    log.info(
        "imported %s as %s: %d layers converted, %d present",
        source_path,
        image_name,
        len(converted),
        len(present),
    )
    return ImportResult(record, tuple(converted), tuple(present), tuple(removed))
