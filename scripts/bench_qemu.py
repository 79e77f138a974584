"""Measure the qemu backend: boot time, disk hot-add and hot-remove, and layer conversion.

    .venv/bin/python scripts/bench_qemu.py [--assets DIR] [--accel tcg] LAYER.tar[.gz] ...

Boots one utility VM (global mode) for all conversions and, for comparison, converts the
same layers with the process backend. Prints one Markdown table row per measurement, as
docs/benchmarks.md records them.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from lcow.driver import Driver
from lcow.servicevm.qemu import QemuConfig, QemuServiceVM

HOT_PLUG_ROUNDS = 10


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _measure_hot_plug(assets: Path, accel: str, image: Path, work: Path) -> None:
    config = QemuConfig(assets / "vmlinuz", assets / "initrd.img", accel=accel)
    service_vm = QemuServiceVM("bench", timeout_s=300, config=config, spool_folder=work)
    service_vm.start()
    try:
        print(f"| boot to the agent's hello ({accel}) | {service_vm.boot_time_s:.1f} s |")
        attach_s, detach_s = [], []
        for _ in range(HOT_PLUG_ROUNDS):
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                started = time.monotonic()
                slot = service_vm.attach(fd)
                attach_s.append(time.monotonic() - started)
            finally:
                os.close(fd)
            started = time.monotonic()
            service_vm.detach(slot)
            detach_s.append(time.monotonic() - started)
        print(
            f"| hot-add of a layer disk, median of {HOT_PLUG_ROUNDS} | "
            f"{statistics.median(attach_s) * 1000:.0f} ms |"
        )
        print(
            f"| hot-remove of a layer disk, median of {HOT_PLUG_ROUNDS} | "
            f"{statistics.median(detach_s) * 1000:.0f} ms |"
        )
    finally:
        service_vm.terminate()


def _convert(options: list[str], root: Path, layers: list[Path], label: str) -> Path | None:
    driver = Driver(root, options)
    image = None
    try:
        # Boot the global service VM first, so the conversions below exclude the boot.
        started = time.monotonic()
        with driver.service_vms.acquire("boot"):
            pass
        print(f"| start of the global service VM, {label} | {time.monotonic() - started:.1f} s |")
        for index, layer in enumerate(layers):
            layer_id = f"layer-{index}"
            driver.create(layer_id, None)
            started = time.monotonic()
            with layer.open("rb") as source:
                driver.apply_diff(layer_id, None, source)
            apply_s = time.monotonic() - started
            started = time.monotonic()
            with driver.diff(layer_id) as stream:
                while stream.read(1 << 20):
                    pass
            diff_s = time.monotonic() - started
            size_mb = layer.stat().st_size / 1e6
            print(f"| ApplyDiff {layer.name} ({size_mb:.0f} MB), {label} | {apply_s:.1f} s |")
            print(f"| Diff of that layer, {label} | {diff_s:.1f} s |")
            image = root / layer_id / "layer.vhd"
    finally:
        driver.cleanup()
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path("/var/cache/lcow-vm"))
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("layers", type=Path, nargs="+")
    arguments = parser.parse_args()

    print(f"Machine: {os.cpu_count()} cores, {_cpu_model()}, QEMU accelerator {arguments.accel}")
    print("| measurement | time |")
    print("|---|---|")
    with tempfile.TemporaryDirectory(prefix="lcow-bench-") as folder:
        work = Path(folder)
        qemu_options = [
            "lcow.backend=qemu",
            f"lcow.kirdpath={arguments.assets}",
            f"lcow.accel={arguments.accel}",
            "lcow.globalmode=true",
            "lcow.timeout=1800",
        ]
        started = time.monotonic()
        image = _convert(qemu_options, work / "qemu", arguments.layers, "qemu global")
        print(
            f"| all of the above with the qemu backend, boot included | "
            f"{time.monotonic() - started:.1f} s |"
        )
        _convert(["lcow.globalmode=true"], work / "process", arguments.layers, "process")
        if image is not None:
            (work / "spool").mkdir()
            _measure_hot_plug(arguments.assets, arguments.accel, image, work / "spool")


if __name__ == "__main__":
    main()
