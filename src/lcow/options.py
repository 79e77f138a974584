"""Driver options, given as Docker's ``--storage-opt`` values (``lcow.globalmode=true``)."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from lcow.errors import InvalidArgumentError

BACKENDS: Final = ("process", "qemu")
ACCELERATORS: Final = ("auto", "kvm", "tcg")
MIN_VM_MEMORY_MIB: Final = 256  # the initrd unpacks to about 75 MiB, Python needs the rest
SANDBOX_FORMATS: Final = ("vhdx", "raw")
SIZE_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}

OPTION_HELP: Final = {
    "lcow.globalmode": "true or false (default false): one service VM for the driver's life",
    "lcow.sandboxsize": "sandbox size in GB (default 20)",
    "lcow.sandboxformat": "vhdx or raw (default vhdx)",
    "lcow.backend": "service VM backend: process (default) or qemu",
    "lcow.timeout": "service VM boot and operation timeout in seconds (default 300)",
    "lcow.kirdpath": "qemu backend: folder of the kernel and initrd (default <root>/cache/vm, "
    "else /var/lib/lcow-vm)",
    "lcow.kernel": "qemu backend: kernel file name in lcow.kirdpath (default vmlinuz)",
    "lcow.initrd": "qemu backend: initrd file name in lcow.kirdpath (default initrd.img)",
    "lcow.bootparameters": "qemu backend: extra kernel command line",
    "lcow.vmmemory": "qemu backend: utility VM memory in MiB (default 1024)",
    "lcow.accel": "qemu backend: auto (default; KVM when a probe boot works), kvm or tcg",
    "lcow.hostmount": "true or false (default false): Get returns a mounted root (root only)",
    "lcow.prestart": "true or false (default true): in safe mode with the process backend, "
    "keep two service VMs started ahead for the next operations",
}


def command_options(storage_opts: Iterable[str], *, spares: bool) -> list[str]:
    """Return the storage options of an ``lcow`` command; without ``spares``, prestart off.

    lcow.prestart=false goes first, so the user's own lcow.prestart comes later and wins.
    """
    return [*([] if spares else ["lcow.prestart=false"]), *storage_opts]


def parse_size(value: str) -> int:
    """Parse ``10G``, ``512M``, ``1.5T`` or plain bytes, with binary units as Docker does."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in SIZE_UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except ValueError as err:
        raise InvalidArgumentError(
            f"invalid size {value!r}: use a number of bytes or a K, M, G or T suffix"
        ) from err
    if size <= 0:
        raise InvalidArgumentError(f"invalid size {value!r}: it must be positive")
    return size


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InvalidArgumentError(f"invalid value {value!r} for {name}: use true or false")


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """The driver's settings after parsing."""

    global_mode: bool = False
    sandbox_size_bytes: int = 20 << 30
    sandbox_format: str = "vhdx"
    backend: str = "process"
    timeout_s: float = 300.0
    host_mount: bool = False
    kird_path: str | None = None
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    boot_parameters: str = ""
    vm_memory_mib: int = 1024
    accel: str = "auto"
    prestart: bool = True

    @classmethod
    def parse(cls, options: Iterable[str] | Mapping[str, str] | None) -> "DriverOptions":
        """Parse ``key=value`` strings or a mapping; unknown ``lcow.*`` keys are errors."""
        pairs: list[tuple[str, str]] = []
        if isinstance(options, Mapping):
            pairs = list(options.items())
        elif options is not None:
            for option in options:
                key, separator, value = option.partition("=")
                if not separator:
                    raise InvalidArgumentError(f"invalid storage option {option!r}: use key=value")
                pairs.append((key, value))

        values: dict[str, object] = {}
        for raw_key, value in pairs:
            key = raw_key.strip().lower()
            if not key.startswith("lcow."):
                continue  # options of other drivers, as dockerd passes them all through
            if key == "lcow.globalmode":
                values["global_mode"] = _parse_bool(key, value)
            elif key == "lcow.sandboxsize":
                values["sandbox_size_bytes"] = _parse_gigabytes(key, value)
            elif key == "lcow.sandboxformat":
                if value not in SANDBOX_FORMATS:
                    raise InvalidArgumentError(
                        f"invalid value {value!r} for {key}: use {' or '.join(SANDBOX_FORMATS)}"
                    )
                values["sandbox_format"] = value
            elif key == "lcow.backend":
                if value not in BACKENDS:
                    raise InvalidArgumentError(
                        f"invalid value {value!r} for {key}: use {', '.join(BACKENDS)}"
                    )
                values["backend"] = value
            elif key == "lcow.timeout":
                values["timeout_s"] = _parse_seconds(key, value)
            elif key == "lcow.hostmount":
                values["host_mount"] = _parse_bool(key, value)
            elif key == "lcow.prestart":
                values["prestart"] = _parse_bool(key, value)
            elif key == "lcow.kirdpath":
                values["kird_path"] = _parse_nonempty(key, value)
            elif key in ("lcow.kernel", "lcow.initrd"):
                values[key.removeprefix("lcow.")] = _parse_file_name(key, value)
            elif key == "lcow.bootparameters":
                values["boot_parameters"] = value.strip()
            elif key == "lcow.vmmemory":
                values["vm_memory_mib"] = _parse_memory(key, value)
            elif key == "lcow.accel":
                if value not in ACCELERATORS:
                    raise InvalidArgumentError(
                        f"invalid value {value!r} for {key}: use {', '.join(ACCELERATORS)}"
                    )
                values["accel"] = value
            else:
                valid = "; ".join(f"{name}: {text}" for name, text in OPTION_HELP.items())
                raise InvalidArgumentError(f"unknown option {raw_key!r}; valid options are {valid}")
        if values.get("host_mount"):
            # The host loop-mounts sandboxes, and a loop device reads raw disks only.
            if values.get("sandbox_format", "raw") != "raw":
                raise InvalidArgumentError(
                    "invalid options: lcow.hostmount=true needs lcow.sandboxformat=raw, "
                    "because VHDX cannot be loop-mounted"
                )
            values["sandbox_format"] = "raw"
        return cls(**values)  # type: ignore[arg-type]


