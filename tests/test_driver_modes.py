"""Service VM lifecycles in safe and global mode, worker isolation, and error paths.

Safe mode starts one worker per operation and stops it when the operation ends. Global mode
starts one worker for the driver's life, and Cleanup stops it. Whatever fails, no worker,
scratch disk, temporary file or descriptor may outlive the operation. The kernel's view in
/proc checks what the worker reports about its isolation.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final, cast

import pytest

pytest.register_assert_rewrite("driver_conformance")

import driver_conformance as suite  # noqa: E402
import tarbuild  # noqa: E402
from lcow import driver as driver_module  # noqa: E402
from lcow.driver import LAYER_IMAGE, Driver  # noqa: E402
from lcow.errors import CorruptInputError, LcowError, ServiceVMError  # noqa: E402
from lcow.servicevm import protocol  # noqa: E402
from lcow.servicevm.base import DEFAULT_STOP_TIMEOUT_S, ServiceVM  # noqa: E402
from lcow.servicevm.manager import SPARE_COUNT, SPARE_NAME  # noqa: E402
from lcow.servicevm.process import (  # noqa: E402
    ProcessServiceVM,
    idle_start_command,
    worker_command,
)
from oracle import skip_or_fail  # noqa: E402

SAFE_OPTIONS: Final = ["lcow.globalmode=false"]
GLOBAL_OPTIONS: Final = ["lcow.globalmode=true"]
MODE_OPTIONS: Final = {"safe": SAFE_OPTIONS, "global": GLOBAL_OPTIONS}

# /proc/<pid>/ns names of the namespaces the worker reports.
NAMESPACE_FILES: Final = {
    "user": "user",
    "mount": "mnt",
    "network": "net",
    "pid": "pid",
    "ipc": "ipc",
}
WORKER_MAX_OPEN_FILES: Final = 1024  # the worker's RLIMIT_NOFILE, lcow.servicevm.worker

TIMEOUT_S: Final = 1.0  # lcow.timeout of the timeout test
# A timed-out request takes its timeout, then the stop of the worker: up to
# DEFAULT_STOP_TIMEOUT_S for the reply to a shutdown request and as long again for the exit
# before the kill. The rest is a margin for a loaded host.
TIMEOUT_BOUND_S: Final = TIMEOUT_S + 2 * DEFAULT_STOP_TIMEOUT_S + 5.0
THREAD_END_LIMIT_S = 5.0
TIMEOUT_TEST_LIMIT_S: Final = 120.0  # when the test stops waiting for ApplyDiff at all
EARLY_CLOSE_BOUND_S: Final = DEFAULT_STOP_TIMEOUT_S
LARGE_LAYER_FILES: Final = 8
LARGE_LAYER_FILE_BYTES: Final = 1 << 20  # 8 MiB in all: far more than a pipe buffers


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def safe_driver(root: Path) -> Iterator[Driver]:
    driver = Driver(root, SAFE_OPTIONS)
    yield driver
    driver.cleanup()


@pytest.fixture
def global_driver(root: Path) -> Iterator[Driver]:
    driver = Driver(root, GLOBAL_OPTIONS)
    yield driver
    driver.cleanup()


def small_layer() -> io.BytesIO:
    return suite.layer_tar([tarbuild.regular("file", suite.file_content(1, 0))])


def large_layer() -> io.BytesIO:
    members = [
        tarbuild.regular(f"file-{index}", os.urandom(LARGE_LAYER_FILE_BYTES))
        for index in range(LARGE_LAYER_FILES)
    ]
    return suite.layer_tar(members)


def read_diff(driver: Driver, layer_id: str, parent: str | None) -> None:
    with io.BufferedReader(driver.diff(layer_id, parent)) as diff:
        diff.read()


def get_and_put(driver: Driver, layer_id: str) -> None:
    driver.get(layer_id)
    driver.put(layer_id)


def worker_pid(service_vm: ServiceVM) -> int:
    """Return the host pid of the worker program, below ``unshare`` when namespaces are used."""
    assert isinstance(service_vm, ProcessServiceVM)
    pid = service_vm.pid()
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"unshare"):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, f"unshare (pid {pid}) has the children {children}"
        pid = int(children[0])
    return pid


def service_vm_threads(driver: Driver) -> list[str]:
    """List the live threads that the driver names after its service VM work.

    The spare service VMs' threads are left out, once the spares have started.
    """
    suite.ready_spares(driver)
    return sorted(
        thread.name
        for thread in threading.enumerate()
        if (thread.name.startswith("lcow-") or thread.name.endswith("-replies"))
        and not thread.name.startswith(SPARE_NAME)
    )


# --- safe mode -----------------------------------------------------------------------------


def spare_resources(driver: Driver) -> tuple[list[str], frozenset[int]]:
    """Wait for the spare service VMs; return their scratch disk names and their pids."""
    spares = suite.ready_spares(driver)
    assert all(isinstance(spare, ProcessServiceVM) for spare in spares)
    names = sorted(spare.scratch_path.name for spare in spares)  # type: ignore[attr-defined]
    return names, frozenset(spare.pid() for spare in spares)  # type: ignore[attr-defined]


@pytest.mark.parametrize("prestart", ["true", "false"])
def test_safe_mode_worker_per_operation(root: Path, prestart: str) -> None:
    """Each operation gets a worker of its own; only the spare outlives it, with prestart."""
    driver = Driver(root, [*SAFE_OPTIONS, f"lcow.prestart={prestart}"])
    before = suite.ProcessResources.capture(driver)
    workers: list[int] = []

    steps: list[tuple[str, Callable[[], object], int]] = [
        ("Create", lambda: driver.create("base"), 0),
        ("ApplyDiff", lambda: driver.apply_diff("base", None, small_layer()), 1),
        ("Changes", lambda: driver.changes("base", None), 1),
        ("DiffSize", lambda: driver.diff_size("base", None), 1),
        ("Diff", lambda: read_diff(driver, "base", None), 1),
        (
            "CreateReadWrite, formatting the cached sandbox",
            lambda: driver.create_read_write("first", "base"),
            1,
        ),
        (
            "CreateReadWrite, cloning the cached sandbox",
            lambda: driver.create_read_write("second", "base"),
            0,
        ),
        (
            "CreateReadWrite with a size",
            lambda: driver.create_read_write(
                "sized", "base", {"size": suite.NON_DEFAULT_SANDBOX_SIZE}
            ),
            1,
        ),
        ("Changes of a sandbox", lambda: driver.changes("sized", "base"), 1),
        ("Diff of a sandbox", lambda: read_diff(driver, "sized", "base"), 1),
        ("Get and Put", lambda: get_and_put(driver, "sized"), 0),
        ("Remove", lambda: driver.remove("sized"), 0),
    ]
    try:
        for name, operation, started in steps:
            count = driver.service_vms.started_count
            spares_before = driver.service_vms.spares

            operation()

            assert driver.service_vms.started_count == count + started, name
            assert driver.service_vms.running_names() == [], name
            scratch, pids = spare_resources(driver)
            if prestart == "false":
                assert scratch == [], name
            if prestart == "true" and workers:
                assert len(pids) == SPARE_COUNT, name
            if started and spares_before:
                # The operation took the oldest spare, and a new one started after it.
                spares = driver.service_vms.spares
                assert spares_before[0] not in spares, name
                assert spares[0] is spares_before[1], name
            assert suite.scratch_disks(driver.root, spare=True) == scratch, name
            assert suite.child_pids() == before.children | pids, name
            workers.extend(pids)
    finally:
        driver.cleanup()

    assert suite.scratch_disks(driver.root, spare=True) == []
    after = suite.ProcessResources.capture(driver)
    assert after.children == before.children
    assert after.open_fds == before.open_fds
    if prestart == "true":
        # Every operation that used a service VM left a new spare behind, never an old one.
        # The first operation found no spare, so it started its own and left SPARE_COUNT.
        assert len(set(workers)) == sum(1 for *_, started in steps if started) + SPARE_COUNT - 1


def test_diff_worker_until_close(safe_driver: Driver) -> None:
    driver = safe_driver
    driver.create("base")
    driver.apply_diff("base", None, small_layer())
    count = driver.service_vms.started_count

    with io.BufferedReader(driver.diff("base", None)) as diff:
        assert driver.service_vms.started_count == count + 1
        assert driver.service_vms.running_names() == ["base_svm"]

        diff.read()

        assert driver.service_vms.running_names() == ["base_svm"]

    assert driver.service_vms.running_names() == []
    assert suite.scratch_disks(driver.root) == []


def test_diff_stream_pipe_size(safe_driver: Driver) -> None:
    driver = safe_driver
    driver.create("base")
    driver.apply_diff("base", None, small_layer())

    with driver.diff("base", None) as diff:
        pipe_bytes = fcntl.fcntl(diff.fileno(), fcntl.F_GETPIPE_SZ)
        content = diff.read()

    assert pipe_bytes == driver_module.TAR_PIPE_BYTES
    with tarfile.open(fileobj=io.BytesIO(content)) as archive:
        assert archive.getnames()


def scheduling_policies(service_vm: ServiceVM) -> set[int]:
    """Return the scheduling policies of the worker program's threads."""
    task_folder = Path(f"/proc/{worker_pid(service_vm)}/task")
    return {os.sched_getscheduler(int(task.name)) for task in task_folder.iterdir()}


