"""The qemu backend: driver operations through a real utility VM, checked against the process
backend, plus hot-plug, failure handling and the pieces of ``lcow vm build``.

The VM assets come from ``$LCOW_VM_ASSETS`` (default /var/cache/lcow-vm, which .ci/run
builds with ``lcow vm build``). The VMs run under TCG (``lcow.accel=tcg``), because KVM is
not usable on every machine that runs these tests. One test checks that the KVM probe ends
in bounded time either way. Each VM boot takes about 10 to 15 s under TCG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from lcow import vhd, vhdx
from lcow.disk import open_disk
from lcow.driver import Driver
from lcow.errors import FailedPreconditionError, InvalidArgumentError, ServiceVMError
from lcow.ext4.reader import Ext4Reader
from lcow.layer.tar2ext4 import convert_tar
from lcow.options import DriverOptions
from lcow.servicevm import cpio, vmbuild
from lcow.servicevm.qemu import QemuServiceVM, disk_container
from lcow.servicevm.qemu_config import PROBE_TIMEOUT_S, QemuConfig, select_accelerator
from oracle import e2fsck_clean, require_tool, skip_or_fail
from tarbuild import directory, regular, symlink, tar_bytes

DEFAULT_ASSETS: Final = Path("/var/cache/lcow-vm")
TIMEOUT_S: Final = 120.0
SANDBOX_GB: Final = 1  # small, so formatting in the guest stays quick under TCG

LAYER_MEMBERS: Final = [
    directory("etc", mode=0o755),
    regular("etc/hostname", b"utility\n", mode=0o644),
    regular("etc/.wh.removed", b""),
    directory("usr/share/doc", mode=0o755),
    regular("usr/share/doc/big.bin", bytes(range(256)) * 4096, mode=0o600),
    symlink("usr/share/doc/latest", "big.bin"),
    regular("opt/.wh..wh..opq", b""),
]


@pytest.fixture(scope="module")
def assets() -> Path:
    """The folder with vmlinuz and initrd.img; skip (fail in CI) when it is missing."""
    require_tool("qemu-system-x86_64")
    folder = Path(os.environ.get("LCOW_VM_ASSETS") or DEFAULT_ASSETS)
    if not (folder / "vmlinuz").is_file() or not (folder / "initrd.img").is_file():
        skip_or_fail(
            f"no utility VM in {folder}; build one with `lcow vm build {folder}` or point "
            "LCOW_VM_ASSETS at one"
        )
    return folder


@pytest.fixture(scope="module")
def layer_tar() -> bytes:
    return tar_bytes(LAYER_MEMBERS)


def _qemu_children() -> list[int]:
    """Return the pids of QEMU processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "comm").read_text().strip()
            if int(fields[1]) == os.getpid() and command.startswith("qemu-system"):
                found.append(int(entry.name))
    return found


def _qemu_options(assets: Path, *, global_mode: bool) -> list[str]:
    return [
        "lcow.backend=qemu",
        f"lcow.kirdpath={assets}",
        "lcow.accel=tcg",
        f"lcow.timeout={TIMEOUT_S:g}",
        f"lcow.sandboxsize={SANDBOX_GB}",
        f"lcow.globalmode={'true' if global_mode else 'false'}",
    ]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(disk_path: Path) -> list[tuple[bytes, int, int]]:
    """List (path, mode, size) of every entry below the disk's root, for tree comparisons."""
    entries: list[tuple[bytes, int, int]] = []
    with open_disk(disk_path) as disk:
        reader = Ext4Reader(disk.device, disk.size_bytes)
        pending = [(b"", 2)]
        while pending:
            prefix, inode = pending.pop()
            for name, child, _ in reader.iterdir(inode):
                info = reader.inode(child)
                entries.append((prefix + b"/" + name, info.mode, info.size))
                if stat.S_ISDIR(info.mode) and name != b"lost+found":
                    pending.append((prefix + b"/" + name, child))
    return sorted(entries)