def _parse_gigabytes(name: str, value: str) -> int:
    try:
        gigabytes = float(value)
    except ValueError as err:
        raise InvalidArgumentError(
            f"invalid value {value!r} for {name}: give GB as a number"
        ) from err
    if not 1 <= gigabytes <= 16 * 1024:
        raise InvalidArgumentError(f"invalid value {value!r} for {name}: use 1 to 16384 GB")
    return int(gigabytes * (1 << 30))


def _parse_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError as err:
        raise InvalidArgumentError(f"invalid value {value!r} for {name}: give seconds") from err
    if seconds <= 0:
        raise InvalidArgumentError(f"invalid value {value!r} for {name}: it must be positive")
    return seconds


def _parse_nonempty(name: str, value: str) -> str:
    if not value.strip():
        raise InvalidArgumentError(f"invalid value for {name}: give a path")
    return value.strip()


def _parse_file_name(name: str, value: str) -> str:
    if not value or "/" in value or value in (".", ".."):
        raise InvalidArgumentError(
            f"invalid value {value!r} for {name}: give a file name inside lcow.kirdpath"
        )
    return value


def _parse_memory(name: str, value: str) -> int:
    try:
        mebibytes = int(value)
    except ValueError as err:
        raise InvalidArgumentError(
            f"invalid value {value!r} for {name}: give MiB as a whole number"
        ) from err
    if mebibytes < MIN_VM_MEMORY_MIB:
        raise InvalidArgumentError(
            f"invalid value {value!r} for {name}: the utility VM needs at least "
            f"{MIN_VM_MEMORY_MIB} MiB"
        )
    return mebibytes
