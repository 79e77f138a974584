"""The guest agent: lcow's worker inside the qemu backend's utility VM.

The init script of the VM starts it as ``python -m lcow.servicevm.guest.agent --channel
/dev/vportNpM``. It serves the same requests as the process worker (see
:mod:`lcow.servicevm.protocol`), with the same code, so conversions give the same bytes in
both backends. Descriptors cannot cross into a VM, so slots are filled differently:

===================== =========================================================================
op                    what the agent does
===================== =========================================================================
attach_disk           slot, serial, writable: wait for the virtio disk with that serial, open
                      its block device and put the descriptor into the slot
attach_stream_in      slot: put the read end of a new pipe into the slot; ``feed`` fills it
feed                  slot, serial, size_bytes: copy the first size_bytes of the disk with that
                      serial into the pipe, then close the pipe's write end (end of stream)
attach_stream_out     slot, serial: put the write end of a new pipe into the slot and copy
                      what the worker writes onto the disk; when the worker closes the slot the
                      agent sends the event ``stream_closed`` with slot, size_bytes and error
===================== =========================================================================

The channel is a virtio-serial port, a character device. The worker speaks to a socket, so
two relay threads copy between the port and one end of a socketpair.
"""

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

from lcow.errors import ServiceVMError
from lcow.servicevm import protocol
from lcow.servicevm.worker import Worker

log = logging.getLogger("lcow.servicevm.guest")

SYS_BLOCK: Final = Path("/sys/block")
DISK_WAIT_TIMEOUT_S: Final = 60.0  # hot-plug under TCG takes about a second; this is slack
DISK_POLL_INTERVAL_S: Final = 0.02
COPY_CHUNK_BYTES: Final = 1 << 20
HOST_CONNECT_TIMEOUT_S: Final = 60.0