def _run_operations(driver: Driver, layer_tar: bytes) -> dict[str, object]:
    """ApplyDiff, Diff, CreateReadWrite (default and other size) and Changes on one store."""
    results: dict[str, object] = {}
    driver.create("base", None)
    results["apply_size"] = driver.apply_diff("base", None, io.BytesIO(layer_tar))
    with driver.diff("base") as stream:
        results["diff"] = stream.read()
    # A utility VM takes a regular file as a disk, so write_diff copies the stream into it.
    with tempfile.TemporaryFile("wb") as output:
        written_size = driver.write_diff("base", None, output)
        results["written_diff"] = os.pread(output.fileno(), written_size + 1, 0)
    driver.create_read_write("container", "base")
    driver.create_read_write("other-size", "base", {"size": "2G"})
    with driver.diff("container", "base") as stream:
        results["sandbox_diff"] = stream.read()
    results["changes"] = driver.changes("base")
    results["layer_sha256"] = _sha256(driver.root / "base" / "layer.vhd")
    results["sandbox_tree"] = _tree(driver.root / "container" / "sandbox.vhdx")
    results["other_size_tree"] = _tree(driver.root / "other-size" / "sandbox.vhdx")
    return results


@pytest.fixture(scope="module")
def process_results(
    tmp_path_factory: pytest.TempPathFactory, layer_tar: bytes
) -> dict[str, object]:
    """The same operations through the process backend: what the qemu backend must equal."""
    root = tmp_path_factory.mktemp("process-store")
    driver = Driver(root, [f"lcow.sandboxsize={SANDBOX_GB}"])
    try:
        return _run_operations(driver, layer_tar)
    finally:
        driver.cleanup()


@pytest.mark.parametrize("global_mode", [False, True], ids=["safe", "global"])
def test_driver_operations_equal_process_backend(
    assets: Path,
    tmp_path: Path,
    layer_tar: bytes,
    process_results: dict[str, object],
    global_mode: bool,
) -> None:
    driver = Driver(tmp_path / "store", _qemu_options(assets, global_mode=global_mode))
    try:
        results = _run_operations(driver, layer_tar)
        started = driver.service_vms.started_count
    finally:
        driver.cleanup()

    assert started == (1 if global_mode else 7)
    assert results["layer_sha256"] == process_results["layer_sha256"]
    assert results["apply_size"] == process_results["apply_size"]
    assert results["diff"] == process_results["diff"]
    assert results["written_diff"] == results["diff"]
    assert process_results["written_diff"] == process_results["diff"]
    assert results["sandbox_diff"] == process_results["sandbox_diff"]
    assert results["changes"] == process_results["changes"]
    assert results["sandbox_tree"] == process_results["sandbox_tree"]
    assert results["other_size_tree"] == process_results["other_size_tree"]
    e2fsck_clean(tmp_path / "store" / "base" / "layer.vhd")
    assert vhdx.VhdxFile(tmp_path / "store" / "other-size" / "sandbox.vhdx").virtual_size == 2 << 30
    assert _qemu_children() == []
    assert list((tmp_path / "store" / "scratch").iterdir()) == []


@pytest.fixture
def utility_vm(assets: Path, tmp_path: Path) -> Iterator[QemuServiceVM]:
    config = QemuConfig(assets / "vmlinuz", assets / "initrd.img", accel="tcg")
    service_vm = QemuServiceVM(
        "test-vm", timeout_s=TIMEOUT_S, config=config, spool_folder=tmp_path / "spool"
    )
    service_vm.start()
    try:
        yield service_vm
    finally:
        service_vm.terminate()


def _layer_images(folder: Path, count: int) -> list[Path]:
    """Write ``count`` layer images, each from the layer members plus one file of its own."""
    images = []
    for index in range(count):
        own = regular(f"own-{index}", f"layer {index}\n".encode(), mode=0o644)
        image = folder / f"layer-{index}.vhd"
        convert_tar(io.BytesIO(tar_bytes([*LAYER_MEMBERS, own])), image)
        images.append(image)
    return images


