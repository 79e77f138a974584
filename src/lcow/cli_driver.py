"""``lcow`` subcommands, one per graph-driver method, plus ``ls``.

Each command opens the store (Init) with ``--root`` and ``--storage-opt``, runs one method
and prints its result: plain text by default, JSON with ``--json``. Errors print one line
and exit with status 1, as docker's commands do; ``exists`` exits 1 when the layer is
missing. References taken by ``get`` last as long as the command, because Docker's
reference counts belong to the process that holds them.
"""

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lcow.cli import CliContext, main
from lcow.errors import LcowError
from lcow.layer.tar2ext4 import atomic_output
from lcow.plugin import DEFAULT_SOCKET

log = logging.getLogger(__name__)

CHANGE_LETTERS = {0: "C", 1: "A", 2: "D"}  # as `docker diff` prints kinds
Result = TypeVar("Result")


def _run(context: CliContext, action: str, call: Callable[[], Result]) -> Result:
    try:
        return call()
    except (LcowError, OSError) as err:
        # lcow's own messages already read "failed to <verb> <object> <id>: <cause>".
        message = str(err) if str(err).startswith("failed to ") else f"failed to {action}: {err}"
        raise click.ClickException(message) from err


def _print(context: CliContext, value: Any, text: str) -> None:
    click.echo(json.dumps(value) if context.json_output else text)


@main.command("create")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.pass_obj
def create(context: CliContext, layer_id: str, parent: str | None) -> None:
    """Create the empty read-only layer LAYER_ID on PARENT."""
    driver = context.driver()
    _run(context, f"create layer {layer_id}", lambda: driver.create(layer_id, parent))


@main.command("create-rw")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.option("--size", help="Sandbox size with a K, M, G or T suffix (default lcow.sandboxsize).")
@click.pass_obj
def create_rw(context: CliContext, layer_id: str, parent: str | None, size: str | None) -> None:
    """Create the layer LAYER_ID on PARENT with a blank sandbox."""
    driver = context.driver()
    storage_opt = {"size": size} if size else None
    _run(
        context,
        f"create sandbox layer {layer_id}",
        lambda: driver.create_read_write(layer_id, parent, storage_opt),
    )


@main.command("remove")
@click.argument("layer_id")
@click.pass_obj
def remove(context: CliContext, layer_id: str) -> None:
    """Remove LAYER_ID; a layer that does not exist is no error."""
    driver = context.driver()
    _run(context, f"remove layer {layer_id}", lambda: driver.remove(layer_id))


@main.command("exists")
@click.argument("layer_id")
@click.pass_obj
def exists(context: CliContext, layer_id: str) -> None:
    """Print whether LAYER_ID exists; exit 1 when it does not."""
    found = context.driver().exists(layer_id)
    _print(context, found, "true" if found else "false")
    if not found:
        sys.exit(1)


@main.command("get")
@click.argument("layer_id")
@click.pass_obj
def get(context: CliContext, layer_id: str) -> None:
    """Print the folder of LAYER_ID."""
    driver = context.driver()
    path = _run(context, f"get layer {layer_id}", lambda: driver.get(layer_id))
    _print(context, {"Dir": path}, path)
    driver.put(layer_id)


@main.command("put")
@click.argument("layer_id")
@click.pass_obj
def put(context: CliContext, layer_id: str) -> None:
    """Release a reference to LAYER_ID (references live only as long as their process)."""
    driver = context.driver()
    _run(context, f"put layer {layer_id}", lambda: driver.put(layer_id))


@main.command("status")
@click.pass_obj
def status(context: CliContext) -> None:
    """Print the store's status: backend, mode, root, layer count, sandbox, versions."""
    pairs = context.driver().status()
    width = max(len(key) for key, _ in pairs)
    _print(context, pairs, "\n".join(f"{key:<{width}}  {value}" for key, value in pairs))


@main.command("metadata")
@click.argument("layer_id")
@click.pass_obj
def metadata(context: CliContext, layer_id: str) -> None:
    """Print the metadata of LAYER_ID (Docker's GetMetadata)."""
    driver = context.driver()
    values = _run(
        context, f"read metadata of layer {layer_id}", lambda: driver.get_metadata(layer_id)
    )
    _print(context, values, "\n".join(f"{key}={value}" for key, value in values.items()))


