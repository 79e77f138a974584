"""The Docker graph-driver plugin: Docker's plugin protocol over a unix socket.

dockerd sends every call as an HTTP/1.1 POST with a JSON body (no Content-Type, ``Accept:
application/vnd.docker.plugins.v1.2+json``); ApplyDiff sends the raw tar as a chunked body
with the id and parent in the query string, and Diff answers with the raw tar. Errors are
``{"Err": "<message>"}`` with a non-200 status. The server runs each connection in a thread
of its own, because dockerd applies several layers at once, and never holds a stream in
memory.

The HTTP layer is the standard library's http.server: it parses requests and writes
responses, and this module adds unix sockets, chunked request bodies and the routes.
"""

import contextlib
import http.server
import io
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from lcow.driver import Driver
from lcow.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LcowError,
    NotFoundError,
)

log = logging.getLogger(__name__)

PLUGIN_CONTENT_TYPE: Final = "application/vnd.docker.plugins.v1.2+json"
COPY_CHUNK_BYTES: Final = 1 << 20
MAX_JSON_BODY_BYTES: Final = 1 << 20

_STATUS_BY_ERROR: Final[tuple[tuple[type[Exception], int], ...]] = (
    (NotFoundError, 404),
    (AlreadyExistsError, 409),
    (FailedPreconditionError, 409),
    (InvalidArgumentError, 400),
)


class ChunkedReader(io.RawIOBase):
    """Decode an HTTP/1.1 chunked body from ``raw`` as a plain byte stream."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        super().__init__()
        self._raw = raw
        self._left = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> None:
        line = self._raw.readline(1024)
        size_text = line.split(b";", 1)[0].strip()
        try:
            self._left = int(size_text, 16)
        except ValueError as err:
            raise OSError(f"invalid chunk size line {line[:40]!r} in the request body") from err
        if self._left == 0:
            while self._raw.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            self._done = True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._done and self._left == 0:
            self._next_chunk()
        if self._done or not len(view):
            return 0
        data = self._raw.read(min(len(view), self._left))
        if not data:
            raise OSError("the request body ended inside a chunk")
        view[: len(data)] = data
        self._left -= len(data)
        if self._left == 0:
            self._raw.readline(16)  # the CRLF after the chunk
        return len(data)


class _LimitedReader(io.RawIOBase):
    """A body with Content-Length: at most ``length`` bytes of ``raw``."""

    def __init__(self, raw: io.BufferedIOBase, length: int) -> None:
        super().__init__()
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left <= 0 or not len(view):
            return 0
        data = self._raw.read(min(len(view), self._left))
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)


class PluginState:
    """The driver behind the socket; created by GraphDriver.Init with dockerd's Home."""

    def __init__(self, default_options: list[str]) -> None:
        self.default_options = default_options
        self.driver: Driver | None = None
        self.lock = threading.Lock()

    def require(self) -> Driver:
        if self.driver is None:
            raise FailedPreconditionError(
                "the plugin was not initialised: dockerd sends Init first"
            )
        return self.driver