def test_hot_add_and_remove_several_disks(utility_vm: QemuServiceVM, tmp_path: Path) -> None:
    images = _layer_images(tmp_path, 5)
    for _ in range(2):  # a second round reuses the root ports the first one freed
        slots = []
        started = time.monotonic()
        for image in images:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                slots.append(utility_vm.attach(fd))
            finally:
                os.close(fd)
        attach_s = (time.monotonic() - started) / len(images)

        layer = [[slot, None] for slot in slots]
        found = utility_vm.request("changes", layer=layer, parent=[], own_parent=False)
        names = {path for path, _ in found["changes"]}
        assert {f"/own-{index}" for index in range(len(images))} <= names

        started = time.monotonic()
        for slot in slots:
            utility_vm.detach(slot)
        detach_s = (time.monotonic() - started) / len(images)
        print(f"hot-add {attach_s:.2f} s, hot-remove {detach_s:.2f} s per disk")
    assert utility_vm.running
    assert utility_vm._slot_table == {}


def test_disk_that_fails_to_attach(utility_vm: QemuServiceVM, tmp_path: Path) -> None:
    broken = tmp_path / "broken.vhdx"
    broken.write_bytes(b"vhdxfile" + bytes(1 << 20))  # the signature, then no valid header
    pid = utility_vm.process.pid if utility_vm.process else 0
    fd = os.open(broken, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ServiceVMError, match=r"failed to attach a vhdx disk .*blockdev-add"):
            utility_vm.attach(fd)
    finally:
        os.close(fd)

    assert utility_vm.running
    assert utility_vm.request("hello")["isolation"] == ["vm"]
    utility_vm.terminate()
    assert not Path(f"/proc/{pid}").exists()
    assert list((tmp_path / "spool").glob("*")) == []


def test_guest_that_stops_answering(utility_vm: QemuServiceVM) -> None:
    assert utility_vm.qmp is not None
    pid = utility_vm.process.pid if utility_vm.process else 0
    utility_vm.qmp.execute("stop")  # freezes the guest's CPU, as a hung guest would be

    with pytest.raises(ServiceVMError, match=r"did not answer hello within 3 s"):
        utility_vm.request("hello", timeout_s=3)

    started = time.monotonic()
    utility_vm.terminate(stop_timeout_s=2)
    assert time.monotonic() - started < 30
    assert not Path(f"/proc/{pid}").exists()
    assert _qemu_children() == []


def test_boot_that_exceeds_the_timeout(assets: Path, tmp_path: Path) -> None:
    config = QemuConfig(assets / "vmlinuz", assets / "initrd.img", accel="tcg")
    service_vm = QemuServiceVM("slow-vm", timeout_s=1, config=config, spool_folder=tmp_path)

    started = time.monotonic()
    with pytest.raises(ServiceVMError, match=r"failed to boot service VM slow-vm: .*within"):
        service_vm.start()

    assert time.monotonic() - started < 20
    assert not service_vm.running
    assert _qemu_children() == []
    assert list(tmp_path.iterdir()) == []


def test_missing_kernel_names_the_build_command(tmp_path: Path) -> None:
    config = QemuConfig(tmp_path / "vmlinuz", tmp_path / "initrd.img", accel="tcg")
    service_vm = QemuServiceVM("no-kernel", timeout_s=5, config=config, spool_folder=tmp_path)
    with pytest.raises(FailedPreconditionError, match=r"lcow vm build"):
        service_vm.start()


def test_kvm_probe_ends_in_bounded_time(assets: Path) -> None:
    config = QemuConfig(assets / "vmlinuz", assets / "initrd.img", accel="auto")
    started = time.monotonic()
    accelerator = select_accelerator(config)
    assert accelerator in ("kvm", "tcg")
    assert time.monotonic() - started < PROBE_TIMEOUT_S + 10
    assert _qemu_children() == []


# Options ---------------------------------------------------------------------------------


