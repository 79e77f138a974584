#!/usr/bin/env bash
# Install lcow on Debian 12 (bookworm), as root: the Debian packages it runs, then lcow in a
# virtual environment, with the `lcow` command linked into a folder on PATH.
#
#   scripts/install.sh
#
# LCOW_VENV sets the virtual environment (default /opt/lcow) and LCOW_BIN the folder of the
# link (default /usr/local/bin). Run it again after updating the checkout.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/install.sh: run as root, because it installs Debian packages" >&2
  exit 1
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LCOW_VENV:-/opt/lcow}
bin=${LCOW_BIN:-/usr/local/bin}

# e2fsprogs: mke2fs for sandboxes and e2fsck to check images. libarchive13: the tar reader.
# qemu-utils: qemu-img, to inspect and convert VHD and VHDX disks. libseccomp2: the
# service VM workers' seccomp filter. util-linux: unshare, losetup and fsfreeze.
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 -q update
apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends \
  e2fsprogs libarchive13 libseccomp2 util-linux qemu-utils python3-venv \
  gcc libc6-dev python3-dev

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$repo"

mkdir -p "$bin"
ln -sf "$venv/bin/lcow" "$bin/lcow"
echo "installed lcow in $venv; command: $bin/lcow"
