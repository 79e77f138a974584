"""Settings of the qemu backend's utility VM: its files, its memory and the accelerator.

The accelerator is KVM only where KVM works. Nested or paravirtualised hosts may offer
/dev/kvm and still hang a KVM guest. So ``lcow.accel=auto`` boots the utility VM's kernel
once per process with ``-accel kvm``, and /init powers off as soon as it finds
``lcow.probe`` on the kernel command line. A probe that fails or takes longer than
PROBE_TIMEOUT_S is killed, and the VMs use TCG.
"""

import functools
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lcow.errors import FailedPreconditionError

log = logging.getLogger(__name__)

QEMU_BINARY: Final = "qemu-system-x86_64"
DEFAULT_KIRD_FOLDERS: Final = ("cache/vm", "/var/lib/lcow-vm")  # the first is under the root
PROBE_TIMEOUT_S: Final = 10.0  # a KVM boot to the probe point takes about a second
PROBE_MARKER: Final = b"lcow: probe boot complete"  # what /init prints on a probe boot


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """Paths of the utility VM's kernel and initrd, and the settings it starts with."""

    kernel: Path
    initrd: Path
    boot_parameters: str = ""
    memory_mib: int = 1024
    accel: str = "auto"
    qemu: str = QEMU_BINARY

    @classmethod
    def from_options(
        cls,
        root: Path,
        *,
        kird_path: str | None,
        kernel: str,
        initrd: str,
        boot_parameters: str,
        memory_mib: int,
        accel: str,
    ) -> "QemuConfig":
        """Resolve ``lcow.kirdpath``: given, else ``<root>/cache/vm``, else the system one."""
        if kird_path is not None:
            folder = Path(kird_path)
        else:
            candidates = [root / DEFAULT_KIRD_FOLDERS[0], Path(DEFAULT_KIRD_FOLDERS[1])]
            folder = next((c for c in candidates if (c / kernel).exists()), candidates[0])
        return cls(folder / kernel, folder / initrd, boot_parameters, memory_mib, accel)

    def check(self) -> None:
        """Raise FailedPreconditionError naming what is missing and how to get it."""
        for path in (self.kernel, self.initrd):
            if not path.is_file():
                raise FailedPreconditionError(
                    f"failed to start a qemu service VM: {path} is missing; build the "
                    f"utility VM with `lcow vm build {path.parent}` or set lcow.kirdpath"
                )
        if shutil.which(self.qemu) is None:
            raise FailedPreconditionError(
                f"failed to start a qemu service VM: {self.qemu} is missing; install the "
                "Debian package qemu-system-x86"
            )


_probe_lock = threading.Lock()


@functools.cache
def _probe_kvm(qemu: str, kernel: Path, initrd: Path) -> bool:
    """Boot the utility VM's kernel under KVM to its probe point, within PROBE_TIMEOUT_S."""
    command = [
        qemu,
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256"),
        *("-kernel", str(kernel), "-initrd", str(initrd), "-serial", "stdio"),
        *("-append", "console=ttyS0 panic=-1 quiet lcow.probe"),
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        # subprocess.run killed and reaped QEMU before raising.
        log.warning(
            "KVM did not boot the utility VM within %g s; using TCG (lcow.accel=tcg skips "
            "this probe)",
            PROBE_TIMEOUT_S,
        )
        return False
    except OSError as err:
        log.warning("failed to run the KVM probe (%s); using TCG", err)
        return False
    if result.returncode == 0 and PROBE_MARKER in result.stdout:
        log.info("KVM works: the probe boot took %.1f s", time.monotonic() - started)
        return True
    log.warning(
        "KVM failed to boot the utility VM (exit status %d: %s); using TCG",
        result.returncode,
        result.stderr.decode(errors="replace").strip()[-300:],
    )
    return False


def select_accelerator(config: QemuConfig) -> str:
    """Return kvm or tcg: lcow.accel when set, else KVM when a probe boot shows it works."""
    if config.accel != "auto":
        return config.accel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log.warning("/dev/kvm is missing or not accessible; the utility VM uses TCG")
        return "tcg"
    with _probe_lock:
        return "kvm" if _probe_kvm(config.qemu, config.kernel, config.initrd) else "tcg"