def test_spare_starts_at_idle_priority(safe_driver: Driver) -> None:
    """Spares start under SCHED_IDLE; the one an operation takes runs under SCHED_OTHER."""
    if not idle_start_command():
        skip_or_fail("chrt cannot start a process at idle priority and restore it")
    driver = safe_driver
    driver.service_vms.start_spares()
    spares = suite.ready_spares(driver)
    assert len(spares) == SPARE_COUNT

    spare_policies = [scheduling_policies(spare) for spare in spares]
    with driver.service_vms.acquire("operation") as service_vm:
        operation_policies = scheduling_policies(service_vm)
        other_spare_policies = scheduling_policies(spares[1])
    next_spares = suite.ready_spares(driver)
    assert len(next_spares) == SPARE_COUNT
    new_spare_policies = scheduling_policies(next_spares[1])

    assert service_vm is spares[0]
    assert next_spares[0] is spares[1]
    assert spare_policies == [{os.SCHED_IDLE}] * SPARE_COUNT
    assert operation_policies == {os.SCHED_OTHER}
    assert other_spare_policies == {os.SCHED_IDLE}
    assert new_spare_policies == {os.SCHED_IDLE}


SPARE_EXIT_TIMEOUT_S: Final = 10.0


def test_dead_spare_is_skipped(safe_driver: Driver) -> None:
    """An operation passes over a spare whose worker ended and takes the next one."""
    driver = safe_driver
    manager = driver.service_vms
    manager.start_spares()
    spares = suite.ready_spares(driver)
    assert len(spares) == SPARE_COUNT
    dead = spares[0]
    os.kill(dead.pid(), signal.SIGKILL)  # type: ignore[attr-defined]
    deadline = time.monotonic() + SPARE_EXIT_TIMEOUT_S
    while dead.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dead.running
    count = manager.started_count

    with manager.acquire("operation") as service_vm:
        names = manager.running_names()

    assert service_vm is spares[1]
    assert names == ["operation_svm"]
    assert manager.started_count == count + 1
    assert spares[0] not in suite.ready_spares(driver)


