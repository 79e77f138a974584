"""A QEMU Machine Protocol (QMP) client on a unix socket.

The protocol, as QEMU 7.2 speaks it: the server sends a greeting, ``{"QMP": ...}``. The
client sends ``qmp_capabilities`` once, then commands as JSON objects with an ``id``, and
each reply (``return`` or ``error``) carries the id of its command. Events
(``{"event": ...}``) arrive at any time, between replies. A descriptor for ``add-fd``
travels as SCM_RIGHTS data on the command's bytes.
"""

import array
import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any, Final

from lcow.errors import ServiceVMError

log = logging.getLogger(__name__)

MAX_LINE_BYTES: Final = 16 << 20


class QmpError(ServiceVMError):
    """QEMU rejected a command. The message contains QEMU's error class and description."""


class QmpClient:
    """One QMP connection: commands wait for their reply, events are kept for waiters."""

    def __init__(self, path: str, *, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout_s)
        try:
            self._socket.connect(path)
            self._file = self._socket.makefile("rb")
            greeting = self._read_message()
        except (OSError, ValueError, TypeError) as err:
            self._socket.close()
            raise ServiceVMError(f"failed to connect to QMP at {path}: {err}") from err
        if greeting is None or "QMP" not in greeting:
            self._socket.close()
            raise ServiceVMError(f"failed to connect to QMP at {path}: no greeting")
        self._socket.settimeout(None)
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._condition = threading.Condition()
        self._send_lock = threading.Lock()  # one command's bytes at a time on the socket
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def __repr__(self) -> str:
        return f"QmpClient(path={self.path!r}, closed={self._closed})"

    def _read_message(self) -> dict[str, Any] | None:
        line = self._file.readline(MAX_LINE_BYTES)
        if not line:
            return None
        message = json.loads(line)
        if not isinstance(message, dict):
            raise TypeError(f"QMP sent a {type(message).__name__}, not an object")
        return message

    def _read_loop(self) -> None:
        try:
            while (message := self._read_message()) is not None:
                if "event" in message:
                    with self._condition:
                        self._events.append(message)
                        self._condition.notify_all()
                    continue
                with self._condition:
                    future = self._pending.pop(int(message.get("id", 0)), None)
                if future is not None:
                    future.set_result(message)
        except (OSError, ValueError, TypeError) as err:
            log.info("QMP connection %s ended: %s", self.path, err)
        with self._condition:
            self._closed = True
            pending, self._pending = self._pending, {}
            self._condition.notify_all()
        for future in pending.values():
            future.set_exception(ServiceVMError("QEMU closed the QMP connection"))

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        fds: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Run ``command`` and return its ``return`` value; raise QmpError on ``error``."""
        future: Future[Any] = Future()
        with self._condition:
            if self._closed:
                raise ServiceVMError(f"failed to run {command}: QEMU closed the QMP connection")
            command_id = next(self._ids)
            self._pending[command_id] = future
        message: dict[str, Any] = {"execute": command, "id": command_id}
        if arguments is not None:
            message["arguments"] = arguments
        payload = json.dumps(message).encode() + b"\n"
        try:
            with self._send_lock:
                self._send(payload, fds)
        except OSError as err:
            with self._condition:
                self._pending.pop(command_id, None)
            raise ServiceVMError(f"failed to send {command} to QEMU: {err}") from err

        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = future.result(timeout=limit)
        except TimeoutError as err:
            with self._condition:
                self._pending.pop(command_id, None)
            raise ServiceVMError(f"QEMU did not reply to {command} within {limit:g} s") from err
        if "error" in reply:
            error = reply["error"]
            raise QmpError(f"QEMU rejected {command}: {error.get('class')}: {error.get('desc')}")
        return reply.get("return")

    def _send(self, payload: bytes, fds: list[int] | None) -> None:
        if not fds:
            self._socket.sendall(payload)
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = self._socket.sendmsg([payload], ancillary)
        self._socket.sendall(payload[sent:])

    def event_mark(self) -> int:
        """Return a position in the event log; wait_event looks only at later events."""
        with self._condition:
            return len(self._events)

    def wait_event(
        self, name: str, data: dict[str, Any], *, since: int, timeout_s: float
    ) -> dict[str, Any]:
        """Wait for event ``name`` whose data contains ``data``, received after ``since``."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                for event in self._events[since:]:
                    details = event.get("data", {})
                    if event["event"] == name and all(
                        details.get(key) == value for key, value in data.items()
                    ):
                        return event
                since = len(self._events)
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise ServiceVMError(f"QEMU closed the QMP connection before {name}")
                if remaining <= 0:
                    raise ServiceVMError(
                        f"QEMU sent no {name} event for {data} within {timeout_s:g} s"
                    )
                self._condition.wait(remaining)

    def close(self) -> None:
        with self._condition:
            self._closed = True
        with contextlib.suppress(OSError):  # QEMU may have closed it first
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._file.close()
        self._reader.join(timeout=5)
