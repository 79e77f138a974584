"""What host mount mode leaves on this machine: mounts, loop devices, processes.

The checks read the kernel's own tables (``/proc/self/mountinfo``, ``/proc/<pid>/cmdline``)
and util-linux's ``losetup``, never lcow's bookkeeping. The ``release_*`` helpers undo what
a failed test left, so that one failure does not leak mounts and loop devices into the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from lcow.hostmount import RUN_BASE
from oracle import ToolError, run_tool

log = logging.getLogger(__name__)

POLL_INTERVAL_S: Final = 0.1
DETACH_TIMEOUT_S: Final = 10.0  # how long an unmounted loop device may take to detach

# mountinfo escapes space, tab, newline and backslash in paths as \ooo octal.
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


def run_folder(data_root: Path) -> Path:
    """Return the folder below which host mount mode mounts the layers of ``data_root``.

    lcow keeps them in ``/run/lcow/<the first 8 hex digits of the SHA-256 of the resolved
    data root>/<pid>/``. The folder is unique to the data root, so the checks ignore the
    mounts of other stores on this machine.
    """
    digest = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:8]
    return RUN_BASE / digest


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


def mount_points_below(folder: Path) -> list[str]:
    """Return the mount points at or below ``folder``, deepest first."""
    prefix = str(folder)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = _unescape(line.split()[4])
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            found.append(mount_point)
    return sorted(found, key=lambda path: path.count("/"), reverse=True)


def mount_options(mount_point: str) -> str:
    """Return the filesystem options of the mount at ``mount_point`` (the last field)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if _unescape(fields[4]) == mount_point:
            return fields[-1]
    raise AssertionError(f"{mount_point} is not a mount point")


def loop_devices_backed_by(folder: Path) -> list[str]:
    """Return ``device: backing file`` for each loop device whose file is below ``folder``."""
    output = run_tool(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout
    devices = json.loads(output)["loopdevices"] if output.strip() else []
    prefix = str(folder.resolve()) + "/"
    return [
        f"{device['name']}: {device['back-file']}"
        for device in devices
        if (device.get("back-file") or "").startswith(prefix)
    ]


def processes_naming(text: str) -> list[str]:
    """Return ``pid: command line`` for each process whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we listed /proc
        command = " ".join(argument.decode(errors="replace") for argument in arguments).strip()
        if text in command:
            found.append(f"{entry.name}: {command}")
    return found


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it returns True or ``timeout_s`` passes, and return its result.

    The kernel detaches an autoclear loop device when its last user closes it. The checks
    poll for that instead of assuming it has happened when umount returns.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)


def settle(read: Callable[[], list[str]], expected: list[str], timeout_s: float) -> list[str]:
    """Call ``read`` until it returns ``expected`` or ``timeout_s`` passes, and return the value.

    A test asserts on the result, so a failure shows what remained.
    """
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        value = read()
    return value


def release_mounts_below(folder: Path) -> None:
    """Unmount everything at or below ``folder``, and log each mount that stays."""
    for mount_point in mount_points_below(folder):
        log.warning("unmounting %s, left by a failed test", mount_point)
        try:
            run_tool(["umount", mount_point])
        except ToolError as err:
            log.warning("could not unmount %s: %s", mount_point, err)


def release_loop_devices_backed_by(folder: Path) -> None:
    """Detach each loop device whose backing file is below ``folder`` and that stays attached."""
    for entry in settle(lambda: loop_devices_backed_by(folder), [], DETACH_TIMEOUT_S):
        device = entry.split(":", 1)[0]
        log.warning("detaching %s, left by a failed test", entry)
        try:
            run_tool(["losetup", "--detach", device])
        except ToolError as err:
            log.warning("could not detach %s: %s", device, err)