def test_first_operation_starts_one_spare(safe_driver: Driver) -> None:
    """An operation that finds no spare starts one beside it and the other after it."""
    driver = safe_driver
    manager = driver.service_vms
    before = suite.child_pids()
    assert manager.spares == []

    with manager.acquire("first") as service_vm:
        spares_during = suite.ready_spares(driver)
        children_during = suite.child_pids() - before
        worker = service_vm.pid()  # type: ignore[attr-defined]
    spares_after = suite.ready_spares(driver)

    assert len(spares_during) == 1
    assert children_during == {worker, spares_during[0].pid()}  # type: ignore[attr-defined]
    assert len(spares_after) == SPARE_COUNT
    assert spares_after[0] is spares_during[0]


def test_spare_starts_after_operation(safe_driver: Driver) -> None:
    """No worker starts while an operation runs; the spares are topped up after it."""
    driver = safe_driver
    driver.service_vms.start_spares()
    spares = suite.ready_spares(driver)
    assert len(spares) == SPARE_COUNT
    before = suite.child_pids()
    spare_pids = {spare.pid() for spare in spares}  # type: ignore[attr-defined]

    with driver.service_vms.acquire("operation") as service_vm:
        during = suite.child_pids()
        starting_during = driver.service_vms.spares_starting
    starting_after = driver.service_vms.spares_starting
    next_spares = suite.ready_spares(driver)

    assert service_vm is spares[0]
    assert spare_pids <= before
    assert during == before
    assert starting_during == 0
    assert starting_after == 1
    assert next_spares[0] is spares[1]
    assert len(next_spares) == SPARE_COUNT
    assert next_spares[1].pid() not in spare_pids  # type: ignore[attr-defined]


