"""The groups a run measures: which cases run together on which input, and their goals.

A group's cases are timed interleaved. Each group prepares what it needs (a store, a kept
layer, a mount) in its own folder on the output file system and undoes it afterwards.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench import lcow_cases, references
from bench.inputs import Layer, describe
from bench.lcow_cases import APPLY_DIFF, APPLY_DIFF_COLD, DIFF, DIFF_COLD, DIFF_TO_FILE
from bench.report import Goal, rss_goal
from bench.timing import Case
from lcow.driver import Driver
from lcow.servicevm.manager import ServiceVMManager

CREATE_READ_WRITE_LIMIT_S: Final = 0.020
SERVICE_VM_START_LIMIT_S: Final = 0.050
PRESTARTED_START_CASE: Final = "service VM start and stop, prestarted"
COLD_START_CASE: Final = "service VM start and stop, cold"
SANDBOX_SIZES_GB: Final = {"20GiB": 20, "1TiB": 1024}  # lcow.sandboxsize is in GiB


@dataclass(frozen=True, slots=True)
class Group:
    """Cases to time together; ``prepare`` yields them and cleans up after the group."""

    group_id: str
    layer_path: Path | None
    prepare: Callable[[Path, Layer | None], contextlib.AbstractContextManager[list[Case]]]
    goals: Callable[[Layer | None], list[Goal]]

    def layer(self) -> Layer | None:
        return None if self.layer_path is None else describe(self.layer_path)


def _conversion_cases(layer: Layer, store: Path) -> list[Case]:
    """List the lcow cases of a plain or gzip group: ApplyDiff twice, convert_tar, tar2vhd."""
    return [
        lcow_cases.apply_diff(layer, store, prestart=True),
        lcow_cases.apply_diff(layer, store, prestart=False),
        lcow_cases.convert_in_process(layer),
        lcow_cases.convert_command(layer),
    ]


def _plain(layer_path: Path) -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        assert layer is not None
        yield [
            references.tar_extract(layer),
            references.shell_route(layer),
            *_conversion_cases(layer, folder / "store"),
        ]

    def goals(layer: Layer | None) -> list[Goal]:
        assert layer is not None
        result = []
        for case in (APPLY_DIFF, APPLY_DIFF_COLD):
            if layer.kind in ("many-small", "huge"):
                result.append(Goal(case, "ratio", 1.0, "tar -xf"))
            result.append(Goal(case, "ratio", 0.4, "tar -xf + mkfs.ext4 -d"))
            result.append(rss_goal(layer, case))
        return result

    return Group(f"plain/{layer_path.name}", layer_path, prepare, goals)


def _gzip(layer_path: Path) -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        assert layer is not None
        yield [references.tar_extract(layer), *_conversion_cases(layer, folder / "store")]

    def goals(layer: Layer | None) -> list[Goal]:
        assert layer is not None
        return [
            goal
            for case in (APPLY_DIFF, APPLY_DIFF_COLD)
            for goal in (Goal(case, "ratio", 0.7, "tar -xzf"), rss_goal(layer, case))
        ]

    return Group(f"gzip/{layer_path.name}", layer_path, prepare, goals)


def _export(layer_path: Path) -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        assert layer is not None
        store = folder / "store"
        image = lcow_cases.keep_layer(layer, store, "exported")
        with references.LoopMount(image, folder / "mnt") as mount_point:
            yield [
                references.tar_create(mount_point),
                lcow_cases.export(store, "exported", prestart=True),
                lcow_cases.export(store, "exported", prestart=True, to_file=True),
                lcow_cases.export(store, "exported", prestart=False),
            ]

    def goals(layer: Layer | None) -> list[Goal]:
        del layer
        reference = "tar -c of the mounted image"
        cases = (DIFF, DIFF_TO_FILE, DIFF_COLD)
        return [Goal(case, "ratio", 1.0, reference) for case in cases]

    return Group(f"export/{layer_path.name}", layer_path, prepare, goals)


def _create_read_write(label: str, size_gb: int) -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        del layer
        driver = Driver(folder / "store", [f"lcow.sandboxsize={size_gb}"])
        try:
            # The first sandbox makes the cache; only later ones are timed.
            driver.create_read_write("make-cache")
            driver.remove("make-cache")
            cached = next((folder / "store" / "cache").glob("sandbox.*"))
            yield [references.sparse_copy(cached), lcow_cases.create_read_write(driver)]
        finally:
            driver.cleanup()

    def goals(layer: Layer | None) -> list[Goal]:
        del layer
        return [Goal("CreateReadWrite", "seconds", CREATE_READ_WRITE_LIMIT_S)]

    return Group(f"create_read_write/{label}", None, prepare, goals)


def _service_vm_start() -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        del layer
        store = folder / "store"
        for name in ("cache", "scratch"):
            (store / name).mkdir(parents=True, exist_ok=True)
        prestarted = ServiceVMManager(store, global_mode=False, prestart=True)
        cold = ServiceVMManager(store, global_mode=False, prestart=False)
        try:
            yield [
                references.interpreter_start(),
                lcow_cases.service_vm_start(prestarted, PRESTARTED_START_CASE),
                lcow_cases.service_vm_start(cold, COLD_START_CASE),
            ]
        finally:
            prestarted.terminate_all()
            cold.terminate_all()

    def goals(layer: Layer | None) -> list[Goal]:
        del layer
        # A running driver's operation takes a prestarted worker; a new driver's first one
        # waits for a cold start. Both are held to the start-up goal.
        return [
            Goal(case, "seconds", SERVICE_VM_START_LIMIT_S)
            for case in (PRESTARTED_START_CASE, COLD_START_CASE)
        ]

    return Group("service_vm_start", None, prepare, goals)


def _changes(base_path: Path, layer_path: Path) -> Group:
    @contextlib.contextmanager
    def prepare(folder: Path, layer: Layer | None) -> Iterator[list[Case]]:
        del layer
        driver = Driver(folder / "store", [])
        try:
            driver.create("base")
            with base_path.open("rb") as diff:
                driver.apply_diff("base", None, diff)
            driver.create("upper", "base")
            with layer_path.open("rb") as diff:
                driver.apply_diff("upper", "base", diff)
            yield lcow_cases.changes(driver, "upper", "base")
        finally:
            driver.cleanup()

    def goals(layer: Layer | None) -> list[Goal]:
        del layer
        return []

    return Group(f"changes/{layer_path.name}", layer_path, prepare, goals)


def plan(corpus: list[Path], generated: list[Path]) -> list[Group]:
    """Return every group in run order: the quick ones first, the 2 GB inputs last."""
    groups = [_service_vm_start()]
    groups += [_create_read_write(label, size) for label, size in SANDBOX_SIZES_GB.items()]
    base = next(path for path in corpus if path.name == "L1-base.tar")
    groups += [
        _changes(base, path) for path in corpus if path.name in ("L2-umoci.tar", "L2-buildah.tar")
    ]
    for paths in (corpus, generated):
        groups += [_plain(path) for path in paths if not path.name.endswith(".gz")]
        groups += [_gzip(path) for path in paths if path.name.endswith(".gz")]
        groups += [_export(path) for path in paths if not path.name.endswith(".gz")]
    return groups
