"""Run the driver conformance suite for each service VM mode and sandbox format.

The 128-layer chain is built once per parametrization. Its layers have no sandbox, and
global and safe mode run the same conversion code in the worker, but what lives around the
128 conversions differs: one worker for all of them, or one worker each. The chain then
gets a sandbox of the parametrization's format on top.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Show the compared values when a check in the suite module fails.
pytest.register_assert_rewrite("driver_conformance")

import driver_conformance as suite  # noqa: E402
from lcow.driver import Driver  # noqa: E402


@pytest.fixture(scope="module", params=suite.CONFIGS, ids=lambda config: config.name)
def config(request: pytest.FixtureRequest) -> suite.DriverConfig:
    parameter: suite.DriverConfig = request.param
    return parameter


@pytest.fixture
def open_driver(config: suite.DriverConfig, tmp_path: Path) -> suite.DriverFactory:
    def open_store() -> Driver:
        return Driver(tmp_path / "root", config.options)

    return open_store


@pytest.fixture(scope="module")
def chain_driver(
    config: suite.DriverConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Driver]:
    """A driver whose store contains the 128-layer chain ``level-0`` ... ``level-127``."""
    driver = Driver(tmp_path_factory.mktemp(f"chain-{config.name}"), config.options)
    try:
        suite.build_chain(driver)
        yield driver
    finally:
        driver.cleanup()


def test_create_empty(open_driver: suite.DriverFactory) -> None:
    suite.check_create_empty(open_driver)


def test_chain_links(chain_driver: Driver) -> None:
    suite.check_chain_links(chain_driver)


def test_chain_reader(chain_driver: Driver) -> None:
    suite.check_chain_reader(chain_driver)


@pytest.mark.root
def test_chain_mount(chain_driver: Driver, tmp_path: Path) -> None:
    suite.check_chain_mount(chain_driver, tmp_path, suite.CHAIN_MOUNT_LEVELS)


def test_chain_changes(chain_driver: Driver) -> None:
    suite.check_chain_changes(chain_driver)


def test_chain_diff_size(chain_driver: Driver) -> None:
    suite.check_chain_diff_size(chain_driver)


def test_chain_sandbox(chain_driver: Driver) -> None:
    suite.check_chain_sandbox(chain_driver)


@pytest.mark.root
def test_diff_apply(open_driver: suite.DriverFactory, tmp_path: Path) -> None:
    suite.check_diff_apply(open_driver, tmp_path)


@pytest.mark.root
@pytest.mark.parametrize("child_kind", ["layer", "sandbox"])
def test_changes_21(open_driver: suite.DriverFactory, tmp_path: Path, child_kind: str) -> None:
    suite.check_changes_21(open_driver, tmp_path, child_kind)


def test_remove_cleanup(open_driver: suite.DriverFactory) -> None:
    suite.check_remove_cleanup(open_driver)