class PluginHandler(http.server.BaseHTTPRequestHandler):
    """One request of dockerd's plugin protocol."""

    protocol_version = "HTTP/1.1"
    server: "PluginServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("http: %s", format % args)

    def address_string(self) -> str:
        return "unix"

    # Request bodies -------------------------------------------------------------------

    def _body_stream(self) -> io.BufferedReader:
        raw: io.RawIOBase
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = ChunkedReader(self.rfile)
        else:
            raw = _LimitedReader(self.rfile, int(self.headers.get("Content-Length") or 0))
        return io.BufferedReader(raw, COPY_CHUNK_BYTES)

    def _json_body(self) -> dict[str, Any]:
        data = self._body_stream().read(MAX_JSON_BODY_BYTES + 1)
        if len(data) > MAX_JSON_BODY_BYTES:
            raise InvalidArgumentError("invalid request: the JSON body is larger than 1 MiB")
        if not data.strip():
            return {}
        value = json.loads(data)
        return value if isinstance(value, dict) else {}

    # Responses ------------------------------------------------------------------------

    def _send_json(self, status: int, value: Any) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", PLUGIN_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, error: Exception) -> None:
        status = 500
        for kind, code in _STATUS_BY_ERROR:
            if isinstance(error, kind):
                status = code
                break
        self._send_json(status, {"Err": str(error)})

    # Dispatch -------------------------------------------------------------------------

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        route = ROUTES.get(url.path)
        query = {key: values[-1] for key, values in urllib.parse.parse_qs(url.query).items()}
        if route is None:
            self._send_json(404, {"Err": f"unknown plugin call {url.path}"})
            return
        try:
            route(self, query)
        except (LcowError, OSError, ValueError) as err:
            log.warning("%s failed: %s", url.path, err)
            try:
                self._send_error(err)
            except (BrokenPipeError, ConnectionResetError):
                log.info("%s: dockerd closed the connection before the error reply", url.path)
                self.close_connection = True

    # Routes ---------------------------------------------------------------------------

    def activate(self, _query: dict[str, str]) -> None:
        self._json_body()
        self._send_json(200, {"Implements": ["GraphDriver"]})

    def init(self, _query: dict[str, str]) -> None:
        body = self._json_body()
        home = body.get("Home") or ""
        options = list(self.server.state.default_options) + list(body.get("Opts") or [])
        with self.server.state.lock:
            if self.server.state.driver is not None:
                self.server.state.driver.cleanup()
            self.server.state.driver = Driver(home or None, options)
            # dockerd calls Init at its start, well before the first ApplyDiff.
            self.server.state.driver.service_vms.start_spares()
        log.info("Init home=%s options=%s", home, options)
        self._send_json(200, {})

    def _id_call(self, name: str, call: Callable[[Driver, dict[str, Any]], Any]) -> None:
        body = self._json_body()
        driver = self.server.state.require()
        log.info("%s id=%s parent=%s", name, body.get("ID", ""), body.get("Parent", ""))
        result = call(driver, body)
        self._send_json(200, result if isinstance(result, dict) else {})

    def create(self, _query: dict[str, str]) -> None:
        self._id_call(
            "Create",
            lambda d, b: d.create(b["ID"], b.get("Parent") or None, b.get("StorageOpt")),
        )

    def create_read_write(self, _query: dict[str, str]) -> None:
        self._id_call(
            "CreateReadWrite",
            lambda d, b: d.create_read_write(b["ID"], b.get("Parent") or None, b.get("StorageOpt")),
        )

    def remove(self, _query: dict[str, str]) -> None:
        self._id_call("Remove", lambda d, b: d.remove(b["ID"]))

    def get(self, _query: dict[str, str]) -> None:
        self._id_call("Get", lambda d, b: {"Dir": d.get(b["ID"], b.get("MountLabel", ""))})

    def put(self, _query: dict[str, str]) -> None:
        self._id_call("Put", lambda d, b: d.put(b["ID"]))

    def exists(self, _query: dict[str, str]) -> None:
        self._id_call("Exists", lambda d, b: {"Exists": d.exists(b["ID"])})

    def status(self, _query: dict[str, str]) -> None:
        self._json_body()
        driver = self.server.state.require()
        self._send_json(200, {"Status": [list(pair) for pair in driver.status()]})

    def get_metadata(self, _query: dict[str, str]) -> None:
        self._id_call("GetMetadata", lambda d, b: {"Metadata": d.get_metadata(b["ID"])})

    def cleanup(self, _query: dict[str, str]) -> None:
        self._json_body()
        log.info("Cleanup")
        if self.server.state.driver is not None:
            self.server.state.driver.cleanup()
        self._send_json(200, {})

    def capabilities(self, _query: dict[str, str]) -> None:
        self._json_body()
        self._send_json(200, {"Capabilities": {"ReproducesExactDiffs": False}})

    def changes(self, _query: dict[str, str]) -> None:
        self._id_call(
            "Changes",
            lambda d, b: {
                "Changes": [
                    {"Path": path, "Kind": kind}
                    for path, kind in d.changes(b["ID"], b.get("Parent") or None)
                ]
            },
        )

    def diff_size(self, _query: dict[str, str]) -> None:
        self._id_call(
            "DiffSize", lambda d, b: {"Size": d.diff_size(b["ID"], b.get("Parent") or None)}
        )

    def apply_diff(self, query: dict[str, str]) -> None:
        driver = self.server.state.require()
        layer_id = query.get("id", "")
        parent = query.get("parent") or None
        log.info("ApplyDiff id=%s parent=%s", layer_id, parent or "")
        body = self._body_stream()
        try:
            size = driver.apply_diff(layer_id, parent, body)
        finally:
            # Read what is left so the connection stays in step for the next request; a
            # broken body must not hide the error ApplyDiff raised.
            with contextlib.suppress(OSError, ValueError):
                while body.read(COPY_CHUNK_BYTES):
                    pass
        self._send_json(200, {"Size": size})

    def diff(self, _query: dict[str, str]) -> None:
        body = self._json_body()
        driver = self.server.state.require()
        log.info("Diff id=%s parent=%s", body.get("ID", ""), body.get("Parent", ""))
        with driver.diff(body["ID"], body.get("Parent") or None) as stream:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := stream.read(COPY_CHUNK_BYTES):
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")


ROUTES: Final[dict[str, Callable[[PluginHandler, dict[str, str]], None]]] = {
    "/Plugin.Activate": PluginHandler.activate,
    "/GraphDriver.Init": PluginHandler.init,
    "/GraphDriver.Create": PluginHandler.create,
    "/GraphDriver.CreateReadWrite": PluginHandler.create_read_write,
    "/GraphDriver.Remove": PluginHandler.remove,
    "/GraphDriver.Get": PluginHandler.get,
    "/GraphDriver.Put": PluginHandler.put,
    "/GraphDriver.Exists": PluginHandler.exists,
    "/GraphDriver.Status": PluginHandler.status,
    "/GraphDriver.GetMetadata": PluginHandler.get_metadata,
    "/GraphDriver.Cleanup": PluginHandler.cleanup,
    "/GraphDriver.Capabilities": PluginHandler.capabilities,
    "/GraphDriver.Diff": PluginHandler.diff,
    "/GraphDriver.Changes": PluginHandler.changes,
    "/GraphDriver.ApplyDiff": PluginHandler.apply_diff,
    "/GraphDriver.DiffSize": PluginHandler.diff_size,
}


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP server on a unix socket (mode 0600), one thread per connection."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, socket_path: Path, state: PluginState) -> None:
        self.socket_path = socket_path
        self.state = state
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(socket_path.lstat().st_mode):
                _remove_stale_socket(socket_path)
        old_umask = os.umask(0o177)  # the socket is created 0600: dockerd runs as root
        try:
            super().__init__(str(socket_path), PluginHandler)
        finally:
            os.umask(old_umask)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self.state.driver is not None:
            self.state.driver.cleanup()


def _remove_stale_socket(path: Path) -> None:
    """Delete a socket file that no process listens on; refuse to replace a live one."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise FailedPreconditionError(
        f"failed to listen on {path}: another plugin serves it; stop that one first"
    )