# --- global mode ---------------------------------------------------------------------------


def test_global_mode_one_worker(global_driver: Driver) -> None:
    driver = global_driver
    with driver.service_vms.acquire("first") as service_vm:
        first_pid = worker_pid(service_vm)
        assert service_vm.name == suite.GLOBAL_SERVICE_VM

    suite.exercise_driver(driver)

    assert driver.service_vms.started_count == 1
    assert driver.service_vms.running_names() == [suite.GLOBAL_SERVICE_VM]
    assert suite.scratch_disks(driver.root) == [f"{suite.GLOBAL_SERVICE_VM}.{os.getpid()}.vhdx"]

    with driver.service_vms.acquire("last") as service_vm:
        assert worker_pid(service_vm) == first_pid


def test_global_cleanup_stops_worker(root: Path) -> None:
    before = suite.ProcessResources.capture()
    driver = Driver(root, GLOBAL_OPTIONS)
    suite.exercise_driver(driver)
    with driver.service_vms.acquire("probe") as service_vm:
        pid = worker_pid(service_vm)

    driver.cleanup()

    assert driver.service_vms.running_names() == []
    assert not service_vm.running
    assert not Path(f"/proc/{pid}").exists()
    assert suite.scratch_disks(root) == []
    after = suite.ProcessResources.capture(driver)
    assert after.children == before.children
    assert after.open_fds == before.open_fds


# --- isolation -----------------------------------------------------------------------------


def test_worker_isolation(safe_driver: Driver) -> None:
    with safe_driver.service_vms.acquire("probe") as service_vm:
        assert isinstance(service_vm, ProcessServiceVM)
        isolation = list(service_vm.isolation)
        pid = worker_pid(service_vm)
        status = Path(f"/proc/{pid}/status").read_text()
        limits = Path(f"/proc/{pid}/limits").read_text()
        namespaces = {
            name: (
                Path(f"/proc/{pid}/ns/{file}").readlink(),
                Path(f"/proc/self/ns/{file}").readlink(),
            )
            for name, file in NAMESPACE_FILES.items()
        }

    assert "seccomp" in isolation
    assert "rlimits" in isolation
    if os.geteuid() == 0:
        for name in NAMESPACE_FILES:
            assert name in isolation, name

    # The kernel's view must agree with the report.
    assert "Seccomp:\t2" in status.splitlines()
    open_files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert int(open_files.split()[3]) <= WORKER_MAX_OPEN_FILES
    assert int(open_files.split()[4]) <= WORKER_MAX_OPEN_FILES
    for name, (worker_namespace, own_namespace) in namespaces.items():
        if name in isolation:
            assert worker_namespace != own_namespace, name


