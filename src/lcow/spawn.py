"""Start child processes so that they never make a released lock look held.

A forked child holds a copy of every descriptor of the driver's process until it closes
them just before exec, and an flock belongs to the open file, not to one descriptor. While
such a copy exists, a lock that an operation has just released stays held: a non-blocking
attempt to take it in that moment, such as Get right after ApplyDiff, fails as if another
operation still held the layer. So every child process that the driver's process starts
(service VM workers, which start while other operations run, and the short commands such
as mount and fsfreeze) starts under ``SPAWN_LOCK``, and the store's non-blocking lock
attempts, VHDX opens included, take it too. A worker's start keeps it until the worker has
exec'd, a short command until it ends. Another process that forks can still hold a copy for
a moment.

NOTE: the qemu backend's accelerator probe, which boots a VM once per process and can take
seconds, runs without it.
"""

import fcntl
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

SPAWN_LOCK: Final = threading.Lock()


def run(command: Sequence[str], **options: Any) -> subprocess.CompletedProcess[Any]:
    """Run a short command with ``subprocess.run`` and ``options`` under SPAWN_LOCK."""
    with SPAWN_LOCK:
        return subprocess.run(command, **options)  # noqa: PLW1510 - every caller passes check


def try_lock_file(path: Path, operation: int) -> int | None:
    """Open ``path`` (created if missing) and take ``operation`` (LOCK_SH or LOCK_EX) on it.

    Returns the descriptor, or None without waiting when another open file holds the lock.
    It waits only for a child process that is being started, which has exec'd by the time
    ``SPAWN_LOCK`` is free again.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        locked = try_flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        return None
    return fd


def try_flock(fd: int, operation: int) -> bool:
    """Take ``operation`` (LOCK_SH or LOCK_EX) on ``fd``, or return False when it is taken.

    It returns False without waiting when another open file has the lock.

    Like :func:`try_lock_file`, it waits only for a child process that is being started.
    """
    try:
        with SPAWN_LOCK:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