def test_qemu_options_parse() -> None:
    options = DriverOptions.parse(
        [
            "lcow.backend=qemu",
            "lcow.kirdpath=/srv/vm",
            "lcow.kernel=bzImage",
            "lcow.initrd=rootfs.img",
            "lcow.bootparameters=loglevel=7 lcow.loglevel=DEBUG",
            "lcow.vmmemory=2048",
            "lcow.accel=kvm",
        ]
    )
    assert options.backend == "qemu"
    assert options.kird_path == "/srv/vm"
    assert options.kernel == "bzImage"
    assert options.initrd == "rootfs.img"
    assert options.boot_parameters == "loglevel=7 lcow.loglevel=DEBUG"
    assert options.vm_memory_mib == 2048
    assert options.accel == "kvm"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("lcow.accel=hvf", "use auto, kvm, tcg"),
        ("lcow.vmmemory=64", "at least 256 MiB"),
        ("lcow.vmmemory=1G", "whole number"),
        ("lcow.kernel=../vmlinuz", "file name inside lcow.kirdpath"),
    ],
)
def test_qemu_options_reject(option: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        DriverOptions.parse([option])


def test_default_kird_path_prefers_the_store(tmp_path: Path) -> None:
    (tmp_path / "cache" / "vm").mkdir(parents=True)
    (tmp_path / "cache" / "vm" / "vmlinuz").write_bytes(b"kernel")
    config = QemuConfig.from_options(
        tmp_path,
        kird_path=None,
        kernel="vmlinuz",
        initrd="initrd.img",
        boot_parameters="",
        memory_mib=1024,
        accel="tcg",
    )
    assert config.kernel == tmp_path / "cache" / "vm" / "vmlinuz"
    assert config.initrd == tmp_path / "cache" / "vm" / "initrd.img"


# vm build pieces -------------------------------------------------------------------------


def test_resolve_modules_orders_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/virtio_pci.ko: kernel/virtio_pci_modern_dev.ko kernel/virtio.ko "
        "kernel/virtio_ring.ko\n"
        "kernel/virtio.ko: kernel/virtio_ring.ko\n"
        "kernel/virtio_ring.ko:\n"
        "kernel/virtio_pci_modern_dev.ko:\n"
        "kernel/virtio_blk.ko.xz: kernel/virtio.ko kernel/virtio_ring.ko\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/drivers/char/virtio_console.ko\n")

    ordered = vmbuild.resolve_modules(tmp_path, ["virtio_pci", "virtio_blk", "virtio_console"])

    assert ordered == [
        "kernel/virtio_pci_modern_dev.ko",
        "kernel/virtio_ring.ko",
        "kernel/virtio.ko",
        "kernel/virtio_pci.ko",
        "kernel/virtio_blk.ko.xz",
    ]


def test_resolve_modules_rejects_unknown(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/virtio.ko:\n")
    (tmp_path / "modules.builtin").write_text("")
    with pytest.raises(FailedPreconditionError, match="virtio_blk"):
        vmbuild.resolve_modules(tmp_path, ["virtio_blk"])


def test_cpio_archive_unpacks_with_busybox(tmp_path: Path) -> None:
    """busybox cpio, the unpacker closest to the kernel's, reads the archive back."""
    busybox = shutil.which("busybox")
    if busybox is None:
        skip_or_fail("busybox not found; install the Debian package busybox-static")
    members = [
        cpio.Member("etc", stat.S_IFDIR | 0o755),
        cpio.Member("etc/odd-length", stat.S_IFREG | 0o644, b"12345"),
        cpio.Member("etc/link", stat.S_IFLNK | 0o777, b"odd-length"),
    ]
    archive = tmp_path / "archive.cpio"
    archive.write_bytes(cpio.write_archive(members))
    out = tmp_path / "out"
    out.mkdir()
    with archive.open("rb") as source:
        subprocess.run([busybox, "cpio", "-i", "-d"], stdin=source, cwd=out, check=True)
    assert (out / "etc" / "odd-length").read_bytes() == b"12345"
    assert str((out / "etc" / "link").readlink()) == "odd-length"


def test_disk_container_of_a_fixed_vhd(tmp_path: Path) -> None:
    image = tmp_path / "layer.vhd"
    image.write_bytes(bytes(1 << 20))
    vhd.append_footer(image, 1 << 20, bytes(16))
    fd = os.open(image, os.O_RDONLY)
    try:
        assert disk_container(fd) == ("vhd", 1 << 20)
    finally:
        os.close(fd)


def test_layer_tar_has_the_cases_it_claims(layer_tar: bytes) -> None:
    """Guards the fixture: whiteouts, an opaque marker and a symlink reach the converter."""
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as archive:
        names = archive.getnames()
    assert "etc/.wh.removed" in names
    assert "opt/.wh..wh..opq" in names
    assert "usr/share/doc/latest" in names
