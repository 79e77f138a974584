"""dockerd drives ``lcow serve`` as its graph-driver plugin, in host mount mode.

Each daemon is Debian's dockerd (docker.io 20.10) started by hand with its data root, exec
root, socket and trust key in a test folder, and ``--storage-driver`` naming the plugin
through a spec file in /etc/docker/plugins. The plugin runs with ``lcow.hostmount=true``,
because runc needs a real root filesystem from Get. Images come only from ``docker load`` of
archives built here from Debian's busybox-static. Every docker command that could pull
passes ``--pull never``, and the daemon has no bridge, so nothing reaches the network.

The tests need root, dockerd, the docker CLI and a statically linked /bin/busybox. Without
them they skip, and in CI (``CI`` set) they fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

import pytest

import tarbuild
from hoststate import (
    DETACH_TIMEOUT_S,
    loop_devices_backed_by,
    mount_points_below,
    processes_naming,
    release_loop_devices_backed_by,
    release_mounts_below,
    run_folder,
    settle,
    wait_until,
)
from oracle import find_tool, skip_or_fail

pytestmark = pytest.mark.root

log = logging.getLogger(__name__)

PLUGIN_SPEC_FOLDER: Final = Path("/etc/docker/plugins")
# Folders that dockerd and its containerd create outside the test folder when they are
# missing: the plugin socket folder and the folder of containerd's shim sockets.
DAEMON_RUN_FOLDERS: Final = (
    Path("/run/docker"),
    Path("/run/docker/plugins"),
    Path("/run/containerd"),
    Path("/run/containerd/s"),
)

PLUGIN_START_TIMEOUT_S: Final = 30.0
DAEMON_START_TIMEOUT_S: Final = 60.0
COMMAND_TIMEOUT_S: Final = 120.0
# dockerd stops running containers first, each within its stop timeout, and then sends
# Cleanup to the plugin. The rest is a margin for a loaded host.
STOP_TIMEOUT_S: Final = 60.0
PROCESS_EXIT_TIMEOUT_S: Final = 30.0
INFO_TIMEOUT_S: Final = 10.0  # one `docker info` while the daemon starts
REMOVE_TIMEOUT_S: Final = 10.0  # from a failed docker load until the layer must be gone
LOG_TAIL_LINES: Final = 40

BUSYBOX_APPLETS: Final = ("sh", "echo", "cat", "ls", "rm", "chmod", "stat", "test", "sleep")
PASSWD: Final = b"root:x:0:0:root:/root:/bin/sh\n"
HELLO: Final = b"hello\n"
IMAGE_TAG: Final = "lcowtest/busybox:1"
# For every docker run and create: use local images only, and give containers no network.
OFFLINE: Final = ("--pull", "never", "--network", "none")
CORRUPT_TAG: Final = "lcowtest/corrupt:1"

# The container of the change tests adds, deletes and modifies one file each.
WRITER_SCRIPT: Final = "echo new > /data/new.txt; rm /data/hello.txt; chmod 600 /etc/passwd"
# `docker diff` lists the container layer's changes against its -init layer, which contains
# the files dockerd writes itself (such as /.dockerenv and /etc/hosts), so none of those
# appear. Docker lists a folder as changed when something in it changed, hence /data, /etc.
WRITER_CHANGES: Final = (
    "C /data",
    "A /data/new.txt",
    "D /data/hello.txt",
    "C /etc",
    "C /etc/passwd",
)
# What the committed image shows: the new file, the deleted file gone, the new mode.
CHECK_SCRIPT: Final = (
    "cat /data/new.txt; test -e /data/hello.txt || echo deleted; stat -c %a /etc/passwd"
)

ELF_MAGIC: Final = b"\x7fELF"
PT_INTERP: Final = 3  # the program header that names a dynamic loader
GO_ARCHITECTURES: Final = {"x86_64": "amd64", "aarch64": "arm64"}


# --- tools and inputs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tools:
    """The programs the tests run: dockerd, its docker CLI, lcow and a static busybox."""

    dockerd: str
    docker: str
    lcow: str
    busybox: Path


def is_static_elf(path: Path) -> bool:
    """Tell whether ``path`` is a 64-bit little-endian ELF without a dynamic loader."""
    with path.open("rb") as file:
        header = file.read(64)
        if header[:4] != ELF_MAGIC or header[4] != 2 or header[5] != 1:
            return False
        (program_headers,) = struct.unpack_from("<Q", header, 0x20)
        entry_size, entry_count = struct.unpack_from("<HH", header, 0x36)
        file.seek(program_headers)
        table = file.read(entry_size * entry_count)
    return all(
        struct.unpack_from("<I", table, index * entry_size)[0] != PT_INTERP
        for index in range(entry_count)
    )


def find_tools() -> Tools:
    dockerd = find_tool("dockerd")
    if dockerd is None:
        skip_or_fail("dockerd not found; install Debian's docker.io")
    # The CLI from dockerd's package matches its API version, and a docker elsewhere on PATH
    # may be another release. Debian's docker.io installs /usr/sbin/dockerd, /usr/bin/docker.
    candidates = [Path(dockerd).with_name("docker"), Path("/usr/bin/docker")]
    docker = next((str(path) for path in candidates if path.exists()), find_tool("docker"))
    if docker is None:
        skip_or_fail("the docker CLI was not found; install Debian's docker.io")
    lcow = shutil.which("lcow", path=str(Path(sys.executable).parent))
    if lcow is None:
        skip_or_fail(f"the lcow command is missing next to {sys.executable}; pip install -e .")
    busybox = Path("/bin/busybox")
    if not busybox.exists() or not is_static_elf(busybox):
        skip_or_fail("no statically linked /bin/busybox; install Debian's busybox-static")
    return Tools(dockerd, docker, lcow, busybox)


def busybox_layer(busybox: Path, marker: bytes = b"") -> bytes:
    """Return a layer tar with busybox, a few applet links, /etc/passwd and /data/hello.txt.

    A ``marker`` becomes the file /marker, which gives the layer a digest of its own, because
    docker load skips a layer whose digest the daemon has already.
    """
    members = [
        tarbuild.directory("bin"),
        tarbuild.regular("bin/busybox", busybox.read_bytes(), mode=0o755),
        *(tarbuild.symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        tarbuild.directory("etc"),
        tarbuild.regular("etc/passwd", PASSWD),
        tarbuild.directory("data"),
        tarbuild.regular("data/hello.txt", HELLO),
        tarbuild.directory("tmp", mode=0o1777),
    ]
    if marker:
        members.append(tarbuild.regular("marker", marker))
    return tarbuild.tar_bytes(members)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def save_archive(layer: bytes, diff_id: str, tag: str) -> bytes:
    """Return a docker-save archive of a one-layer image: config, layer tar and manifest.

    ``diff_id`` is the digest that the config states. A test that cuts ``layer`` passes the
    digest of the whole layer, as a truncated download would have.
    """
    config = {
        "architecture": GO_ARCHITECTURES.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/test_docker_plugin.py"}],
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = hashlib.sha256(layer).hexdigest() + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]
    members = [
        tarbuild.regular(config_name, config_bytes),
        tarbuild.regular(layer_name, layer),
        tarbuild.regular("manifest.json", json.dumps(manifest).encode()),
    ]
    return tarbuild.tar_bytes(members)


# --- the daemon and the plugin -------------------------------------------------------------


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process(process: subprocess.Popen[bytes], name: str, timeout_s: float) -> int:
    """Send SIGTERM, wait up to ``timeout_s``, then send SIGKILL. Return the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM for %s s; killing it", name, process.pid, timeout_s
            )
            process.kill()
    return process.wait(timeout=PROCESS_EXIT_TIMEOUT_S)


