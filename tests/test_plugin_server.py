"""The plugin server spoken to over its unix socket, as dockerd speaks to it."""

from __future__ import annotations

import io
import json
import socket
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcow.plugin.server import PluginServer, PluginState

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


def layer_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("data/hello.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"hi\n"))
    return buffer.getvalue()


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Path]:
    socket_path = tmp_path / "run" / "lcow.sock"
    server = PluginServer(socket_path, PluginState([]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield socket_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def call(socket_path: Path, path: str, body: bytes, *, chunked: bool = False) -> tuple[int, bytes]:
    """POST ``body`` to ``path`` over the socket; return the status and the response body."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(60)
    connection.connect(str(socket_path))
    with connection:
        if chunked:
            headers = "Transfer-Encoding: chunked\r\n"
            payload = b""
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                payload += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            payload += b"0\r\n\r\n"
        else:
            headers = f"Content-Length: {len(body)}\r\n"
            payload = body
        request = (
            f"POST {path} HTTP/1.1\r\nHost: plugin\r\nAccept: {ACCEPT}\r\n"
            f"{headers}Connection: close\r\n\r\n"
        )
        connection.sendall(request.encode() + payload)
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    head, _, content = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        content = dechunk(content)
    return status, content


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def test_socket_mode_0600(plugin: Path) -> None:
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o600


def test_activate_implements_graphdriver(plugin: Path) -> None:
    status, body = call(plugin, "/Plugin.Activate", b"")

    assert status == 200
    assert json.loads(body) == {"Implements": ["GraphDriver"]}


def test_apply_diff_chunked_and_changes(plugin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    call(plugin, "/GraphDriver.Init", json.dumps({"Home": str(home), "Opts": None}).encode())
    call(plugin, "/GraphDriver.Create", json.dumps({"ID": "base"}).encode())

    status, body = call(plugin, "/GraphDriver.ApplyDiff?id=base&parent=", layer_tar(), chunked=True)
    changes_status, changes = call(
        plugin, "/GraphDriver.Changes", json.dumps({"ID": "base"}).encode()
    )
    diff_status, diff = call(plugin, "/GraphDriver.Diff", json.dumps({"ID": "base"}).encode())

    assert status == 200
    assert json.loads(body) == {"Size": 3}
    assert changes_status == 200
    assert json.loads(changes) == {
        "Changes": [{"Path": "/data", "Kind": 1}, {"Path": "/data/hello.txt", "Kind": 1}]
    }
    assert diff_status == 200
    with tarfile.open(fileobj=io.BytesIO(diff)) as archive:
        assert archive.getnames() == ["data", "data/hello.txt"]


def test_unknown_layer_err_404(plugin: Path, tmp_path: Path) -> None:
    call(plugin, "/GraphDriver.Init", json.dumps({"Home": str(tmp_path / "home")}).encode())

    status, body = call(plugin, "/GraphDriver.Get", json.dumps({"ID": "missing"}).encode())

    assert status == 404
    assert "missing" in json.loads(body)["Err"]


def test_concurrent_calls_served(plugin: Path, tmp_path: Path) -> None:
    call(plugin, "/GraphDriver.Init", json.dumps({"Home": str(tmp_path / "home")}).encode())
    results: list[int] = []

    def create_and_apply(index: int) -> None:
        call(plugin, "/GraphDriver.Create", json.dumps({"ID": f"layer{index}"}).encode())
        status, _ = call(
            plugin, f"/GraphDriver.ApplyDiff?id=layer{index}&parent=", layer_tar(), chunked=True
        )
        results.append(status)

    threads = [threading.Thread(target=create_and_apply, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert results == [200, 200, 200, 200]
    assert all((tmp_path / "home" / f"layer{index}" / "layer.vhd").exists() for index in range(4))