def find_disk(serial: str, timeout_s: float = DISK_WAIT_TIMEOUT_S) -> Path:
    """Wait for the virtio disk whose serial is ``serial``; return its device node."""
    deadline = time.monotonic() + timeout_s
    while True:
        for device in SYS_BLOCK.glob("vd*"):
            with contextlib.suppress(OSError):
                if (device / "serial").read_text().strip() == serial:
                    node = Path("/dev") / device.name
                    if node.exists():
                        return node
        if time.monotonic() >= deadline:
            raise ServiceVMError(
                f"no disk with serial {serial!r} appeared in the utility VM within {timeout_s:g} s"
            )
        time.sleep(DISK_POLL_INTERVAL_S)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class GuestWorker(Worker):
    """The worker, with slots filled from hot-added disks instead of passed descriptors."""

    def __init__(self, channel: socket.socket, name: str) -> None:
        super().__init__(channel, name, ["vm"])
        self._feeds: dict[int, int] = {}  # slot -> write end of its input pipe

    def _put_slot(self, slot: int, fd: int) -> None:
        with self._slots_lock:
            old = self.slots.pop(slot, None)
            if old is not None:
                os.close(old)
            self.slots[slot] = fd

    def op_attach_disk(self, request: dict[str, Any]) -> dict[str, Any]:
        node = find_disk(str(request["serial"]))
        flags = os.O_RDWR if request.get("writable") else os.O_RDONLY
        self._put_slot(int(request["slot"]), os.open(node, flags | os.O_CLOEXEC))
        return {"device": str(node)}

    def op_attach_stream_in(self, request: dict[str, Any]) -> dict[str, Any]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        slot = int(request["slot"])
        with self._slots_lock:
            self._feeds[slot] = write_end
        self._put_slot(slot, read_end)
        return {}

    def op_feed(self, request: dict[str, Any]) -> dict[str, Any]:
        slot = int(request["slot"])
        with self._slots_lock:
            write_end = self._feeds.pop(slot, None)
        if write_end is None:
            raise ServiceVMError(f"slot {slot} is not an input stream waiting for data")
        remaining = int(request["size_bytes"])
        copied = 0
        try:
            disk = os.open(find_disk(str(request["serial"])), os.O_RDONLY | os.O_CLOEXEC)
            try:
                while remaining:
                    chunk = os.pread(disk, min(COPY_CHUNK_BYTES, remaining), copied)
                    if not chunk:
                        raise ServiceVMError(
                            f"the stream disk of slot {slot} ended at byte {copied}, "
                            f"{remaining} bytes before the stream's end"
                        )
                    _write_all(write_end, memoryview(chunk))
                    copied += len(chunk)
                    remaining -= len(chunk)
            finally:
                os.close(disk)
        except BrokenPipeError:
            # The worker closed the slot because its request failed or was detached. The
            # request's own reply gives the cause.
            log.info("slot %d closed after %d bytes of its input stream", slot, copied)
        finally:
            os.close(write_end)
        return {"size_bytes": copied}

    def op_attach_stream_out(self, request: dict[str, Any]) -> dict[str, Any]:
        slot = int(request["slot"])
        disk = os.open(find_disk(str(request["serial"])), os.O_RDWR | os.O_CLOEXEC)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._put_slot(slot, write_end)
        threading.Thread(
            target=self._drain, args=(slot, read_end, disk), name=f"stream-out-{slot}", daemon=True
        ).start()
        return {}

    def _drain(self, slot: int, read_end: int, disk: int) -> None:
        """Copy the pipe of an output slot onto its disk, then tell the host the length."""
        written = 0
        error = None
        try:
            while chunk := os.read(read_end, COPY_CHUNK_BYTES):
                view = memoryview(chunk)
                while view:
                    count = os.pwrite(disk, view, written)
                    written += count
                    view = view[count:]
            os.fsync(disk)
        except OSError as err:
            error = f"failed to write output stream of slot {slot} at byte {written}: {err}"
            log.warning("%s", error)
        finally:
            os.close(read_end)
            os.close(disk)
        event = {"event": "stream_closed", "slot": slot, "size_bytes": written, "error": error}
        with self._send_lock:
            protocol.send(self.channel, event)

    def op_detach(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._slots_lock:
            write_end = self._feeds.pop(int(request["slot"]), None)
        if write_end is not None:
            os.close(write_end)
        return super().op_detach(request)


class _Relay:
    """Copy frames between the virtio-serial port and the worker's end of a socketpair."""

    def __init__(self, port: int, relay_end: socket.socket) -> None:
        self.port = port
        self.relay_end = relay_end

        self._output = threading.Thread(target=self._to_host, name="relay-out", daemon=True)

    def start(self) -> None:
        threading.Thread(target=self._from_host, name="relay-in", daemon=True).start()
        self._output.start()

    def flush(self, timeout_s: float) -> None:
        """Wait until the frames the worker sent, up to the closing of its end, are out."""
        self._output.join(timeout=timeout_s)

    def _from_host(self) -> None:
        # A port reads as empty until the host connects; after the first bytes, an empty
        # read means the host closed the channel.
        connected = False
        deadline = time.monotonic() + HOST_CONNECT_TIMEOUT_S
        try:
            while True:
                data = os.read(self.port, 1 << 16)
                if data:
                    connected = True
                    self.relay_end.sendall(data)
                elif connected or time.monotonic() >= deadline:
                    break
                else:
                    time.sleep(0.05)
        except OSError as err:
            log.warning("the channel from the host failed: %s", err)
        log.info("the host closed the channel")
        with contextlib.suppress(OSError):
            self.relay_end.shutdown(socket.SHUT_RDWR)

    def _to_host(self) -> None:
        try:
            while data := self.relay_end.recv(1 << 16):
                _write_all(self.port, memoryview(data))
        except OSError as err:
            log.warning("the channel to the host failed: %s", err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcow-guest-agent")
    parser.add_argument("--channel", required=True, help="the virtio-serial port's device node")
    parser.add_argument("--name", default="utility-vm")
    parser.add_argument("--log-level", default="WARNING")
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level,
        format=f"lcow guest {arguments.name}: %(levelname)s: %(message)s",
    )

    port = os.open(arguments.channel, os.O_RDWR | os.O_CLOEXEC)
    worker_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay = _Relay(port, relay_end)
    relay.start()
    worker = GuestWorker(worker_end, arguments.name)
    log.info("started on %s", arguments.channel)
    worker.run()

    # The reply to shutdown is still in the socketpair: let the relay send it first.
    worker_end.shutdown(socket.SHUT_WR)
    relay.flush(timeout_s=5.0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
