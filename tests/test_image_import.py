"""``lcow image import``, ``ls`` and ``rm``, checked against umoci, e2fsck and the kernel.

The corpus contains the image ``full`` (4 layers) three ways: as a docker save archive, as an OCI
image layout, and here also as a tar of that layout. Each is imported once per module into a
store of its own. Every layer image must pass e2fsck, and the kernel's overlayfs over the
loop-mounted layer images must show the same tree as ``umoci unpack`` of the layout. Small
images built from tables in this file cover names, removal and the error paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import posixpath
import shutil
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import click
import pytest
from click.testing import CliRunner, Result

import tarbuild
from lcow.cli import main
from lcow.cli_image import image
from lcow.driver import Driver
from lcow.errors import CorruptInputError, InvalidArgumentError, NotFoundError
from lcow.image import ImportResult, import_image, list_images
from oracle import (
    IMPLICIT_DIRECTORY_MODE,
    IMPLICIT_DIRECTORY_OWNER,
    ROOT,
    Snapshot,
    compare_trees,
    e2fsck_clean,
    format_differences,
    implicit_directory_mtime_ns,
    list_tar_members,
    loop_mount,
    require_root,
    require_tool,
    run_tool,
    skip_or_fail,
    snapshot_tree,
    split_lost_found,
)

FULL_TAG: Final = "full"
DOCKER_ARCHIVE_TAG: Final = "docker.io/corpus/full:latest"  # RepoTags[0] of the corpus archive
LAYOUT_FOLDER: Final = "oci"
DOCKER_ARCHIVE: Final = "image-docker-archive.tar"
SOURCE_KINDS: Final = ("docker-archive", "oci-layout", "oci-layout-tar")
LAYER_MEDIA_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_MEDIA_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
REF_NAME: Final = "org.opencontainers.image.ref.name"


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_store(root: Path) -> Iterator[Driver]:
    """Open the store at ``root`` and stop its service VMs when the block ends."""
    driver = Driver(root)
    try:
        yield driver
    finally:
        driver.service_vms.terminate_all()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def expected_chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Chain ids as the OCI image spec (config.md) defines them, written out for the test."""
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append(sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hex_digits = digest.partition(":")
    return layout / "blobs" / algorithm / hex_digits


def read_manifest(layout: Path, tag: str) -> dict[str, Any]:
    """Return the manifest that ``index.json`` names ``tag``, read without lcow."""
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get(REF_NAME) == tag:
            manifest: dict[str, Any] = json.loads(
                blob_path(layout, descriptor["digest"]).read_text()
            )
            return manifest
    raise KeyError(f"{layout} has no manifest named {tag}")


@dataclasses.dataclass(frozen=True)
class CorpusImage:
    """The corpus image ``full`` as its OCI layout describes it."""

    layout: Path
    docker_archive: Path
    config_digest: str
    config: dict[str, Any]
    layer_blobs: list[Path]  # base layer first

    @property
    def chain_ids(self) -> list[str]:
        return expected_chain_ids(self.config["rootfs"]["diff_ids"])

    @property
    def layer_ids(self) -> list[str]:
        return [chain_id.partition(":")[2] for chain_id in self.chain_ids]


@pytest.fixture(scope="module")
def corpus_image(corpus: Path) -> CorpusImage:
    out = corpus.parent
    layout = out / LAYOUT_FOLDER
    docker_archive = out / DOCKER_ARCHIVE
    if not (layout / "index.json").is_file() or not docker_archive.is_file():
        skip_or_fail(
            f"corpus images missing in {out}: {LAYOUT_FOLDER}/ and {DOCKER_ARCHIVE}; build the "
            "corpus (docs/corpus.md)"
        )
    manifest = read_manifest(layout, FULL_TAG)
    config_digest = manifest["config"]["digest"]
    return CorpusImage(
        layout=layout,
        docker_archive=docker_archive,
        config_digest=config_digest,
        config=json.loads(blob_path(layout, config_digest).read_text()),
        layer_blobs=[blob_path(layout, layer["digest"]) for layer in manifest["layers"]],
    )


@dataclasses.dataclass(frozen=True)
class Imported:
    """One import of the corpus image into a store of its own."""

    kind: str
    root: Path
    source: Path
    name: str | None  # the NAME argument given to the import
    result: ImportResult


def corpus_source(kind: str, image_files: CorpusImage, folder: Path) -> tuple[Path, str | None]:
    if kind == "docker-archive":
        return image_files.docker_archive, None
    if kind == "oci-layout":
        return image_files.layout, FULL_TAG
    # A tar of the layout folder: its members are oci/index.json, oci/blobs/..., so the
    # layout sits one folder deep in the archive.
    archive = folder / "oci.tar"
    run_tool(["tar", "--create", f"--file={archive}", "-C", str(image_files.layout.parent), "oci"])
    return archive, FULL_TAG


@pytest.fixture(scope="module", params=SOURCE_KINDS)
def imported(
    request: pytest.FixtureRequest,
    corpus_image: CorpusImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Imported:
    kind: str = request.param
    folder = tmp_path_factory.mktemp(kind)
    source, name = corpus_source(kind, corpus_image, folder)
    root = folder / "store"
    with open_store(root) as driver:
        result = import_image(driver, source, name)
    return Imported(kind, root, source, name, result)


def layer_members_by_layer(blobs: Sequence[Path]) -> list[set[bytes]]:
    return [{member.name for member in list_tar_members(blob)} for blob in blobs]


def ancestors(path: bytes) -> Iterator[bytes]:
    while path != ROOT:
        path = posixpath.dirname(path) or ROOT
        yield path


def implicit_directories(layers: Sequence[set[bytes]]) -> set[bytes]:
    """Return the directories whose topmost layer names them only as a parent of a member."""
    explicit: dict[bytes, bool] = {}
    for names in layers:  # base layer first, so that a higher layer decides
        parents = {parent for name in names for parent in ancestors(name)}
        for parent in parents - names:
            explicit[parent] = False
        for name in names:
            explicit[name] = True
    return {path for path, is_explicit in explicit.items() if not is_explicit}


def expected_merged_view(unpacked: Snapshot, implicit: set[bytes]) -> Snapshot:
    """Turn umoci's rootfs into what overlayfs shows over lcow's layer images.

    A directory that a layer contains only as the parent of its members gets fixed metadata in
    that layer's image (tar2ext4's implicit directories), and overlayfs shows a directory's
    metadata from the topmost layer that has it. umoci instead keeps the metadata of the
    lower layer's directory. dockerd's overlay2 driver behaves like lcow here: it creates
    such parents in the upper layer with MkdirAll.
    """
    uid, gid = IMPLICIT_DIRECTORY_OWNER
    expected = dict(unpacked)
    for path in implicit & unpacked.keys():
        if unpacked[path].kind == "directory":
            expected[path] = dataclasses.replace(
                unpacked[path],
                mode=IMPLICIT_DIRECTORY_MODE,
                uid=uid,
                gid=gid,
                mtime_ns=implicit_directory_mtime_ns(),
                xattrs=(),
            )
    return expected


@pytest.fixture(scope="module")
def umoci_tree(corpus_image: CorpusImage, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """Snapshot of ``umoci unpack`` of the layout's ``full``, as overlayfs must show it."""
    require_root()  # umoci restores owners, device nodes and xattrs only as root
    require_tool("umoci")
    bundle = tmp_path_factory.mktemp("umoci") / "bundle"
    run_tool(["umoci", "unpack", "--image", f"{corpus_image.layout}:{FULL_TAG}", str(bundle)])
    unpacked = snapshot_tree(bundle / "rootfs")
    implicit = implicit_directories(layer_members_by_layer(corpus_image.layer_blobs))
    return expected_merged_view(unpacked, implicit)


@contextlib.contextmanager
def overlay_mount(layer_images: Sequence[Path], mountpoint: Path) -> Iterator[Path]:
    """Loop-mount the layer images (base first) and stack them read-only with overlayfs.

    On exit, also when the body raises, the overlay and every loop mount are unmounted and
    their loop devices detached.
    """
    with contextlib.ExitStack() as cleanup:
        lowers = [cleanup.enter_context(loop_mount(layer)) for layer in layer_images]
        mountpoint.mkdir()
        cleanup.callback(mountpoint.rmdir)
        lowerdir = ":".join(str(lower) for lower in reversed(lowers))  # top layer first
        run_tool(
            ["mount", "-t", "overlay", "-o", f"ro,lowerdir={lowerdir}", "overlay", str(mountpoint)]
        )
        cleanup.callback(run_tool, ["umount", str(mountpoint)])
        yield mountpoint


# --- the corpus image, imported three ways ----------------------------------------------


def test_import_converts_every_layer(imported: Imported, corpus_image: CorpusImage) -> None:
    assert imported.result.converted == tuple(corpus_image.layer_ids)
    assert imported.result.present == ()


def test_import_uses_chain_ids(imported: Imported, corpus_image: CorpusImage) -> None:
    record = imported.result.image

    assert record.layers == tuple(corpus_image.chain_ids)
    assert record.top == corpus_image.layer_ids[-1]
    assert record.config == corpus_image.config_digest
    assert record.created == corpus_image.config["created"]


def test_import_default_names(imported: Imported) -> None:
    expected = DOCKER_ARCHIVE_TAG if imported.kind == "docker-archive" else FULL_TAG

    assert imported.result.image.name == expected


def test_images_json_record(imported: Imported, corpus_image: CorpusImage) -> None:
    names = json.loads((imported.root / "images.json").read_text())

    assert names == {
        imported.result.image.name: {
            "config": corpus_image.config_digest,
            "layers": corpus_image.chain_ids,
            "top": corpus_image.layer_ids[-1],
            "created": corpus_image.config["created"],
        }
    }


def test_layer_chain_parents(imported: Imported, corpus_image: CorpusImage) -> None:
    with open_store(imported.root) as driver:
        for index, layer_id in enumerate(corpus_image.layer_ids):
            parents = [folder.name for folder in driver.chain(layer_id)]
            assert parents == corpus_image.layer_ids[:index][::-1], layer_id


def test_layer_images_e2fsck(imported: Imported, corpus_image: CorpusImage) -> None:
    for layer_id in corpus_image.layer_ids:
        e2fsck_clean(imported.root / layer_id / "layer.vhd")


@pytest.mark.root
def test_merged_view_equals_umoci(
    imported: Imported, corpus_image: CorpusImage, umoci_tree: Snapshot, tmp_path: Path
) -> None:
    layer_images = [imported.root / layer_id / "layer.vhd" for layer_id in corpus_image.layer_ids]

    with overlay_mount(layer_images, tmp_path / "merged") as merged:
        actual = snapshot_tree(merged)

    # Each layer image has its own lost+found; overlayfs shows the top layer's. Whiteouts and
    # opaque markers need no rule: overlayfs hides whited-out paths and the opaque xattr,
    # and umoci applies both, so neither tree has them.
    actual, lost_found_problems = split_lost_found(actual)
    assert lost_found_problems == []
    differences = compare_trees(umoci_tree, actual)
    assert differences == [], format_differences(differences)


def test_reimport_converts_nothing(imported: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    conversions: list[str] = []
    original_apply_diff = Driver.apply_diff

    def counting_apply_diff(driver: Driver, layer_id: str, parent: str | None, diff: Any) -> int:
        conversions.append(layer_id)
        return original_apply_diff(driver, layer_id, parent, diff)

    monkeypatch.setattr(Driver, "apply_diff", counting_apply_diff)
    with open_store(imported.root) as driver:
        again = import_image(driver, imported.source, imported.name)

    assert conversions == []
    assert again.converted == ()
    assert again.present == imported.result.image.layer_ids
    assert again.image == imported.result.image


# --- the corpus layout: errors, other tags, rootfs tarballs -----------------------------


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as blob:
        blob.seek(offset)
        original = blob.read(1)
        blob.seek(offset)
        blob.write(bytes([original[0] ^ 0xFF]))


def test_tampered_blob_fails(corpus_image: CorpusImage, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(corpus_image.layout, layout)
    base_layer, new_layer, tampered_layer = corpus_image.layer_ids[:3]
    tampered_blob = layout / corpus_image.layer_blobs[2].relative_to(corpus_image.layout)
    tampered_digest = "sha256:" + tampered_blob.name

    with open_store(tmp_path / "store") as driver:
        import_image(driver, layout, "base")
        flip_byte(tampered_blob, tampered_blob.stat().st_size // 2)
        with pytest.raises(CorruptInputError) as failure:
            import_image(driver, layout, FULL_TAG)
        layers_after = driver.layer_ids()
        names_after = [record.name for record in list_images(driver.root)]

    message = str(failure.value)
    assert tampered_digest in message
    assert "its content has digest sha256:" in message
    assert tampered_layer[:12] in message
    assert layers_after == [base_layer]
    assert new_layer not in layers_after
    assert names_after == ["base"]


def test_rootfs_tarball_one_layer(corpus: Path, tmp_path: Path) -> None:
    tarball = corpus / "L1-base.tar.gz"
    with gzip.open(tarball) as plain:
        diff_id = hashlib.file_digest(plain, "sha256").hexdigest()

    with open_store(tmp_path / "store") as driver:
        result = import_image(driver, tarball)
        layer_ids = driver.layer_ids()

    assert result.image.layers == (f"sha256:{diff_id}",)
    assert result.image.top == diff_id
    assert result.converted == (diff_id,)
    assert layer_ids == [diff_id]
    assert result.image.name == result.image.config
    e2fsck_clean(tmp_path / "store" / diff_id / "layer.vhd")


def test_layout_without_name_fails(corpus_image: CorpusImage, tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as driver, pytest.raises(InvalidArgumentError) as failure:
        import_image(driver, corpus_image.layout)

    message = str(failure.value)
    assert "holds 5 images" in message
    assert "base-py" in message


def test_layout_image_without_layers(corpus_image: CorpusImage, tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as driver:
        result = import_image(driver, corpus_image.layout, "empty")
        layer_ids = driver.layer_ids()

    assert result.image.layers == ()
    assert result.image.top is None
    assert layer_ids == []


# --- small images from tables ------------------------------------------------------------


def layer_tar(*files: tuple[str, bytes]) -> bytes:
    members = [tarbuild.regular(name, data) for name, data in files]
    return tarbuild.tar_bytes(members)


BASE: Final = layer_tar(("etc/hostname", b"base\n"), ("etc/motd", b"hello\n"))
CHILD: Final = layer_tar(("app/run", b"#!/bin/sh\n"))
OTHER: Final = layer_tar(("srv/data", b"other\n"))


def write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_layout(layout: Path, images: Mapping[str, Sequence[bytes]]) -> None:
    """Write an OCI layout whose images (ref name: plain layer tars, base first) share blobs.

    Layers are stored gzip-compressed, as registries serve them.
    """
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors = []
    for name, layers in images.items():
        layer_descriptors = []
        for layer in layers:
            compressed = gzip.compress(layer, mtime=0)
            digest = write_blob(layout, compressed)
            layer_descriptors.append(
                {"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": len(compressed)}
            )
        config = json.dumps(
            {
                "created": "2024-01-02T03:04:05Z",
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256_digest(layer) for layer in layers],
                },
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": write_blob(layout, config),
                    "size": len(config),
                },
                "layers": layer_descriptors,
            }
        ).encode()
        descriptors.append(
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": write_blob(layout, manifest),
                "size": len(manifest),
                "annotations": {REF_NAME: name},
            }
        )
    index = {"schemaVersion": 2, "manifests": descriptors}
    (layout / "index.json").write_text(json.dumps(index))


def write_docker_archive(
    path: Path, tag: str, layers: Sequence[bytes], diff_ids: Sequence[str]
) -> None:
    """Write a docker save archive in the classic form: ``<n>/layer.tar`` and ``<id>.json``."""
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_names = [f"{index}/layer.tar" for index in range(len(layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}])
    files = [
        *zip(layer_names, layers, strict=True),
        (config_name, config),
        ("manifest.json", manifest.encode()),
    ]
    with tarfile.open(path, "w") as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def layer_id(*layers: bytes) -> str:
    """Return the store's layer id of the top of ``layers`` (base first)."""
    return expected_chain_ids([sha256_digest(layer) for layer in layers])[-1].partition(":")[2]


def test_wrong_diff_id_fails(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    wrong_diff_id = sha256_digest(b"not the layer")
    write_docker_archive(archive, "wrong:latest", [BASE], [wrong_diff_id])

    with open_store(tmp_path / "store") as driver:
        with pytest.raises(CorruptInputError) as failure:
            import_image(driver, archive)
        layers_after = driver.layer_ids()
        names_after = list_images(driver.root)

    message = str(failure.value)
    assert sha256_digest(BASE) in message
    assert wrong_diff_id in message
    assert "0/layer.tar" in message
    assert layers_after == []
    assert names_after == []


def test_truncated_archive_fails(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, "app:1", [BASE], [sha256_digest(BASE)])
    with archive.open("r+b") as stream:
        stream.truncate(len(BASE) // 2)

    with open_store(tmp_path / "store") as driver:
        with pytest.raises(CorruptInputError) as failure:
            import_image(driver, archive)
        layers_after = driver.layer_ids()

    assert "the file is truncated or corrupt" in str(failure.value)
    assert layers_after == []


def test_docker_archive_classic_layout(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(
        archive, "app:1", [BASE, CHILD], [sha256_digest(BASE), sha256_digest(CHILD)]
    )

    with open_store(tmp_path / "store") as driver:
        result = import_image(driver, archive)

    assert result.image.name == "app:1"
    assert result.image.top == layer_id(BASE, CHILD)


def test_missing_blob_converts_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, {"app": [BASE, CHILD]})
    child_blob = blob_path(layout, sha256_digest(gzip.compress(CHILD, mtime=0)))
    child_blob.unlink()

    with open_store(tmp_path / "store") as driver:
        with pytest.raises(NotFoundError) as failure:
            import_image(driver, layout)
        layers_after = driver.layer_ids()

    assert child_blob.name in str(failure.value)
    assert layers_after == []


def test_name_tag_picks_manifest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, {"one": [BASE], "two": [OTHER]})

    with open_store(tmp_path / "store") as driver:
        result = import_image(driver, layout, "example.com/app:two")

    assert result.image.name == "example.com/app:two"
    assert result.image.top == layer_id(OTHER)


def test_gzip_docker_archive(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, "app:1", [BASE], [sha256_digest(BASE)])
    compressed = tmp_path / "image.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes()))

    with open_store(tmp_path / "store") as driver:
        result = import_image(driver, compressed)

    assert result.image.name == "app:1"
    assert result.image.top == layer_id(BASE)


def test_import_replaces_name(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, {"one": [BASE], "two": [OTHER]})
    renamed = tmp_path / "renamed"
    write_layout(renamed, {"one": [OTHER]})

    with open_store(tmp_path / "store") as driver:
        import_image(driver, layout, "one")
        replaced = import_image(driver, renamed, "one")
        layers_after = driver.layer_ids()

    assert replaced.removed == (layer_id(BASE),)
    assert layers_after == [layer_id(OTHER)]


# --- the command line, in-process ----------------------------------------------------------


@click.group()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--storage-opt", "storage_opts", multiple=True)
def standalone(root: Path | None, storage_opts: tuple[str, ...]) -> None:
    """A root group of another program that defines lcow's store options and adds ``image``."""
    del root, storage_opts


standalone.add_command(image)


def run(root: Path, *arguments: str) -> Result:
    return CliRunner().invoke(main, ["--root", str(root), "image", *arguments])


def test_cli_image_under_another_root_group(layout: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    runner = CliRunner()

    imported = runner.invoke(
        standalone, ["--root", str(root), "image", "import", str(layout), "child"]
    )
    listed = runner.invoke(standalone, ["--root", str(root), "image", "ls", "--json"])

    assert imported.exit_code == 0, imported.output
    assert listed.exit_code == 0, listed.output
    assert [record["name"] for record in json.loads(listed.output)] == ["child"]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    folder = tmp_path / "layout"
    write_layout(folder, {"base": [BASE], "child": [BASE, CHILD]})
    return folder


def test_cli_import_summary(layout: Path, tmp_path: Path) -> None:
    result = run(tmp_path / "store", "import", str(layout), "child")

    assert result.exit_code == 0, result.output
    top = layer_id(BASE, CHILD)[:12]
    assert result.stdout == f"imported child: 2 layers, 2 converted, 0 present; top layer {top}\n"


def test_cli_import_progress(layout: Path, tmp_path: Path) -> None:
    result = run(tmp_path / "store", "import", "--progress", str(layout), "child")

    assert result.exit_code == 0, result.output
    assert f"layer 1 of 2 {layer_id(BASE)[:12]}" in result.stderr
    assert f"layer 2 of 2 {layer_id(BASE, CHILD)[:12]}" in result.stderr


def test_cli_import_quiet_without_terminal(layout: Path, tmp_path: Path) -> None:
    result = run(tmp_path / "store", "import", str(layout), "child")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_cli_ls_table(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, "import", str(layout), "base")
    run(store, "import", str(layout), "child")

    result = run(store, "ls")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CONFIG", "LAYERS", "TOP", "LAYER", "CREATED"]
    assert lines[1].split()[0] == "base"
    assert lines[1].split()[2:] == ["1", layer_id(BASE)[:12], "2024-01-02T03:04:05Z"]
    assert lines[2].split()[0] == "child"
    assert lines[2].split()[2:] == ["2", layer_id(BASE, CHILD)[:12], "2024-01-02T03:04:05Z"]


def test_cli_ls_json(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, "import", str(layout), "child")

    result = run(store, "ls", "--json")

    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout)
    assert [entry["name"] for entry in images] == ["child"]
    assert images[0]["layers"] == expected_chain_ids([sha256_digest(BASE), sha256_digest(CHILD)])
    assert images[0]["top"] == layer_id(BASE, CHILD)
    assert images[0]["created"] == "2024-01-02T03:04:05Z"


def test_cli_ls_empty_store(tmp_path: Path) -> None:
    result = run(tmp_path / "store", "ls", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_cli_rm_keeps_shared_layers(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, "import", str(layout), "base")
    run(store, "import", str(layout), "child")

    result = run(store, "rm", "child")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "removed image child",
        f"removed layer {layer_id(BASE, CHILD)}",
    ]
    with open_store(store) as driver:
        assert driver.layer_ids() == [layer_id(BASE)]
        assert [record.name for record in list_images(driver.root)] == ["base"]


def test_cli_rm_last_image_empties_store(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, "import", str(layout), "child")

    result = run(store, "rm", "--json", "child")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"name": "child", "removed_layers": [layer_id(BASE, CHILD), layer_id(BASE)]}
    ]
    with open_store(store) as driver:
        assert driver.layer_ids() == []


def test_cli_rm_unknown_name(tmp_path: Path) -> None:
    result = run(tmp_path / "store", "rm", "missing")

    assert result.exit_code == 1
    assert "failed to remove image missing: no such image" in result.output


def test_cli_rm_rejects_layer_with_child(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, "import", str(layout), "base")
    with open_store(store) as driver:
        driver.create("container", layer_id(BASE))

    result = run(store, "rm", "base")

    assert result.exit_code == 1
    assert f"layer container has the image's layer {layer_id(BASE)} as its parent" in result.output
    with open_store(store) as driver:
        assert [record.name for record in list_images(driver.root)] == ["base"]
        assert driver.layer_ids() == sorted(["container", layer_id(BASE)])
