"""Threads and processes that share one data root.

Two threads that register one layer end with one complete layer, and Get and Put keep an
exact count from many threads. Two driver processes on one root apply and read layers side
by side. They see each other's references through file locks, which the kernel drops when
a process is killed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final

import pytest

pytest.register_assert_rewrite("driver_conformance")

import driver_conformance as suite  # noqa: E402
import tarbuild  # noqa: E402
from lcow.driver import LAYER_IMAGE, Driver  # noqa: E402
from lcow.errors import AlreadyExistsError, FailedPreconditionError, LcowError  # noqa: E402
from oracle import e2fsck_clean  # noqa: E402

MODE_OPTIONS: Final = {"safe": ["lcow.globalmode=false"], "global": ["lcow.globalmode=true"]}
REGISTER_ROUNDS: Final = 5  # each round races two threads on a new layer id
REGISTER_FILES: Final = 64
THREAD_COUNT: Final = 8
GETS_PER_THREAD: Final = 1000
# Changes requests per thread: each one starts a worker in safe mode, so fewer there.
CHANGES_PER_THREAD: Final = {"safe": 2, "global": 20}
PROCESS_ROUNDS: Final = 3  # each round applies two layers from two processes at once
THREAD_JOIN_TIMEOUT_S: Final = 120.0

APPLIED: Final = "applied"
ALREADY_EXISTS: Final = "already exists"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def register_members(seed: int) -> list[tarbuild.Member]:
    return [
        tarbuild.regular(f"directory/file-{index}", suite.file_content(seed, index))
        for index in range(REGISTER_FILES)
    ]


def run_threads(targets: list[threading.Thread]) -> None:
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join(THREAD_JOIN_TIMEOUT_S)
    alive = [thread.name for thread in targets if thread.is_alive()]
    assert alive == [], f"threads still running after {THREAD_JOIN_TIMEOUT_S:g} s"


# --- one layer from two threads ------------------------------------------------------------


def register(
    driver: Driver,
    flow: str,
    layer_id: str,
    seed: int,
    barrier: threading.Barrier,
    outcomes: list[str],
    errors: list[AlreadyExistsError],
) -> None:
    """Register a layer as one of two racing callers; record the outcome."""
    barrier.wait()
    try:
        if flow == "create and apply":
            driver.create(layer_id)
        driver.apply_diff(layer_id, None, suite.layer_tar(register_members(seed)))
    except AlreadyExistsError as err:
        outcomes.append(ALREADY_EXISTS)
        errors.append(err)
    except BaseException as err:
        outcomes.append(f"{type(err).__name__}: {err}")
        raise
    else:
        outcomes.append(APPLIED)


@pytest.mark.parametrize("mode", ["safe", "global"])
@pytest.mark.parametrize("flow", ["create and apply", "apply"])
def test_register_race(root: Path, mode: str, flow: str) -> None:
    """Two threads register the same layer; one wins, the other gets AlreadyExistsError.

    With ``flow`` "create and apply" each thread runs Create and ApplyDiff, as Docker
    registers a layer. With "apply" the layer exists and both threads run ApplyDiff.
    """
    before = suite.ProcessResources.capture()
    driver = Driver(root, MODE_OPTIONS[mode])
    layer_ids = [f"layer-{round_number}" for round_number in range(REGISTER_ROUNDS)]
    try:
        for round_number, layer_id in enumerate(layer_ids):
            if flow == "apply":
                driver.create(layer_id)
            barrier = threading.Barrier(2)
            outcomes: list[str] = []
            errors: list[AlreadyExistsError] = []

            run_threads(
                [
                    threading.Thread(
                        target=register,
                        args=(driver, flow, layer_id, seed, barrier, outcomes, errors),
                        name=f"register-{seed}",
                    )
                    for seed in (1, 2)
                ]
            )

            assert sorted(outcomes) in ([APPLIED, APPLIED], [ALREADY_EXISTS, APPLIED]), round_number
            for error in errors:
                assert layer_id in str(error), round_number

            image = root / layer_id / LAYER_IMAGE
            assert image.exists(), round_number
            e2fsck_clean(image)
            assert suite.temporary_files(root) == [], round_number

        assert driver.layer_ids() == sorted(layer_ids)
    finally:
        driver.cleanup()

    assert suite.scratch_disks(root) == []
    assert suite.child_pids() == before.children
    assert suite.open_fd_count() == before.open_fds


# --- requests from many threads ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["safe", "global"])
def test_changes_threads(root: Path, mode: str) -> None:
    """Threads run Changes of one layer at once; in global mode they share one worker."""
    driver = Driver(root, MODE_OPTIONS[mode])
    try:
        suite.apply_layer(driver, "base", None, register_members(1))
        expected = driver.changes("base", None)
        count = driver.service_vms.started_count
        results: list[list[tuple[str, int]]] = []
        errors: list[str] = []

        def run_changes() -> None:
            for _ in range(CHANGES_PER_THREAD[mode]):
                try:
                    results.append(driver.changes("base", None))
                except LcowError as err:
                    errors.append(f"{type(err).__name__}: {err}")

        run_threads([threading.Thread(target=run_changes) for _ in range(THREAD_COUNT)])

        assert errors == []
        assert all(result == expected for result in results)
        assert len(results) == THREAD_COUNT * CHANGES_PER_THREAD[mode]
        if mode == "global":
            assert driver.service_vms.started_count == count
    finally:
        driver.cleanup()


# --- Get and Put from many threads ---------------------------------------------------------


def test_get_put_counts(root: Path) -> None:
    driver = Driver(root)
    driver.create("shared")
    before = suite.ProcessResources.capture()
    paths: list[set[str]] = [set() for _ in range(THREAD_COUNT)]

    def get_many(index: int) -> None:
        for _ in range(GETS_PER_THREAD):
            paths[index].add(driver.get("shared"))

    def put_many() -> None:
        for _ in range(GETS_PER_THREAD):
            driver.put("shared")

    run_threads([threading.Thread(target=get_many, args=(index,)) for index in range(THREAD_COUNT)])

    assert driver.references("shared") == THREAD_COUNT * GETS_PER_THREAD
    assert set().union(*paths) == {str(root / "shared")}
    with pytest.raises(FailedPreconditionError):
        driver.remove("shared")

    run_threads([threading.Thread(target=put_many) for _ in range(THREAD_COUNT)])

    assert driver.references("shared") == 0
    assert suite.open_fd_count() == before.open_fds

    driver.remove("shared")

    assert not driver.exists("shared")
    driver.cleanup()


def test_get_put_interleaved(root: Path) -> None:
    driver = Driver(root)
    driver.create("shared")
    before = suite.ProcessResources.capture()

    def get_and_put() -> None:
        for _ in range(GETS_PER_THREAD):
            driver.get("shared")
            driver.put("shared")

    run_threads([threading.Thread(target=get_and_put) for _ in range(THREAD_COUNT)])

    assert driver.references("shared") == 0
    assert suite.open_fd_count() == before.open_fds

    driver.remove("shared")

    assert not driver.exists("shared")
    driver.cleanup()


# --- two processes -------------------------------------------------------------------------


@pytest.fixture
def layer_tars(tmp_path: Path) -> list[Path]:
    """Two layer tars of 64 small files each, with different content."""
    tars = []
    for seed in (1, 2):
        path = tmp_path / f"layer-{seed}.tar"
        path.write_bytes(suite.layer_tar(register_members(seed)).getvalue())
        tars.append(path)
    return tars


@pytest.mark.parametrize("mode", ["safe", "global"])
@pytest.mark.parametrize("store", ["new", "used"])
def test_two_processes_apply(
    root: Path, tmp_path: Path, mode: str, store: str, layer_tars: list[Path]
) -> None:
    """Two processes apply layers at once, on a new store or on one that has a layer.

    On a new store both processes also create the cached scratch disk at the same time.
    """
    options = MODE_OPTIONS[mode]
    if store == "used":
        driver = Driver(root, options)
        suite.apply_layer(driver, "base", None, register_members(3))
        driver.cleanup()

    with (
        suite.DriverProcess(root, options, tmp_path) as first,
        suite.DriverProcess(root, options, tmp_path) as second,
    ):
        for round_number in range(PROCESS_ROUNDS):
            layer_ids = [f"first-{round_number}", f"second-{round_number}"]
            for process, layer_id in zip((first, second), layer_ids, strict=True):
                assert process.request("create", id=layer_id) == {"result": None}

            # Both requests are on their way before either reply is read.
            for process, layer_id, tar in zip((first, second), layer_ids, layer_tars, strict=True):
                process.send("apply", id=layer_id, tar=str(tar))
            replies = [process.reply() for process in (first, second)]

            assert "error" not in replies[0], replies[0]
            assert "error" not in replies[1], replies[1]
            for layer_id in layer_ids:
                e2fsck_clean(root / layer_id / LAYER_IMAGE)

    assert suite.processes_using(root) == []
    assert suite.temporary_files(root) == []
    assert suite.scratch_disks(root) == []


@pytest.mark.parametrize("mode", ["safe", "global"])
def test_two_processes_read(root: Path, tmp_path: Path, mode: str) -> None:
    """Two processes run Changes of the same layer at once."""
    options = MODE_OPTIONS[mode]
    driver = Driver(root, options)
    suite.apply_layer(driver, "base", None, register_members(1))
    expected = driver.changes("base", None)
    driver.cleanup()

    with (
        suite.DriverProcess(root, options, tmp_path) as first,
        suite.DriverProcess(root, options, tmp_path) as second,
    ):
        for _ in range(PROCESS_ROUNDS):
            for process in (first, second):
                process.send("changes", id="base")
            replies = [process.reply() for process in (first, second)]

            assert "error" not in replies[0], replies[0]
            assert "error" not in replies[1], replies[1]
            assert replies[0]["result"] == [list(change) for change in expected]
            assert replies[1]["result"] == [list(change) for change in expected]

    assert suite.processes_using(root) == []
    assert suite.scratch_disks(root) == []


def test_init_keeps_live_scratch(root: Path, tmp_path: Path, layer_tars: list[Path]) -> None:
    """Init deletes the scratch disks of stopped service VMs, not of another process's."""
    with suite.DriverProcess(root, MODE_OPTIONS["global"], tmp_path) as process:
        assert process.request("create", id="first") == {"result": None}
        reply = process.request("apply", id="first", tar=str(layer_tars[0]))
        assert "error" not in reply, reply
        scratch = suite.scratch_disks(root)

        Driver(root).cleanup()

        # Scratch disks are named <service VM>.<pid of the driver process>.vhdx.
        assert len(scratch) == 1
        assert scratch[0].startswith(f"{suite.GLOBAL_SERVICE_VM}.")
        assert suite.scratch_disks(root) == scratch


def test_remove_held_by_other_process(root: Path, tmp_path: Path) -> None:
    driver = Driver(root)
    suite.apply_layer(driver, "held", None, register_members(1))
    driver.cleanup()

    with (
        suite.DriverProcess(root, [], tmp_path) as holder,
        suite.DriverProcess(root, [], tmp_path) as remover,
    ):
        assert holder.request("get", id="held") == {"result": str(root / "held")}

        # Remove waits up to lcow.driver.REMOVE_WAIT_S for the lock before it gives up.
        reply = remover.request("remove", id="held")

        assert reply.get("error") == FailedPreconditionError.__name__
        assert (root / "held" / LAYER_IMAGE).exists()

        # A killed process never calls Put; the kernel drops its lock with it.
        holder.kill()
        reply = remover.request("remove", id="held")

        assert reply == {"result": None}
        assert not (root / "held").exists()
        assert suite.removing_folders(root) == []
