"""Bring a driver's spare service VMs into the state of a running driver that was idle."""

from typing import Final

from lcow.servicevm.manager import ServiceVMManager

SPARE_READY_TIMEOUT_S: Final = 60.0


def ready_spares(manager: ServiceVMManager) -> None:
    """Start the manager's spares and wait until each runs; raise RuntimeError if one fails."""
    manager.start_spares()
    if not manager.wait_for_spares(SPARE_READY_TIMEOUT_S):
        raise RuntimeError(
            f"the spare service VMs did not start within {SPARE_READY_TIMEOUT_S:g} s"
        )