class Daemon:
    """One dockerd and one ``lcow serve``, linked by a spec file, all kept in ``folder``.

    ``start`` starts both and waits until dockerd responds. ``close`` stops whatever still
    runs and removes what they left, also after a failed test.
    """

    def __init__(self, folder: Path, tools: Tools) -> None:
        self.folder = folder
        self.tools = tools
        self.name = f"lcowtest{secrets.token_hex(4)}"
        self.plugin_socket = folder / "lcow.sock"
        self.daemon_socket = folder / "docker.sock"
        self.spec = PLUGIN_SPEC_FOLDER / f"{self.name}.spec"
        self.data_root = folder / "docker" / self.name  # dockerd's Init sends this Home
        self.plugin_log = folder / "lcow.log"
        self.daemon_log = folder / "dockerd.log"
        self.plugin: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self._created_folders: list[Path] = []
        self._log_files: list[IO[bytes]] = []
        self.environment = {
            key: value for key, value in os.environ.items() if not key.startswith("DOCKER_")
        }
        self.environment["DOCKER_HOST"] = f"unix://{self.daemon_socket}"
        self.environment["DOCKER_CONFIG"] = str(folder / "cli-config")

    def __repr__(self) -> str:
        return f"Daemon({self.name!r}, folder={str(self.folder)!r})"

    @property
    def run_folder(self) -> Path:
        return run_folder(self.data_root)

    def logs(self) -> str:
        return (
            f"--- {self.plugin_log} ---\n{tail(self.plugin_log)}\n"
            f"--- {self.daemon_log} ---\n{tail(self.daemon_log)}"
        )

    def _open_log(self, path: Path) -> IO[bytes]:
        file = path.open("ab")
        self._log_files.append(file)
        return file

    # Start ------------------------------------------------------------------------------

    def start(self) -> None:
        self._start_plugin()
        self._write_spec()
        self._start_daemon()

    def _start_plugin(self) -> None:
        self.plugin = subprocess.Popen(
            [
                self.tools.lcow,
                "-v",
                "--storage-opt",
                "lcow.hostmount=true",
                "serve",
                "--socket",
                str(self.plugin_socket),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._open_log(self.plugin_log),
            stderr=subprocess.STDOUT,
            env=self.environment,
        )
        plugin = self.plugin
        listening = wait_until(
            lambda: self.plugin_socket.exists() or plugin.poll() is not None,
            PLUGIN_START_TIMEOUT_S,
        )
        if not listening or plugin.poll() is not None:
            pytest.fail(f"lcow serve did not listen on {self.plugin_socket}\n{self.logs()}")

    def _write_spec(self) -> None:
        for folder in (PLUGIN_SPEC_FOLDER.parent, PLUGIN_SPEC_FOLDER, *DAEMON_RUN_FOLDERS):
            if not folder.exists():
                self._created_folders.append(folder)
        PLUGIN_SPEC_FOLDER.mkdir(parents=True, exist_ok=True)
        self.spec.write_text(f"unix://{self.plugin_socket}\n")

    def _start_daemon(self) -> None:
        config = self.folder / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.folder / "key.json")}))
        self.daemon = subprocess.Popen(
            [
                self.tools.dockerd,
                "--data-root",
                str(self.folder / "docker"),
                "--exec-root",
                str(self.folder / "exec"),
                "--host",
                f"unix://{self.daemon_socket}",
                "--pidfile",
                str(self.folder / "docker.pid"),
                "--config-file",
                str(config),
                "--experimental",
                "--storage-driver",
                self.name,
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._open_log(self.daemon_log),
            stderr=subprocess.STDOUT,
            env=self.environment,
        )
        daemon = self.daemon
        answered = wait_until(
            lambda: daemon.poll() is not None or self.is_ready(), DAEMON_START_TIMEOUT_S
        )
        if not answered or daemon.poll() is not None:
            pytest.fail(f"dockerd did not respond on {self.daemon_socket}\n{self.logs()}")

    def is_ready(self) -> bool:
        """Tell whether ``docker info`` succeeds against this daemon."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            result = subprocess.run(
                [self.tools.docker, "info"],
                capture_output=True,
                env=self.environment,
                timeout=INFO_TIMEOUT_S,
                check=False,
            )
            return result.returncode == 0
        return False

    # Commands ---------------------------------------------------------------------------

    def docker(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon, and fail the test if it fails and ``check``."""
        result = subprocess.run(
            [self.tools.docker, *arguments],
            capture_output=True,
            text=True,
            errors="replace",
            env=self.environment,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"docker {' '.join(arguments)} exited with status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.logs()}"
            )
        return result

    def load(self, archive: bytes, name: str) -> subprocess.CompletedProcess[str]:
        path = self.folder / name
        path.write_bytes(archive)
        return self.docker("load", "--input", str(path), check=False)

    def layer_folders(self) -> list[str]:
        """List the layer folders in the plugin's data root (not cache/ and scratch/)."""
        return sorted(
            entry.name
            for entry in self.data_root.iterdir()
            if entry.is_dir() and entry.name not in ("cache", "scratch")
        )

    def plugin_warnings(self) -> str:
        """Return the warnings and errors that the plugin logged, one a line."""
        lines = self.plugin_log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if ": WARNING: " in line or ": ERROR: " in line)

    def cleanup_calls(self) -> int:
        """Count the Cleanup requests that the plugin logged."""
        lines = self.plugin_log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if line.endswith("INFO: Cleanup"))

    # Stop -------------------------------------------------------------------------------

    def stop_daemon(self) -> int:
        assert self.daemon is not None
        return stop_process(self.daemon, "dockerd", STOP_TIMEOUT_S)

    def stop_plugin(self) -> int:
        assert self.plugin is not None
        return stop_process(self.plugin, "lcow serve", STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop both processes and remove the spec file and whatever else they left."""
        try:
            if self.daemon is not None:
                self.stop_daemon()
            if self.plugin is not None:
                self.stop_plugin()
        finally:
            self.spec.unlink(missing_ok=True)
            for leftover in processes_naming(f"{self.folder}/"):
                pid = int(leftover.split(":", 1)[0])
                log.warning("killing %s, left by %r", leftover, self)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            release_mounts_below(self.run_folder)
            release_mounts_below(self.folder)
            release_loop_devices_backed_by(self.folder)
            for folder in reversed(self._created_folders):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while empty: another daemon may use it by now
            for file in self._log_files:
                file.close()


@contextlib.contextmanager
def running_daemon(folder: Path, tools: Tools) -> Iterator[Daemon]:
    daemon = Daemon(folder, tools)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def tools() -> Tools:
    return find_tools()


@pytest.fixture(scope="module")
def daemon(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon shared by the tests that leave it as they found it."""
    with running_daemon(tmp_path_factory.mktemp("docker"), tools) as started:
        yield started


@dataclasses.dataclass(frozen=True)
class Image:
    tag: str
    layer_diff_id: str


@pytest.fixture(scope="module")
def image(daemon: Daemon) -> Image:
    """The busybox image, loaded into the shared daemon from a docker-save archive."""
    layer = busybox_layer(daemon.tools.busybox)
    diff_id = sha256_digest(layer)
    result = daemon.load(save_archive(layer, diff_id, IMAGE_TAG), "busybox.tar")
    if result.returncode != 0:
        pytest.fail(f"docker load failed:\n{result.stdout}{result.stderr}\n{daemon.logs()}")
    return Image(IMAGE_TAG, diff_id)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def writer_container(daemon: Daemon, image: Image) -> Iterator[str]:
    """Run the container that adds, deletes and modifies a file; remove it afterwards."""
    name = unique_name("writer")
    try:
        daemon.docker("run", *OFFLINE, "--name", name, image.tag, "sh", "-c", WRITER_SCRIPT)
        yield name
    finally:
        daemon.docker("rm", "--force", name, check=False)


@contextlib.contextmanager
def committed_image(daemon: Daemon, image: Image) -> Iterator[str]:
    """Commit the writer container as a new image; remove both afterwards."""
    tag = f"lcowtest/{unique_name('committed')}:1"
    with writer_container(daemon, image) as container:
        daemon.docker("commit", container, tag)
        try:
            yield tag
        finally:
            daemon.docker("rmi", tag, check=False)


# --- tests ---------------------------------------------------------------------------------


def test_info_names_plugin(daemon: Daemon) -> None:
    info = json.loads(daemon.docker("info", "--format", "{{json .}}").stdout)
    status = dict(info["DriverStatus"])

    assert info["Driver"] == daemon.name
    assert status["Root"] == str(daemon.data_root)
    assert status["Sandbox format"] == "raw"


def test_run_prints_hello(daemon: Daemon, image: Image) -> None:
    result = daemon.docker("run", "--rm", *OFFLINE, image.tag, "echo", "hello")

    assert result.stdout == "hello\n"


def test_diff_lists_changes(daemon: Daemon, image: Image) -> None:
    with writer_container(daemon, image) as container:
        lines = daemon.docker("diff", container).stdout.splitlines()

    assert sorted(lines) == sorted(WRITER_CHANGES)


def test_commit_keeps_changes(daemon: Daemon, image: Image) -> None:
    with committed_image(daemon, image) as tag:
        result = daemon.docker("run", "--rm", *OFFLINE, tag, "sh", "-c", CHECK_SCRIPT)

    new_file, deleted, permissions = result.stdout.splitlines()
    assert new_file == "new"
    assert deleted == "deleted"
    assert permissions == "600"


def test_save_digests_verify(daemon: Daemon, image: Image) -> None:
    """docker save reads each layer through Get, so its tar must hash to the config's diff id."""
    archive = daemon.folder / f"{unique_name('saved')}.tar"
    with committed_image(daemon, image) as tag:
        daemon.docker("save", "--output", str(archive), tag)

    with tarfile.open(archive) as saved:
        manifest = json.loads(read_member(saved, "manifest.json"))[0]
        config = json.loads(read_member(saved, manifest["Config"]))
        digests = [sha256_digest(read_member(saved, name)) for name in manifest["Layers"]]

    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == 2
    assert digests == diff_ids
    assert diff_ids[0] == image.layer_diff_id


def read_member(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    assert member is not None, f"{name} is not a file in the saved archive"
    return member.read()


def test_rm_rmi_removes_layers(daemon: Daemon, image: Image) -> None:
    container = unique_name("writer")
    tag = f"lcowtest/{unique_name('committed')}:1"
    before = daemon.layer_folders()
    daemon.docker("run", *OFFLINE, "--name", container, image.tag, "sh", "-c", WRITER_SCRIPT)
    daemon.docker("commit", container, tag)
    during = daemon.layer_folders()

    daemon.docker("rm", container)
    daemon.docker("rmi", tag)

    # The container's layer, its -init layer and the committed layer.
    assert len(during) == len(before) + 3
    assert daemon.layer_folders() == before


def test_corrupt_load_leaves_nothing(daemon: Daemon, tools: Tools) -> None:
    """A docker-save archive whose layer tar is cut in the middle loads nothing."""
    layer = busybox_layer(tools.busybox, marker=b"a layer that is cut\n")
    cut = layer[: len(layer) // 2]  # inside busybox's data
    archive = save_archive(cut, sha256_digest(layer), CORRUPT_TAG)
    before = daemon.layer_folders()

    result = daemon.load(archive, "corrupt.tar")

    assert result.returncode != 0
    # dockerd's tar reader stops at the cut, which aborts the ApplyDiff upload. Its plugin
    # client retries the upload and then reports the last error with the call's URL.
    assert "GraphDriver.ApplyDiff" in result.stderr
    assert daemon.docker("image", "ls", "--quiet", CORRUPT_TAG).stdout == ""

    # dockerd sends Remove for the layer once the load has failed, and this waits for it.
    after = settle(daemon.layer_folders, before, REMOVE_TIMEOUT_S)
    assert after == before, daemon.plugin_warnings()


def test_stop_cleans_up(tools: Tools, tmp_path: Path) -> None:
    """Stopping dockerd calls Cleanup, and then no mount, loop device or process remains."""
    with running_daemon(tmp_path, tools) as daemon:
        layer = busybox_layer(tools.busybox)
        loaded = daemon.load(save_archive(layer, sha256_digest(layer), IMAGE_TAG), "busybox.tar")
        assert loaded.returncode == 0, loaded.stderr
        daemon.docker("run", "--detach", "--stop-timeout", "1", *OFFLINE, IMAGE_TAG, "sleep", "600")
        daemon.docker("create", *OFFLINE, IMAGE_TAG, "true")
        assert mount_points_below(daemon.run_folder) != []  # the running container's root
        cleanups = daemon.cleanup_calls()

        daemon_status = daemon.stop_daemon()

        assert daemon_status == 0
        assert daemon.cleanup_calls() == cleanups + 1
        assert mount_points_below(daemon.run_folder) == []
        assert mount_points_below(tmp_path) == []
        assert settle(lambda: loop_devices_backed_by(tmp_path), [], DETACH_TIMEOUT_S) == []

        plugin_status = daemon.stop_plugin()

        assert plugin_status == 0
        assert settle(lambda: processes_naming(f"{tmp_path}/"), [], PROCESS_EXIT_TIMEOUT_S) == []
