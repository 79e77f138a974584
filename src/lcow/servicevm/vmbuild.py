"""Build the qemu backend's utility VM: a Debian cloud kernel and an initrd that runs lcow.

``lcow vm build DIR`` writes ``DIR/vmlinuz``, ``DIR/initrd.img`` and ``DIR/manifest.json``.

- The kernel comes from the versioned package that ``linux-image-cloud-amd64`` depends on,
  fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a temporary folder,
  so nothing is installed into the host's /boot or /lib/modules.
- The initrd contains busybox (from ``busybox-static``), the virtio modules the kernel does
  not build in with the modules they depend on (``depmod`` writes modules.dep for the
  unpacked tree), mke2fs with /etc/mke2fs.conf, the Python runtime that runs lcow on this
  host with the extension modules and shared libraries it loads (found with ``ldd``),
  lcow's own package and the wheels it imports (isal, zstandard, crc32c, blake3).
  Host files keep their paths, so RPATHs, the dynamic loader and Python's prefix search
  work unchanged in the guest.
- lcow itself is the last of two concatenated cpio archives, so a newer lcow can be laid
  over an older initrd at boot (see :func:`lcow_archive`).

docs/qemu.md explains why the guest runs lcow's converter instead of the guest kernel's
ext4 and busybox tar.
"""

import contextlib
import hashlib
import json
import logging
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Final

import zstandard

import lcow
from lcow.errors import FailedPreconditionError
from lcow.servicevm import cpio

log = logging.getLogger(__name__)

KERNEL_PACKAGE: Final = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE: Final = "busybox-static"
# virtio_pci finds the devices, virtio_blk makes the hot-added disks, virtio_console the
# channel's virtio-serial port. Debian's cloud kernel builds all three as modules.
GUEST_MODULES: Final = ("virtio_pci", "virtio_blk", "virtio_console")
# Top-level packages of the guest's Python path: lcow and the wheels its converter imports.
GUEST_PACKAGES: Final = ("lcow", "isal", "zstandard", "crc32c", "blake3")
# Imported in the guest but not at import time of the agent, so the trace cannot see them.
LAZY_MODULES: Final = ("encodings",)
GUEST_SITE: Final = "opt/lcow/site"
KERNEL_NAME: Final = "vmlinuz"
INITRD_NAME: Final = "initrd.img"
MANIFEST_NAME: Final = "manifest.json"
ZSTD_LEVEL: Final = 10  # level 19 is 8 times slower to build and saves about a tenth
DIRECTORY_MODE: Final = stat.S_IFDIR | 0o755

# Printed by the traced interpreter: what the guest agent imports and where it lives. The
# guest's packages are also located by name (argv[1]), without running their __init__,
# because lcow.crc loads the crc32c package's compiled module alone.
_TRACE_SCRIPT: Final = """
import importlib, importlib.util, json, os, sys, sysconfig
import lcow.servicevm.guest.agent
for name in sys.argv[2:]:
    importlib.import_module(name)
specs = [importlib.util.find_spec(name) for name in sys.argv[1].split(",")]
with open("/proc/self/maps") as maps:
    libraries = sorted({line.split()[-1] for line in maps if ".so" in line.split()[-1]})
print(json.dumps({
    "executable": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
    "prefix": sys.base_prefix,
    "version": sys.version.split()[0],
    "stdlib": sysconfig.get_paths()["stdlib"],
    "modules": sorted({m.__file__ for m in list(sys.modules.values())
                       if getattr(m, "__file__", None)}),
    "packages": sorted(spec.origin for spec in specs if spec is not None and spec.origin),
    "libraries": libraries,
}))
"""


@dataclass(frozen=True, slots=True)
class BuildReport:
    """Summary of a build, written to the manifest and printed by ``lcow vm build``."""

    kernel_package: str
    kernel_version: str
    busybox_package: str
    python_version: str
    lcow_version: str
    lcow_digest: str
    guest_packages: list[str]
    modules: list[str]
    initrd_files: int
    initrd_unpacked_bytes: int
    initrd_bytes: int
    kernel_bytes: int


