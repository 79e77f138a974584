"""The ``lcow image`` commands: import an image, list the named images, remove one.

The group reads the data root and driver options from the root command's ``--root`` and
``--storage-opt``. Under ``lcow`` the shared context (``ctx.obj``) opens the store; under
another root group that defines the same options, the store is opened here. Importing the
module adds the group to ``lcow``, whose root group imports it for ``lcow image``.
"""

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import click

from lcow.cli import main
from lcow.driver import Driver
from lcow.errors import LcowError
from lcow.image import ImageRecord, ImportResult, import_image, list_images, remove_image
from lcow.options import command_options
from lcow.progress import ProgressBar, byte_bar

Result = TypeVar("Result")

SHORT_ID_LENGTH = 12  # as `docker images` shortens ids


@runtime_checkable
class _StoreContext(Protocol):
    """The part of ``lcow``'s shared context that these commands use."""

    json_output: bool

    def driver(self, *, spares: bool = False) -> Driver: ...


def _driver(ctx: click.Context, *, spares: bool = False) -> Driver:
    """Open the store; ``spares`` keeps spare service VMs for a command of many operations."""
    if isinstance(ctx.obj, _StoreContext):
        return ctx.obj.driver(spares=spares)

    cached = ctx.meta.get("lcow.image.driver")
    if isinstance(cached, Driver):
        return cached
    params = ctx.find_root().params
    options = command_options(params.get("storage_opts") or (), spares=spares)
    try:
        driver = Driver(params.get("root"), options)
    except (LcowError, OSError) as err:
        raise click.ClickException(f"failed to open the lcow store: {err}") from err
    # Each command is one process: stop its service VMs when it ends, keep the layers.
    ctx.call_on_close(driver.service_vms.terminate_all)
    ctx.meta["lcow.image.driver"] = driver
    return driver


def _wants_json(ctx: click.Context, json_output: bool) -> bool:
    return json_output or (isinstance(ctx.obj, _StoreContext) and ctx.obj.json_output)


def _run(action: str, call: Callable[[], Result]) -> Result:
    try:
        return call()
    except (LcowError, OSError) as err:
        # lcow's own messages already read "failed to <verb> <object> <id>: <cause>".
        message = str(err) if str(err).startswith("failed to ") else f"failed to {action}: {err}"
        raise click.ClickException(message) from err


def _short(layer_id: str | None) -> str:
    return layer_id[:SHORT_ID_LENGTH] if layer_id else "-"


class _ProgressBars:
    """Draw one bar per import step on stderr; draw nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: ProgressBar | None = None

    def begin(self, description: str, total_bytes: int | None) -> None:
        self.close()
        self._bar = byte_bar(description, total_bytes, enabled=self._enabled)

    def advance(self, count_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(count_bytes)

    def end(self, outcome: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(outcome, refresh=False)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@click.group("image")
def image() -> None:
    """Import container images into the store, list them and remove them."""


@image.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("name", required=False)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar per layer (default: when stderr is a terminal).",
)
@click.option("--json", "json_output", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def import_command(
    ctx: click.Context, source: Path, name: str | None, progress: bool | None, json_output: bool
) -> None:
    """Import the image in SOURCE and name it NAME.

    SOURCE is a docker save archive, an OCI image layout (a folder or a tar of one) or a
    rootfs tarball (plain, gzip or zstd). NAME picks the image when SOURCE contains several
    (a tag of the archive, or the layout's ref name), and it is the name the image gets. By default
    the name is the archive's first tag, the layout's ref name, or else the config digest.
    Layers that the store has already are not converted again.
    """
    # Each layer is an ApplyDiff, so spares keep the next layer from waiting for a worker.
    driver = _driver(ctx, spares=True)
    show_progress = sys.stderr.isatty() if progress is None else progress
    bars = _ProgressBars(show_progress)
    try:
        result = _run(f"import {source}", lambda: import_image(driver, source, name, progress=bars))
    finally:
        bars.close()
    _print_import(result, _wants_json(ctx, json_output))


def _print_import(result: ImportResult, as_json: bool) -> None:
    record = result.image
    if as_json:
        document = {
            "name": record.name,
            **record.to_json(),
            "converted": list(result.converted),
            "present": list(result.present),
            "removed": list(result.removed),
        }
        click.echo(json.dumps(document))
        return
    layers = f"{len(record.layers)} layer{'' if len(record.layers) == 1 else 's'}"
    click.echo(
        f"imported {record.name}: {layers}, {len(result.converted)} converted, "
        f"{len(result.present)} present; top layer {_short(record.top)}"
    )
    for layer_id in result.removed:
        click.echo(f"removed layer {layer_id}, used only by the image {record.name} named before")


@image.command("ls")
@click.option("--json", "json_output", is_flag=True, help="Print the images as JSON.")
@click.pass_context
def list_command(ctx: click.Context, json_output: bool) -> None:
    """List the named images.

    Each row shows the name, the config digest, the layer count, the top layer and the
    creation time from the config.
    """
    driver = _driver(ctx)
    records = _run("list images", lambda: list_images(driver.root))
    if _wants_json(ctx, json_output):
        click.echo(json.dumps([{"name": record.name, **record.to_json()} for record in records]))
        return
    _print_table(records)


def _print_table(records: list[ImageRecord]) -> None:
    rows = [("NAME", "CONFIG", "LAYERS", "TOP LAYER", "CREATED")]
    for record in records:
        config_hex = record.config.partition(":")[2]
        rows.append(
            (
                record.name,
                config_hex[:SHORT_ID_LENGTH],
                str(len(record.layers)),
                _short(record.top),
                record.created or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))


@image.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--json", "json_output", is_flag=True, help="Print what was removed as JSON.")
@click.pass_context
def remove_command(ctx: click.Context, names: tuple[str, ...], json_output: bool) -> None:
    """Remove the image names NAMES and the layers no other image uses.

    Removing a name fails, and changes nothing, when a layer outside every image (such as
    a container's) has one of the image's unused layers as its parent.
    """
    driver = _driver(ctx)
    removed: list[dict[str, Any]] = []
    for name in names:
        layer_ids = _run(f"remove image {name}", functools.partial(remove_image, driver, name))
        removed.append({"name": name, "removed_layers": layer_ids})
        if not _wants_json(ctx, json_output):
            click.echo(f"removed image {name}")
            for layer_id in layer_ids:
                click.echo(f"removed layer {layer_id}")
    if _wants_json(ctx, json_output):
        click.echo(json.dumps(removed))


main.add_command(image)
