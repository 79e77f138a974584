"""The ``lcow`` command."""

from __future__ import annotations

import importlib
import io
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import click

from lcow import __version__
from lcow.errors import LcowError
from lcow.ext4.format import EXT4_ROOT_INO
from lcow.ext4.writer import DEFAULT_MAX_SIZE_BYTES
from lcow.layer.tar2ext4 import atomic_output, convert_tar
from lcow.layer.tarstream import SOURCE_BUFFER_BYTES
from lcow.options import command_options, parse_size
from lcow.progress import ProgressBar, byte_bar

if TYPE_CHECKING:
    from lcow.driver import Driver
    from lcow.ext4.reader import Ext4Reader

log = logging.getLogger(__name__)

# The modules that define the other subcommands, by command name. The root group imports a
# module when one of its commands runs, so that tar2vhd and vhd2tar load neither the
# driver with its service VM backends nor the plugin server.
SUBCOMMAND_MODULES: Final = {
    **dict.fromkeys(
        (
            "create",
            "create-rw",
            "remove",
            "exists",
            "get",
            "put",
            "status",
            "metadata",
            "cleanup",
            "apply-diff",
            "diff",
            "changes",
            "diff-size",
            "ls",
            "serve",
        ),
        "lcow.cli_driver",
    ),
    "image": "lcow.cli_image",
    "vm": "lcow.cli_vm",
}


class _CountingReader(io.RawIOBase):
    """Pass reads through and report how many bytes each one returned."""

    def __init__(self, raw: IO[bytes], progress: ProgressBar) -> None:
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self._progress.update(count)
        return int(count or 0)


@dataclass
class CliContext:
    """The settings of ``lcow``'s own options, shared by every subcommand (``ctx.obj``)."""

    root: Path | None
    storage_opts: tuple[str, ...]
    json_output: bool
    _driver: Driver | None = None

    def driver(self, *, spares: bool = False) -> Driver:
        """Open the store once per command (Init), with the root and storage options.

        Without ``spares``, the store starts no spare service VMs: most commands are one
        operation, which no spare serves. The user's own lcow.prestart wins.
        """
        if self._driver is None:
            from lcow.driver import Driver  # noqa: PLC0415 - see SUBCOMMAND_MODULES

            options = command_options(self.storage_opts, spares=spares)
            try:
                self._driver = Driver(self.root, options)
            except (LcowError, OSError) as err:
                raise click.ClickException(f"failed to open the lcow store: {err}") from err
            # A command is one process: stop any service VM the command started, and remove
            # its scratch disk, before the process exits.
            context = click.get_current_context(silent=True)
            if context is not None:
                context.find_root().call_on_close(self._driver.service_vms.terminate_all)
        return self._driver


class _RootGroup(click.Group):
    """The ``lcow`` group, which imports a subcommand's module when the command is needed."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = SUBCOMMAND_MODULES.get(cmd_name)
        if module is not None:
            importlib.import_module(module)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        for module in sorted(set(SUBCOMMAND_MODULES.values())):
            importlib.import_module(module)
        return super().list_commands(ctx)


@click.group(cls=_RootGroup)
@click.version_option(__version__, prog_name="lcow")
@click.option("-v", "--verbose", count=True, help="Log more; repeat for debug output.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LCOW_ROOT",
    help="Data root of the store (default /var/lib/lcow as root, else $XDG_DATA_HOME/lcow).",
)
@click.option(
    "--storage-opt",
    "storage_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Driver option, as dockerd's --storage-opt (lcow.globalmode=true); repeatable.",
)
@click.option("--json", "json_output", is_flag=True, help="Print results as JSON.")
@click.pass_context
def main(
    ctx: click.Context,
    verbose: int,
    root: Path | None,
    storage_opts: tuple[str, ...],
    json_output: bool,
) -> None:
    """Layer store for Linux containers in lightweight VMs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="lcow: %(levelname)s: %(message)s")
    ctx.obj = CliContext(root, storage_opts, json_output)
    ctx.call_on_close(lambda: _close_driver(ctx.obj))


def _close_driver(context: CliContext) -> None:
    # Each command is one process: stop its service VMs, keep the layers.
    if context._driver is not None:
        context._driver.service_vms.terminate_all()


@main.command("tar2vhd")
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("output", type=click.Path(dir_okay=False, writable=True))
@click.option("--raw", is_flag=True, help="Write the ext4 image without the fixed-VHD footer.")
@click.option(
    "--max-size",
    default=str(DEFAULT_MAX_SIZE_BYTES),
    show_default=True,
    help="Largest image to build, in bytes or with a K, M, G, T suffix.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (default: when stderr is a terminal).",
)
def tar2vhd(source: str, output: str, raw: bool, max_size: str, progress: bool | None) -> None:
    """Convert the tar layer SOURCE (plain, gzip or zstd; - for stdin) to a layer image.

    OUTPUT is an ext4 filesystem followed by a 512-byte fixed-VHD footer, or the bare ext4
    with --raw. OUTPUT appears only when the conversion succeeds.
    """
    try:
        max_size_bytes = parse_size(max_size)
    except LcowError as err:
        raise click.BadParameter(str(err), param_hint="--max-size") from err
    show_progress = sys.stderr.isatty() if progress is None else progress
    total = None
    if source != "-":
        try:
            info = os.stat(source)
        except OSError as err:
            raise click.ClickException(f"failed to open layer {source}: {err.strerror}") from err
        if stat.S_ISREG(info.st_mode):
            total = info.st_size

    bar = byte_bar(Path(source).name if source != "-" else "stdin", total, enabled=show_progress)
    try:
        raw_input = sys.stdin.buffer if source == "-" else open(source, "rb", buffering=0)  # noqa: SIM115
        with bar, raw_input:
            counted = io.BufferedReader(
                _CountingReader(raw_input, bar), buffer_size=SOURCE_BUFFER_BYTES
            )
            stats = convert_tar(counted, output, vhd_footer=not raw, max_size_bytes=max_size_bytes)
    except LcowError as err:
        raise click.ClickException(f"failed to convert {source}: {err}") from err
    except OSError as err:
        raise click.ClickException(f"failed to convert {source}: {err}") from err

    log.info(
        "wrote %s: %d entries, %d bytes of ext4 from %d bytes of tar (%s)",
        output,
        stats.entries,
        stats.image_size_bytes,
        stats.tar_bytes,
        stats.compression,
    )


SANDBOX_DIRECTORIES = frozenset({b"upper", b"work", b"lost+found"})


def _is_sandbox(reader: Ext4Reader) -> bool:
    """Tell whether the filesystem's root is a sandbox's: ``upper/`` and ``work/`` only."""
    names = {name for name, _, _ in reader.iterdir(EXT4_ROOT_INO)}
    return b"upper" in names and b"work" in names and names <= SANDBOX_DIRECTORIES


@main.command("vhd2tar")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--sandbox/--layer",
    default=None,
    help="Export the sandbox's upper/ directory, or the whole filesystem of a layer "
    "(default: a sandbox when the root holds only upper/ and work/).",
)
def vhd2tar(image: str, output: str, sandbox: bool | None) -> None:
    """Export the layer image or sandbox IMAGE (raw, VHD or VHDX) as a tar layer.

    Whiteouts become .wh. entries and opaque directories get a .wh..wh..opq entry, as
    Docker's Diff returns them. OUTPUT may be - for stdout; a file appears only when the
    export succeeds.
    """
    # Imported here, so that tar2vhd, which reads no image, loads neither VHDX nor the reader.
    from lcow.disk import open_disk  # noqa: PLC0415
    from lcow.ext4.reader import Ext4Reader  # noqa: PLC0415
    from lcow.layer.export import export_tar  # noqa: PLC0415

    try:
        with open_disk(image) as disk:
            reader = Ext4Reader(disk.device, disk.size_bytes)
            as_sandbox = _is_sandbox(reader) if sandbox is None else sandbox
            subdirectory = b"upper" if as_sandbox else None
            if output == "-":
                export_tar(reader, sys.stdout.buffer, subdirectory=subdirectory)
                return
            with atomic_output(Path(output)) as stream:
                export_tar(reader, stream, subdirectory=subdirectory)
    except (LcowError, OSError) as err:
        raise click.ClickException(f"failed to export {image}: {err}") from err
