"""The process backend: the worker is a child process in namespaces of its own.

util-linux ``unshare`` puts the worker into new user, mount, network, pid and IPC
namespaces (``--fork`` makes it pid 1 of its pid namespace, ``--kill-child`` ends it with
``unshare``). Where the kernel refuses some of them, for example inside a container that
forbids user namespaces, the backend tries fewer and logs a warning; the worker still runs,
with its seccomp filter and resource limits. Disks reach it as descriptors over a unix
socketpair, so it never needs a path into the store.

A worker started in the background, as the next operation's spare, starts under the
SCHED_IDLE policy (util-linux ``chrt``), so its start-up uses only CPU time that the
running operation leaves. Taking it for an operation gives it SCHED_OTHER back.
"""

import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from lcow import spawn
from lcow.errors import ServiceVMError
from lcow.servicevm.base import DEFAULT_STOP_TIMEOUT_S, ServiceVM
from lcow.spawn import SPAWN_LOCK

log = logging.getLogger(__name__)

# Namespace sets to try, most isolated first, with the unshare options for each.
NAMESPACE_SETS: Final[tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = (
    (
        ("user", "mount", "network", "pid", "ipc"),
        (
            "--user",
            "--map-root-user",
            "--mount",
            "--net",
            "--pid",
            "--ipc",
            "--fork",
            "--kill-child",
        ),
    ),
    (
        ("mount", "network", "pid", "ipc"),
        ("--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child"),
    ),
    ((), ()),
)
PROBE_TIMEOUT_S: Final = 10.0


@functools.cache
def namespace_support() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the most isolated namespace set this kernel lets us create, and its options."""
    unshare = shutil.which("unshare")
    for names, options in NAMESPACE_SETS:
        if not names:
            break
        if unshare is None:
            log.warning(
                "unshare (util-linux) is missing: service VM workers run without namespaces"
            )
            break
        probe = spawn.run(
            [unshare, *options, "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        if probe.returncode == 0:
            if names != NAMESPACE_SETS[0][0]:
                log.warning(
                    "failed to create some namespaces; service VM workers use only %s",
                    ", ".join(names),
                )
            return names, (unshare, *options)
        log.info("unshare %s failed: %s", " ".join(options), probe.stderr.strip())
    log.warning("failed to create namespaces: service VM workers share the host's")
    return (), ()


@functools.cache
def idle_start_command() -> tuple[str, ...]:
    """Return the command prefix that starts a worker under SCHED_IDLE, or () if unusable.

    Leaving SCHED_IDLE takes CAP_SYS_NICE or a RLIMIT_NICE of 20, so a probe checks that a
    process started this way can get the normal policy back. Without that, a spare worker
    would stay at idle priority for its whole operation, so it starts normally instead.
    """
    chrt = shutil.which("chrt")
    if chrt is None:
        return ()
    probe = spawn.run(
        [chrt, "--idle", "0", chrt, "--other", "0", "true"],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    if probe.returncode != 0:
        log.info("spare service VMs start at normal priority: %s", probe.stderr.strip())
        return ()
    return (chrt, "--idle", "0")


def worker_command(channel_fd: int, *options: str) -> list[str]:
    """Return the command that runs the worker program on the channel ``channel_fd``."""
    return [
        sys.executable,
        "-m",
        "lcow.servicevm.worker",
        "--channel-fd",
        str(channel_fd),
        *options,
    ]


def _tree_tasks(pid: int) -> Iterator[int]:
    """Yield the thread ids of process ``pid`` and of its descendants, parents first.

    The caller acts on each task before its children are listed, so a child forked after
    that inherits the change, and one forked before it is listed.
    """
    pending = [pid]
    while pending:
        process = pending.pop()
        try:
            tasks = list(Path(f"/proc/{process}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            yield int(task.name)
            try:
                children = (task / "children").read_text()
            except FileNotFoundError:
                continue
            pending += [int(child) for child in children.split()]


class ProcessServiceVM(ServiceVM):
    """A worker process; ``hide`` lists host paths its mount namespace covers up."""

    streams_host_files = True

    def __init__(
        self,
        name: str,
        *,
        timeout_s: float,
        hide: Sequence[str] = (),
        background: bool = False,
    ) -> None:
        super().__init__(name, timeout_s=timeout_s)
        self.hide = list(hide)
        self.process: subprocess.Popen[bytes] | None = None
        self.isolation: list[str] = []
        self.worker_pid = 0
        self.background = background
        self.idle = False  # whether the worker's tasks may still run under SCHED_IDLE
        self._priority_lock = threading.Lock()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pid = self.process.pid if self.process else None
        return f"ProcessServiceVM(name={self.name!r}, pid={pid}, {state})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        names, prefix = namespace_support()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [
            *prefix,
            *worker_command(
                child.fileno(),
                "--name",
                self.name,
                "--namespaces",
                ",".join(names),
                "--log-level",
                logging.getLevelName(logging.getLogger("lcow").getEffectiveLevel()),
            ),
        ]
        for path in self.hide:
            command += ["--hide", path]
        try:
            with self._priority_lock:
                idle_prefix = idle_start_command() if self.background else ()
                with SPAWN_LOCK:
                    self.process = subprocess.Popen(
                        [*idle_prefix, *command],
                        pass_fds=[child.fileno()],
                        stdin=subprocess.DEVNULL,
                        close_fds=True,
                    )
                self.idle = bool(idle_prefix)
        except OSError as err:
            parent.close()
            child.close()
            raise ServiceVMError(f"failed to start service VM {self.name}: {err}") from err
        child.close()
        self.channel = parent
        self._start_reader()
        log.info("started service VM %s (pid %d)", self.name, self.process.pid)
        try:
            hello = self.request("hello", timeout_s=min(self.timeout_s, 60.0))
        except ServiceVMError:
            self.terminate(stop_timeout_s=0)
            raise
        self.isolation = list(hello.get("isolation", []))
        self.worker_pid = int(hello.get("pid", 0))

    def to_foreground(self) -> None:
        """Move every task of the worker's process tree from SCHED_IDLE to SCHED_OTHER."""
        with self._priority_lock:
            self.background = False
            if not self.idle or self.process is None:
                return
            self.idle = False
            pid = self.process.pid
        for task in _tree_tasks(pid):
            try:
                os.sched_setscheduler(task, os.SCHED_OTHER, os.sched_param(0))
            except ProcessLookupError:
                continue  # the task ended meanwhile
            except PermissionError as err:
                log.warning(
                    "service VM %s stays at idle priority: failed to change task %d: %s",
                    self.name,
                    task,
                    err,
                )
                return

    def terminate(self, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None and stop_timeout_s > 0:
            try:
                self.request("shutdown", timeout_s=stop_timeout_s)
            except ServiceVMError as err:
                log.info("service VM %s did not stop on request: %s", self.name, err)
        try:
            process.wait(timeout=stop_timeout_s if stop_timeout_s > 0 else 0.001)
        except subprocess.TimeoutExpired:
            log.warning("killing service VM %s (pid %d): it did not stop", self.name, process.pid)
            process.kill()
            process.wait()
        if self.channel is not None:
            self.channel.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        log.info("stopped service VM %s (exit status %s)", self.name, process.returncode)
        self.process = None
        self.channel = None

    def pid(self) -> int:
        """Return the pid of the backend's own child (``unshare`` when namespaces are used)."""
        return self.process.pid if self.process else 0


def pipe() -> tuple[int, int]:
    """Return a (read, write) pipe whose ends are not inherited by other children."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return read_end, write_end
