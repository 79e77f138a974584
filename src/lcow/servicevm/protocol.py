"""The channel between the driver and a service VM's worker.

A frame is a 4-byte big-endian length followed by that many bytes of a UTF-8 JSON object.
File descriptors travel as SCM_RIGHTS ancillary data on the length bytes of the frame that
names them; this is how disks are hot-added to a process worker.

Requests carry ``id`` (unique per channel) and ``op``; each reply carries the ``id`` it
answers and either ``result`` or ``error`` (``{"type": ..., "message": ...}``, the lcow error
class name and its message). Requests:

============== ============================================== ===============================
op             arguments                                      result
============== ============================================== ===============================
hello          (none)                                         pid, version, isolation
attach         slot; one descriptor rides with the frame      (none)
detach         slot                                           (none)
tar2ext4       input, output (slots), max_size_bytes, footer  conversion statistics and
                                                              output_size_bytes
ext4totar      disk, subdirectory or null, output (slots)     entries written
format_sandbox output (slot), size_bytes, format (raw, vhdx)  output_size_bytes
changes        layer, parent: lists of [slot, subdirectory];  changes [[path, kind], ...] and
               own_parent: whether parent is layer's parent   size (DiffSize)
shutdown       (none)                                         (none); the worker then exits
============== ============================================== ===============================

``output_size_bytes`` is the length of the file written to the output slot. An output that
is a disk of a utility VM cannot be truncated by the worker, so the qemu backend cuts the
host's file to that length.
"""

import array
import contextlib
import json
import os
import socket
import struct
from typing import Any, Final

from lcow.errors import ServiceVMError

LENGTH: Final = struct.Struct(">I")
MAX_FRAME_BYTES: Final = 256 << 20  # Changes of a layer with millions of entries fit
MAX_FDS_PER_FRAME: Final = 4

Message = dict[str, Any]


def send(sock: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    """Send one frame, with ``fds`` attached to its length bytes."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    header = LENGTH.pack(len(payload))
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([header], ancillary)
        if sent != len(header):
            sock.sendall(header[sent:])
    else:
        sock.sendall(header)
    sock.sendall(payload)


def _receive_exact(sock: socket.socket, length: int) -> bytes:
    chunks = []
    while length:
        chunk = sock.recv(min(length, 1 << 20))
        if not chunk:
            raise ServiceVMError("failed to read from the service VM: the channel closed")
        chunks.append(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """Receive one frame and the descriptors sent with it; None when the peer closed."""
    fd_bytes = array.array("i").itemsize * MAX_FDS_PER_FRAME
    data, ancillary, _flags, _address = sock.recvmsg(LENGTH.size, socket.CMSG_SPACE(fd_bytes))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None
    if len(data) < LENGTH.size:
        data += _receive_exact(sock, LENGTH.size - len(data))
    (length,) = LENGTH.unpack(data)
    if length > MAX_FRAME_BYTES:
        raise ServiceVMError(f"invalid frame from the service VM: {length} bytes")
    message = json.loads(_receive_exact(sock, length))
    if not isinstance(message, dict):
        raise ServiceVMError("invalid frame from the service VM: not a JSON object")
    return message, fds


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