class InitrdTree:
    """The files of an initrd, keyed by path, laid out as on the host."""

    def __init__(self, strip: str | None = None) -> None:
        self.members: dict[PurePosixPath, cpio.Member] = {}
        self.strip = strip  # binutils' strip, to drop debug sections from ELF files

    def _read(self, path: Path) -> bytes:
        data = path.read_bytes()
        if self.strip is None or not data.startswith(b"\x7fELF"):
            return data
        with tempfile.TemporaryDirectory(prefix="lcow-strip-") as folder:
            stripped = Path(folder, path.name)
            _run([self.strip, "--strip-debug", "-o", str(stripped), str(path)], f"strip {path}")
            return stripped.read_bytes()

    def add_directory(self, path: PurePosixPath) -> None:
        for parent in [*reversed(path.parents[:-1]), path]:
            self.members.setdefault(parent, cpio.Member(str(parent), DIRECTORY_MODE))

    def add_data(self, path: PurePosixPath, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self.add_directory(path.parent)
        self.members[path] = cpio.Member(str(path), stat.S_IFREG | mode, data, mtime)

    def add_symlink(self, path: PurePosixPath, target: str) -> None:
        existing = self.members.get(path)
        if existing is not None and stat.S_ISDIR(existing.mode):
            raise FailedPreconditionError(
                f"failed to lay out the initrd: /{path} is a folder there and a symlink on "
                "this host; add host files before files of the initrd's own"
            )
        self.add_directory(path.parent)
        self.members[path] = cpio.Member(str(path), stat.S_IFLNK | 0o777, target.encode())

    def mirror(self, host_path: str | os.PathLike[str]) -> None:
        """Copy a host file to the same path, with every symlink on the way to it."""
        # Not resolve(): each symlink on the way must be seen, to be copied as a symlink.
        path = Path(os.path.normpath(Path.cwd() / host_path))
        current = Path("/")
        for index, part in enumerate(path.parts[1:], start=1):
            current /= part
            if current.is_symlink():
                target = str(current.readlink())
                self.add_symlink(_relative(current), target)
                rest = path.parts[index + 1 :]
                self.mirror(Path(os.path.normpath(current.parent / target)).joinpath(*rest))
                return
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            self.add_directory(_relative(path))
        else:
            self.add_data(
                _relative(path), self._read(path), stat.S_IMODE(info.st_mode), int(info.st_mtime)
            )

    def mirror_or_create(self, folder: str) -> None:
        """Mirror the host's folder (which may be a symlink, as /bin is with merged /usr)."""
        if os.path.lexists(f"/{folder}"):
            self.mirror(f"/{folder}")
        else:
            self.add_directory(PurePosixPath(folder))

    def resolve(self, path: str) -> PurePosixPath:
        """Return where ``path`` lands in the guest after the symlinks already added."""
        current = PurePosixPath()
        for part in PurePosixPath(path).parts:
            current /= part
            member = self.members.get(current)
            if member is not None and stat.S_ISLNK(member.mode):
                target = PurePosixPath(member.data.decode())
                joined = target if target.is_absolute() else current.parent / target
                current = PurePosixPath(os.path.normpath(joined).lstrip("/"))
        return current

    def add_python_tree(
        self, source: Path, guest: PurePosixPath, loaded: frozenset[str] | None = None
    ) -> None:
        """Copy a package's files to ``guest`` with bytecode compiled for it.

        Of its extension modules, only those in ``loaded`` (host paths) are copied, when
        given: zstandard, for one, ships a second backend that the guest never loads.
        """
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if "__pycache__" in relative.parts or path.is_dir() or path.suffix == ".pyc":
                continue
            if relative.parts[0] in ("tests", "test"):
                continue
            if path.suffix == ".so" and loaded is not None and str(path) not in loaded:
                continue
            self.add_python_file(path, guest / relative.as_posix())

    def add_python_file(self, path: Path, guest: PurePosixPath) -> None:
        info = path.stat()
        self.add_data(guest, self._read(path), stat.S_IMODE(info.st_mode), int(info.st_mtime))
        if path.suffix != ".py":
            return
        # Unchecked-hash bytecode: the initrd never changes, so the guest need not compare
        # sources, and compiling nothing at boot saves seconds under TCG.
        with tempfile.TemporaryDirectory(prefix="lcow-pyc-") as folder:
            compiled = Path(folder, "module.pyc")
            py_compile.compile(
                str(path),
                cfile=str(compiled),
                dfile=f"/{guest}",
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            tag = sys.implementation.cache_tag
            self.add_data(
                guest.parent / "__pycache__" / f"{guest.stem}.{tag}.pyc", compiled.read_bytes()
            )

    def archive(self) -> bytes:
        """Return the cpio archive, each directory before what it contains."""
        ordered = sorted(self.members.items(), key=lambda item: item[0].parts)
        return cpio.write_archive([member for _, member in ordered])

    def unpacked_bytes(self) -> int:
        return sum(len(member.data) for member in self.members.values())


def _relative(path: Path) -> PurePosixPath:
    return PurePosixPath(path.as_posix().lstrip("/"))


def _run(command: list[str], action: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FailedPreconditionError(f"failed to {action}: {err}") from err
    if result.returncode != 0:
        raise FailedPreconditionError(
            f"failed to {action}: {command[0]} exited with status {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return result.stdout


def _require_tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise FailedPreconditionError(
            f"failed to build the utility VM: {name} is missing; install the Debian "
            f"package {package}"
        )
    return found


def download_package(name: str, folder: Path) -> Path:
    """Fetch the .deb of ``name`` into ``folder`` with apt-get; return its path."""
    _run(["apt-get", "download", name], f"download the Debian package {name}", cwd=folder)
    found = sorted(folder.glob(f"{name}_*.deb"))
    if not found:
        raise FailedPreconditionError(f"failed to download {name}: apt-get wrote no .deb")
    return found[-1]


def _versioned_kernel_package(meta: Path) -> str:
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"], f"read the Depends of {meta.name}")
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ")[0]
        if name.startswith("linux-image-"):
            return name
    raise FailedPreconditionError(
        f"failed to find the kernel package: {meta.name} depends on {depends.strip()!r}, "
        "which names no linux-image package"
    )


def _unpack(deb: Path, folder: Path) -> Path:
    _run(["dpkg", "-x", str(deb), str(folder)], f"unpack {deb.name}")
    return folder


def _modules_folder(tree: Path) -> Path:
    for candidate in ("lib/modules", "usr/lib/modules"):
        if (tree / candidate).is_dir():
            return tree / candidate
    raise FailedPreconditionError(f"failed to find the kernel modules in {tree}")


def _module_name(path: str) -> str:
    name = PurePosixPath(path).name
    return name.split(".ko")[0].replace("-", "_")


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Return the module files to load for ``wanted``, dependencies first.

    Reads modules.dep (``path: dependency paths``); a module named in modules.builtin is
    part of the kernel and needs no file.
    """
    builtin = {
        _module_name(line)
        for line in (modules_dir / "modules.builtin").read_text().splitlines()
        if line
    }
    dependencies: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        dependencies[_module_name(path)] = (path, [_module_name(p) for p in rest.split()])

    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in builtin or any(_module_name(p) == name for p in ordered):
            return
        if name not in dependencies:
            raise FailedPreconditionError(
                f"failed to find the kernel module {name} in {modules_dir}/modules.dep"
            )
        path, needs = dependencies[name]
        for need in needs:
            visit(need)
        ordered.append(path)

    for name in wanted:
        visit(name)
    return ordered


def _add_kernel_modules(tree: InitrdTree, kernel_tree: Path, version: str) -> list[str]:
    depmod = _require_tool("depmod", "kmod")
    _run([depmod, "-b", str(kernel_tree), version], "index the kernel modules with depmod")
    modules_dir = _modules_folder(kernel_tree) / version
    if not (modules_dir / "modules.dep").exists():
        # depmod -b looks in <base>/lib/modules only; move a /usr/lib tree's index there.
        raise FailedPreconditionError(f"failed to index {modules_dir}: depmod wrote no modules.dep")
    loaded = []
    for relative in resolve_modules(modules_dir, GUEST_MODULES):
        data = (modules_dir / relative).read_bytes()
        name = relative
        for suffix, decompress in _DECOMPRESSORS.items():
            if relative.endswith(suffix):
                # busybox insmod reads plain ELF files only.
                data = decompress(data)
                name = relative.removesuffix(suffix)
        tree.add_data(tree.resolve("lib/modules") / name, data)
        loaded.append(name)
    tree.add_data(PurePosixPath("etc/lcow/modules"), "".join(f"{m}\n" for m in loaded).encode())
    return loaded


def _decompress_xz(data: bytes) -> bytes:
    import lzma  # noqa: PLC0415 - only kernels with compressed modules need it

    return lzma.decompress(data)


def _decompress_zstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


_DECOMPRESSORS: Final = {".xz": _decompress_xz, ".zst": _decompress_zstd}


def _shared_libraries(binary: str) -> list[str]:
    """Return the shared libraries ``binary`` loads, the dynamic loader included."""
    output = _run(["ldd", binary], f"list the shared libraries of {binary}")
    found = []
    for line in output.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            found.append(match.group(1))
    return found


def _trace_python(python: str) -> dict[str, object]:
    """Run ``python`` on the agent's imports and return what it loaded."""
    output = _run(
        [python, "-c", _TRACE_SCRIPT, ",".join(GUEST_PACKAGES), *LAZY_MODULES],
        "trace the guest agent's Python imports",
    )
    trace: dict[str, object] = json.loads(output)
    return trace


def _package_root(module_file: Path, top_level: str) -> Path | None:
    """Return the folder or file of the top-level package of ``module_file``, if any."""
    for parent in module_file.parents:
        if parent.name == top_level and (parent / "__init__.py").exists():
            return parent
    if module_file.name.split(".")[0] == top_level:
        return module_file
    return None


def _add_distribution_metadata(tree: InitrdTree, package: Path) -> None:
    """Copy the METADATA of the distribution that installed ``package``.

    Some packages read their own version with importlib.metadata when imported: crc32c
    does where lcow.crc falls back to importing the package.
    """
    for dist_info in package.parent.glob("*.dist-info"):
        record = dist_info / "RECORD"
        if not record.exists():
            continue
        names = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
        if package.name in names:
            metadata = dist_info / "METADATA"
            guest = PurePosixPath(GUEST_SITE) / dist_info.name / "METADATA"
            tree.add_data(guest, metadata.read_bytes())


def _add_python_runtime(tree: InitrdTree, python: str) -> tuple[str, str, str]:
    """Copy the interpreter, the standard library it needs and the guest's packages.

    Returns the interpreter's path, its prefix and its version.
    """
    trace = _trace_python(python)
    executable = str(trace["executable"])
    prefix = str(trace["prefix"])
    stdlib = Path(str(trace["stdlib"]))
    modules = [Path(str(path)) for path in trace["modules"]]  # type: ignore[attr-defined]
    modules += [Path(str(path)) for path in trace["packages"]]  # type: ignore[attr-defined]
    libraries = [str(path) for path in trace["libraries"]]  # type: ignore[attr-defined]

    loaded = frozenset(libraries)
    tree.mirror(executable)
    binaries = [executable]  # what ldd must list the shared libraries of
    copied_packages: set[Path] = set()
    for module in modules:
        if module.is_relative_to(stdlib):
            relative = module.relative_to(stdlib)
            if relative.parts[0] == "lib-dynload":
                tree.mirror(module)
                binaries.append(str(module))
            elif len(relative.parts) > 1:
                package = stdlib / relative.parts[0]
                if package not in copied_packages:
                    copied_packages.add(package)
                    tree.add_python_tree(package, _relative(package))
            else:
                tree.add_python_file(module, _relative(module))
            continue
        for top_level in GUEST_PACKAGES:
            root = _package_root(module, top_level)
            if top_level == "lcow" or root is None or root in copied_packages:
                continue  # lcow_archive adds lcow
            copied_packages.add(root)
            guest_root = PurePosixPath(GUEST_SITE) / root.name
            _add_distribution_metadata(tree, root)
            if root.is_dir():
                tree.add_python_tree(root, guest_root, loaded)
                binaries += [str(p) for p in root.rglob("*.so") if str(p) in loaded]
            else:
                tree.add_python_file(root, guest_root)
                if root.suffix == ".so":
                    binaries.append(str(root))

    copied_names = {path.name.split(".")[0] for path in copied_packages}
    missing = [name for name in GUEST_PACKAGES if name != "lcow" and name not in copied_names]
    if missing:
        raise FailedPreconditionError(
            f"failed to find the Python packages {', '.join(missing)} beside {python}; "
            "install lcow with its dependencies into that environment"
        )

    libarchive = [path for path in libraries if "libarchive.so" in path]
    if not libarchive:
        raise FailedPreconditionError(
            "failed to find libarchive: the traced interpreter loaded no libarchive.so; "
            "install the Debian package libarchive13"
        )
    binaries.append(libarchive[0])
    tree.mirror(libarchive[0])
    for binary in binaries:
        for library in _shared_libraries(binary):
            tree.mirror(library)

    environment = (
        f"LCOW_PYTHON={executable}\n"
        f"export PYTHONHOME={prefix}\n"
        f"export PYTHONPATH=/{GUEST_SITE}\n"
        f"export LIBARCHIVE={libarchive[0]}\n"
        "export PYTHONUTF8=1 PYTHONDONTWRITEBYTECODE=1\n"
    )
    tree.add_data(PurePosixPath("etc/lcow/environment"), environment.encode())
    return executable, prefix, str(trace["version"])


def lcow_package_folder() -> Path:
    return Path(lcow.__file__).parent


def lcow_digest() -> str:
    """Return the SHA-256 over lcow's package files: which lcow an initrd carries."""
    digest = hashlib.sha256()
    root = lcow_package_folder()
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file() or path.suffix == ".pyc":
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def lcow_archive() -> bytes:
    """Return an uncompressed cpio archive of the running lcow package for the guest."""
    tree = InitrdTree()
    tree.add_python_tree(lcow_package_folder(), PurePosixPath(GUEST_SITE) / "lcow")
    # lcow reads its version from its distribution's metadata, as installed on the host.
    metadata = f"Metadata-Version: 2.1\nName: lcow\nVersion: {lcow.__version__}\n"
    dist_info = PurePosixPath(GUEST_SITE) / f"lcow-{lcow.__version__}.dist-info"
    tree.add_data(dist_info / "METADATA", metadata.encode())
    return tree.archive()


def _init_script() -> bytes:
    return files("lcow.servicevm.guest").joinpath("init").read_bytes()


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it when the block succeeds."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def build(destination: Path, *, python: str | None = None) -> BuildReport:
    """Build the kernel and initrd into ``destination``; the files appear when complete."""
    interpreter = python or sys.executable
    destination.mkdir(parents=True, exist_ok=True)
    _require_tool("dpkg-deb", "dpkg")
    _require_tool("ldd", "libc-bin")

    with tempfile.TemporaryDirectory(prefix="lcow-vm-build-") as work_text:
        work = Path(work_text)
        # apt-get drops privileges to _apt for downloads; let that user write here.
        work.chmod(0o755)
        downloads = work / "debs"
        downloads.mkdir(mode=0o777)
        downloads.chmod(0o777)

        meta = download_package(KERNEL_PACKAGE, downloads)
        kernel_package = _versioned_kernel_package(meta)
        log.info("kernel package: %s", kernel_package)
        kernel_tree = _unpack(download_package(kernel_package, downloads), work / "kernel")
        kernels = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise FailedPreconditionError(f"failed to find boot/vmlinuz-* in {kernel_package}")
        kernel = kernels[-1]
        version = kernel.name.removeprefix("vmlinuz-")

        busybox_deb = download_package(BUSYBOX_PACKAGE, downloads)
        busybox_tree = _unpack(busybox_deb, work / "busybox")

        strip = shutil.which("strip")
        if strip is None:
            log.warning("strip (binutils) is missing: the initrd keeps debug sections")
        tree = InitrdTree(strip)
        # Folders first: with merged /usr, /bin and /lib are symlinks, and what is added
        # below must land behind them.
        for folder in ("bin", "sbin", "lib", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp"):
            tree.mirror_or_create(folder)
        tree.add_data(PurePosixPath("init"), _init_script(), 0o755)
        busybox = busybox_tree / "bin" / "busybox"
        tree.add_data(tree.resolve("bin/busybox"), busybox.read_bytes(), 0o755)
        modules = _add_kernel_modules(tree, kernel_tree, version)

        mke2fs = _require_tool("mke2fs", "e2fsprogs")
        tree.mirror(mke2fs)
        for library in _shared_libraries(mke2fs):
            tree.mirror(library)
        if Path("/etc/mke2fs.conf").exists():
            tree.mirror("/etc/mke2fs.conf")  # the same filesystem defaults as on the host

        _, _, python_version = _add_python_runtime(tree, interpreter)
        # The lcow package goes into an archive of its own, which a newer lcow can replace.
        base = tree.archive()
        package = lcow_archive()
        initrd = _compress(base) + _compress(package)
        unpacked = tree.unpacked_bytes() + len(package)
        files_count = len(tree.members)

        with _replacing(destination / KERNEL_NAME) as temporary:
            shutil.copyfile(kernel, temporary)
        with _replacing(destination / INITRD_NAME) as temporary:
            temporary.write_bytes(initrd)
        report = BuildReport(
            kernel_package=kernel_package,
            kernel_version=version,
            busybox_package=busybox_deb.name.removesuffix(".deb"),
            python_version=python_version,
            lcow_version=lcow.__version__,
            lcow_digest=lcow_digest(),
            guest_packages=list(GUEST_PACKAGES),
            modules=modules,
            initrd_files=files_count,
            initrd_unpacked_bytes=unpacked,
            initrd_bytes=len(initrd),
            kernel_bytes=kernel.stat().st_size,
        )
        with _replacing(destination / MANIFEST_NAME) as temporary:
            temporary.write_text(json.dumps(asdict(report), indent=2) + "\n")
    log.info("built the utility VM in %s: %s", destination, report)
    return report


def missing_packages(manifest: dict[str, object]) -> list[str]:
    """Return the guest packages this lcow imports that a build does not carry."""
    carried = manifest.get("guest_packages")
    if not isinstance(carried, list):
        # Builds before the manifest listed its packages carried all but blake3.
        carried = [name for name in GUEST_PACKAGES if name != "blake3"]
    return [name for name in GUEST_PACKAGES if name not in carried]


def read_manifest(folder: Path) -> dict[str, object]:
    """Return the manifest of a build, or an empty mapping when there is none."""
    try:
        manifest: dict[str, object] = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest
