"""``lcow vm``: build the utility VM that the qemu backend boots."""

from pathlib import Path

import click

from lcow.cli import main
from lcow.errors import LcowError
from lcow.servicevm import vmbuild


@main.group("vm")
def vm() -> None:
    """Manage the qemu backend's utility VM."""


@vm.command("build")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def build(folder: Path) -> None:
    """Build the utility VM's kernel and initrd into FOLDER from Debian packages.

    Needs apt-get (the kernel and busybox are downloaded, never installed), dpkg, depmod
    (kmod), ldd, mke2fs and libarchive on this host. Point lcow.kirdpath at FOLDER.
    """
    try:
        report = vmbuild.build(folder)
    except (LcowError, OSError) as err:
        raise click.ClickException(f"failed to build the utility VM in {folder}: {err}") from err
    click.echo(
        f"built {folder}: kernel {report.kernel_version} ({report.kernel_bytes} bytes), "
        f"initrd {report.initrd_bytes} bytes ({report.initrd_unpacked_bytes} unpacked, "
        f"{report.initrd_files} files), Python {report.python_version}"
    )
