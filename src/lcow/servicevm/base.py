"""The service VM interface that the driver uses, whatever the backend.

A service VM is started once, gets disks and streams hot-added as slots, answers requests
(see :mod:`lcow.servicevm.protocol`) and is terminated: asked to stop, given ``stop_timeout_s``
to do so, then killed and reaped. Every method may raise :class:`ServiceVMError`.
"""

import abc
import itertools
import logging
import os
import socket
import threading
from concurrent.futures import Future
from typing import Any, Final

from lcow import errors
from lcow.errors import LcowError, ServiceVMError
from lcow.servicevm import protocol

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S: Final = 10.0


def _error_from_reply(error: dict[str, Any]) -> LcowError:
    """Rebuild the worker's error as the same lcow error class, else as ServiceVMError."""
    kind = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message"))
    if isinstance(kind, type) and issubclass(kind, LcowError):
        return kind(message)
    if error.get("type") in ("FileNotFoundError",):
        return errors.NotFoundError(message)
    return ServiceVMError(f"the service VM failed: {error.get('type')}: {message}")


class ServiceVM(abc.ABC):
    """A running worker reached over a channel socket; subclasses start and stop it."""

    # Whether the worker reads or writes an attached regular file as a stream, as it does
    # a pipe. A utility VM attaches every regular file as a disk instead.
    streams_host_files = False

    def __init__(self, name: str, *, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.channel: socket.socket | None = None
        self._ids = itertools.count(1)
        self._slots = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        # Frames of concurrent requests (global mode) must not interleave on the channel.
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed_error: ServiceVMError | None = None

    @abc.abstractmethod
    def start(self) -> None:
        """Boot the worker and connect ``self.channel``; raise ServiceVMError on failure."""

    @abc.abstractmethod
    def terminate(self, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Ask the worker to stop, wait up to ``stop_timeout_s``, then kill and reap it."""

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """Return whether the worker is alive."""

    def to_foreground(self) -> None:  # noqa: B027 - most backends start at normal priority
        """Give a service VM started in the background the normal CPU priority back."""

    # Channel --------------------------------------------------------------------------------

    def rename(self, name: str) -> None:
        """Give a started service VM a new name, its reply thread's included."""
        self.name = name
        if self._reader is not None:
            self._reader.name = f"{name}-replies"

    def _start_reader(self) -> None:
        self._reader = threading.Thread(
            target=self._read_replies, name=f"{self.name}-replies", daemon=True
        )
        self._reader.start()

    def _read_replies(self) -> None:
        assert self.channel is not None
        try:
            while True:
                received = protocol.receive(self.channel)
                if received is None:
                    break
                message, fds = received
                for fd in fds:
                    os.close(fd)
                if "event" in message:
                    self._handle_event(message)
                    continue
                with self._lock:
                    future = self._pending.pop(int(message.get("id", 0)), None)
                if future is not None:
                    future.set_result(message)
        except (OSError, ValueError, ServiceVMError) as err:
            log.info("service VM %s channel closed: %s", self.name, err)
        with self._lock:
            self._closed_error = ServiceVMError(f"service VM {self.name} stopped before it replied")
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(self._closed_error)

    def _handle_event(self, message: dict[str, Any]) -> None:
        """Act on a message the worker sent on its own; it runs on the reply thread."""
        log.warning("service VM %s sent an unexpected event: %s", self.name, message)

    def request(
        self,
        op: str,
        *,
        fds: list[int] | None = None,
        timeout_s: float | None = None,
        **arguments: Any,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply; raise the worker's error as lcow's."""
        if self.channel is None:
            raise ServiceVMError(f"service VM {self.name} is not running")
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._closed_error is not None:
                raise self._closed_error
            request_id = next(self._ids)
            self._pending[request_id] = future
        try:
            with self._send_lock:
                protocol.send(self.channel, {"id": request_id, "op": op, **arguments}, fds)
        except OSError as err:
            with self._lock:
                self._pending.pop(request_id, None)
            raise ServiceVMError(f"failed to send {op} to service VM {self.name}: {err}") from err

        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = future.result(timeout=limit)
        except TimeoutError as err:
            with self._lock:
                self._pending.pop(request_id, None)
            raise ServiceVMError(
                f"service VM {self.name} did not answer {op} within {limit:g} s "
                "(lcow.timeout sets the limit)"
            ) from err
        if "error" in reply:
            raise _error_from_reply(reply["error"])
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {}

    # Disks ----------------------------------------------------------------------------------

    def attach(self, fd: int) -> int:
        """Hot-add the open file, pipe or disk ``fd``; return its slot number."""
        slot = next(self._slots)
        self.request("attach", fds=[fd], slot=slot)
        return slot

    def detach(self, slot: int) -> None:
        """Hot-remove a slot; the worker closes its descriptor."""
        self.request("detach", slot=slot)