@main.command("cleanup")
@click.pass_obj
def cleanup(context: CliContext) -> None:
    """Release leaked references, delete interrupted removals, stop service VMs."""
    driver = context.driver()
    _run(context, "clean up the store", driver.cleanup)


@main.command("apply-diff")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.option(
    "--input",
    "source",
    type=click.File("rb"),
    default="-",
    show_default=True,
    help="The tar layer (plain, gzip or zstd); - reads stdin.",
)
@click.pass_obj
def apply_diff(context: CliContext, layer_id: str, parent: str | None, source: Any) -> None:
    """Convert a tar layer into LAYER_ID's layer image; print the summed entry size."""
    driver = context.driver()
    size = _run(
        context,
        f"apply diff to layer {layer_id}",
        lambda: driver.apply_diff(layer_id, parent, source),
    )
    _print(context, {"Size": size}, str(size))


@main.command("diff")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.option(
    "--output",
    default="-",
    show_default=True,
    help="Where to write the tar; - writes stdout. A file appears only when complete.",
)
@click.pass_obj
def diff(context: CliContext, layer_id: str, parent: str | None, output: str) -> None:
    """Write LAYER_ID's changes against PARENT as a tar layer."""
    driver = context.driver()

    def export() -> None:
        if output == "-":
            driver.write_diff(layer_id, parent, sys.stdout.buffer)
            return
        with atomic_output(Path(output)) as file:
            driver.write_diff(layer_id, parent, file)

    _run(context, f"diff layer {layer_id}", export)


@main.command("changes")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.pass_obj
def changes(context: CliContext, layer_id: str, parent: str | None) -> None:
    """List LAYER_ID's changes against PARENT as `docker diff` does (A, C, D)."""
    driver = context.driver()
    found = _run(
        context, f"list changes of layer {layer_id}", lambda: driver.changes(layer_id, parent)
    )
    _print(
        context,
        [{"Path": path, "Kind": kind} for path, kind in found],
        "\n".join(f"{CHANGE_LETTERS[kind]} {path}" for path, kind in found),
    )


@main.command("diff-size")
@click.argument("layer_id")
@click.argument("parent", required=False)
@click.pass_obj
def diff_size(context: CliContext, layer_id: str, parent: str | None) -> None:
    """Print the bytes of LAYER_ID's added and modified files against PARENT."""
    driver = context.driver()
    size = _run(context, f"size layer {layer_id}", lambda: driver.diff_size(layer_id, parent))
    _print(context, {"Size": size}, str(size))


@main.command("ls")
@click.pass_obj
def list_layers(context: CliContext) -> None:
    """List the layers of the store with their kind and parent."""
    driver = context.driver()
    rows = []
    for layer_id in driver.layer_ids():
        metadata = driver.get_metadata(layer_id)
        kind = (
            "sandbox" if "Sandbox" in metadata else "layer" if "LayerImage" in metadata else "empty"
        )
        chain = driver.chain(layer_id)
        rows.append({"ID": layer_id, "Kind": kind, "Parent": chain[0].name if chain else ""})
    lines = [f"{row['ID']}  {row['Kind']}  {row['Parent']}".rstrip() for row in rows]
    _print(context, rows, "\n".join(lines))


@main.command("serve")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_SOCKET,
    show_default=True,
    help="Unix socket to listen on; dockerd finds it by name in /run/docker/plugins.",
)
@click.pass_obj
def serve(context: CliContext, socket_path: Path) -> None:
    """Serve the store to dockerd as the graph-driver plugin until SIGTERM or SIGINT.

    dockerd's Init chooses the data root (its Home); --storage-opt values given here
    come before the daemon's own --storage-opt values.
    """
    # Imported here: http.server and the plugin's handlers are of no use to other commands.
    from lcow.plugin.server import PluginServer, PluginState  # noqa: PLC0415

    logging.getLogger("lcow").setLevel(
        min(logging.getLogger("lcow").getEffectiveLevel(), logging.INFO)
    )
    state = PluginState(list(context.storage_opts))
    try:
        server = PluginServer(socket_path, state)
    except (LcowError, OSError) as err:
        raise click.ClickException(f"failed to listen on {socket_path}: {err}") from err

    def stop(signal_number: int, _frame: object) -> None:
        log.info("stopping on signal %d", signal_number)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving the lcow graph driver on %s", socket_path)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        log.info("stopped serving on %s", socket_path)