WORKER_EXIT_TIMEOUT_S: Final = 30.0


def test_worker_exits_quietly_without_driver() -> None:
    """A worker whose driver process ended logs it and exits 0, with no traceback.

    Closing a unix socket with a reply still unread makes the worker's next read fail with
    ECONNRESET, as it does when a driver exits with a spare still starting.
    """
    driver_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = worker_command(worker_end.fileno(), "--log-level", "INFO")
    worker = subprocess.Popen(
        command, pass_fds=[worker_end.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    worker_end.close()
    try:
        protocol.send(driver_end, {"id": 1, "op": "hello"})
        driver_end.recv(1, socket.MSG_PEEK)  # the reply has arrived, and stays unread
    finally:
        driver_end.close()
    _, stderr = worker.communicate(timeout=WORKER_EXIT_TIMEOUT_S)

    assert worker.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr, stderr.decode()
    assert b"the driver closed the channel" in stderr, stderr.decode()


# --- error paths ---------------------------------------------------------------------------


def corrupt_tar(kind: str) -> bytes:
    """Return a layer tar broken in one way: a header checksum, or data cut short."""
    archive = tarbuild.tar_bytes(
        [
            tarbuild.regular("directory/file", bytes(5000)),
            tarbuild.regular("other", suite.file_content(1, 1)),
        ]
    )
    if kind == "checksum":
        broken = bytearray(archive)
        broken[0] ^= 0x20  # the first byte of the first name: the stored checksum no longer fits
        return bytes(broken)
    return archive[: tarbuild.BLOCK_BYTES * 4]  # cut short inside the first member's data


@pytest.mark.parametrize("mode", ["safe", "global"])
@pytest.mark.parametrize("kind", ["checksum", "truncated"])
def test_corrupt_tar_leaves_nothing(root: Path, mode: str, kind: str) -> None:
    before_driver = suite.ProcessResources.capture()
    driver = Driver(root, MODE_OPTIONS[mode])
    try:
        # A successful conversion first, so that the global worker runs already.
        driver.create("valid")
        driver.apply_diff("valid", None, small_layer())
        running = driver.service_vms.running_names()
        before = suite.ProcessResources.capture(driver)
        driver.create("corrupt")

        with pytest.raises(CorruptInputError):
            driver.apply_diff("corrupt", None, io.BytesIO(corrupt_tar(kind)))

        assert not (root / "corrupt" / LAYER_IMAGE).exists()
        assert suite.temporary_files(root) == []
        assert driver.service_vms.running_names() == running
        assert len(suite.scratch_disks(root)) == len(running)
        after = suite.ProcessResources.capture(driver)
        assert after.children == before.children
        assert after.open_fds == before.open_fds
    finally:
        driver.cleanup()

    assert driver.service_vms.running_names() == []
    assert suite.scratch_disks(root) == []
    assert suite.child_pids() == before_driver.children
    assert suite.open_fd_count() == before_driver.open_fds


def test_format_error_leaves_nothing(safe_driver: Driver) -> None:
    driver = safe_driver
    before = suite.ProcessResources.capture(driver)

    # mke2fs cannot fit an ext4 into 64 KiB, so the worker fails the request.
    with pytest.raises(LcowError):
        driver.create_read_write("tiny", None, {"size": "64K"})

    assert not driver.exists("tiny")
    assert suite.temporary_files(driver.root) == []
    assert driver.service_vms.running_names() == []
    assert suite.scratch_disks(driver.root) == []
    after = suite.ProcessResources.capture(driver)
    assert after.children == before.children
    assert after.open_fds == before.open_fds


def read_all(fd: int, length: int, into: list[bytes]) -> None:
    """Read ``length`` bytes from ``fd`` into ``into``, as a consumer of the tar would."""
    received = b""
    while len(received) < length:
        chunk = os.read(fd, length - len(received))
        if not chunk:
            break
        received += chunk
    into.append(received)


def write_diff_through(
    driver: Driver, output: IO[bytes], read_fd: int, length: int
) -> tuple[int, list[bytes]]:
    """Write the Diff of ``large`` to ``output`` while a thread reads ``read_fd``.

    Returns write_diff's size and what the thread read. Closes ``output`` and ``read_fd``.
    """
    received: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(read_fd, length, received))
    reader.start()
    with output:
        size = driver.write_diff("large", None, output)
    reader.join(THREAD_END_LIMIT_S)
    os.close(read_fd)
    return size, received


def test_write_diff_outputs(
    safe_driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_diff hands a regular file or a pipe to the worker and copies for anything else.

    Every output gets the bytes of Diff's stream. A file keeps what the caller wrote before
    and ends at the caller's new position. A terminal never reaches the worker.
    """
    driver = safe_driver
    copies: list[object] = []
    real_copy = driver_module._copy_stream

    def counted_copy(stream: io.RawIOBase, output: IO[bytes]) -> int:
        copies.append(output)
        return real_copy(stream, output)

    monkeypatch.setattr(driver_module, "_copy_stream", counted_copy)
    driver.create("large")
    driver.apply_diff("large", None, large_layer())
    with io.BufferedReader(driver.diff("large", None)) as diff:
        streamed = diff.read()
    before = suite.ProcessResources.capture(driver)

    prefix = b"written by the caller before the tar"
    output_path = tmp_path / "diff.tar"
    with output_path.open("wb") as output:
        output.write(prefix)  # still in the BufferedWriter's buffer
        file_size = driver.write_diff("large", None, output)
        file_position = output.tell()

    read_end, write_end = os.pipe()
    pipe_output = os.fdopen(write_end, "wb")
    pipe_size, received = write_diff_through(driver, pipe_output, read_end, len(streamed))

    in_memory = io.BytesIO()
    memory_size = driver.write_diff("large", None, in_memory)

    controller, terminal = os.openpty()
    tty.setraw(terminal)  # no line discipline: the bytes arrive as written
    terminal_output = os.fdopen(terminal, "wb")
    terminal_size, from_terminal = write_diff_through(
        driver, terminal_output, controller, len(streamed)
    )

    assert output_path.read_bytes() == prefix + streamed
    assert file_size == len(streamed)
    assert file_position == len(prefix) + len(streamed)
    assert received == [streamed]
    assert pipe_size == len(streamed)
    assert in_memory.getvalue() == streamed
    assert memory_size == len(streamed)
    assert from_terminal == [streamed]
    assert terminal_size == len(streamed)
    assert copies == [in_memory, terminal_output]
    after = suite.ProcessResources.capture(driver)
    assert after.children == before.children
    assert after.open_fds == before.open_fds


def test_write_diff_empty_layer(safe_driver: Driver) -> None:
    driver = safe_driver
    driver.create("empty")
    output = io.BytesIO()

    size = driver.write_diff("empty", None, output)

    assert size == len(output.getvalue()) == 10240
    with tarfile.open(fileobj=io.BytesIO(output.getvalue())) as archive:
        assert archive.getmembers() == []


def test_diff_closed_early(safe_driver: Driver) -> None:
    driver = safe_driver
    driver.create("large")
    driver.apply_diff("large", None, large_layer())
    before = suite.ProcessResources.capture(driver)

    diff = driver.diff("large", None)
    head = b""
    while len(head) < 1024:  # a pipe read returns what the worker has written so far
        chunk = diff.read(1024 - len(head))
        assert chunk
        head += chunk
    start = time.monotonic()
    diff.close()
    elapsed_s = time.monotonic() - start

    assert driver.service_vms.running_names() == []
    assert suite.scratch_disks(driver.root) == []
    assert service_vm_threads(driver) == []
    after = suite.ProcessResources.capture(driver)
    assert after.children == before.children
    assert after.open_fds == before.open_fds
    assert elapsed_s < EARLY_CLOSE_BOUND_S


def test_timeout_leaves_nothing(root: Path) -> None:
    """ApplyDiff from a stream that never ends fails after lcow.timeout and leaves nothing.

    The stream is a pipe that the test keeps open, read without a buffer, so the driver
    passes on the start of a tar that promises more data than ever comes.
    """
    driver = Driver(root, [*SAFE_OPTIONS, f"lcow.timeout={TIMEOUT_S:g}"])
    driver.create("stalled")
    header = tarbuild.regular("file", bytes(1 << 20)).info.tobuf(tarfile.PAX_FORMAT)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    stream = os.fdopen(read_end, "rb", buffering=0)
    errors: list[BaseException] = []

    def apply() -> None:
        try:
            driver.apply_diff("stalled", None, stream)
        except LcowError as err:
            errors.append(err)

    try:
        os.write(write_end, header + bytes(4096))
        before = suite.ProcessResources.capture(driver)
        thread = threading.Thread(target=apply, name="timeout-test-apply", daemon=True)
        start = time.monotonic()
        thread.start()
        thread.join(TIMEOUT_TEST_LIMIT_S)
        elapsed_s = time.monotonic() - start

        assert not thread.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], ServiceVMError)
        assert not (root / "stalled" / LAYER_IMAGE).exists()
        assert suite.temporary_files(root) == []
        assert driver.service_vms.running_names() == []
        assert suite.scratch_disks(root) == []
        after = suite.ProcessResources.capture(driver)
        assert after.children == before.children
        assert after.open_fds == before.open_fds
        assert elapsed_s <= TIMEOUT_BOUND_S

        # A thread blocked in the caller's read cannot be interrupted; it holds no
        # descriptor and ends as soon as the caller's stream does.
        os.close(write_end)
        write_end = -1
        deadline = time.monotonic() + THREAD_END_LIMIT_S
        while service_vm_threads(driver) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service_vm_threads(driver) == []
    finally:
        if write_end >= 0:
            os.close(write_end)
        stream.close()
        driver.cleanup()


def test_apply_diff_from_file_offset(
    safe_driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer file handed to the worker directly is read from the caller's position on."""
    driver = safe_driver
    fed: list[object] = []

    class CountedFeeder(driver_module._Feeder):
        def start(self) -> None:
            fed.append(self.source)
            super().start()

    monkeypatch.setattr(driver_module, "_Feeder", CountedFeeder)
    archive = large_layer().getvalue()
    prefix = b"not part of the layer" * 100
    source = tmp_path / "prefixed.tar"
    source.write_bytes(prefix + archive)
    driver.create("from-bytes")
    driver.create("from-file")
    driver.create("from-gzip")
    gzipped = tmp_path / "layer.tar.gz"
    gzipped.write_bytes(gzip.compress(archive))

    size = driver.apply_diff("from-bytes", None, io.BytesIO(archive))
    with source.open("rb") as diff:
        diff.seek(len(prefix))
        file_size = driver.apply_diff("from-file", None, diff)
        position = diff.tell()
    with gzip.open(gzipped, "rb") as wrapper:  # a wrapper: its bytes go through a pipe
        gzip_size = driver.apply_diff("from-gzip", None, cast(IO[bytes], wrapper))

    assert len(fed) == 2  # the BytesIO and the gzip stream; the file went to the worker
    assert file_size == size
    assert gzip_size == size
    assert position == len(prefix) + len(archive)
    image = (driver.root / "from-bytes" / LAYER_IMAGE).read_bytes()
    assert (driver.root / "from-file" / LAYER_IMAGE).read_bytes() == image
    assert (driver.root / "from-gzip" / LAYER_IMAGE).read_bytes() == image
