"""Build the default guest: Debian's cloud kernel plus a busybox initramfs with the vmctl agent.

The agent is a small C program (``files/vmctl-agent.c``) compiled here with ``gcc -static``, so
the same binary runs in the busybox initramfs and on any disk-image guest. The result lives in
the user cache under a key made of every input (kernel package and version, busybox binary, our
init script, the agent's source and ``gcc --version``, the module list, this builder's format
version), so a second call with nothing changed returns at once, and any change produces a fresh
build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import anyio

from vmctl.core.guestmanifest import FILESYSTEMS, MANIFEST, SWITCHES_ROOT
from vmctl.core.log import get_logger
from vmctl.core.paths import cache_dir
from vmctl.errors import HostError, InvalidArgument
from vmctl.guest import cpio
from vmctl.guest.vmlinux import extract_pvh_vmlinux

log = get_logger("vmctl.guest")

FORMAT_VERSION = "5"
AGENT_SOURCE = "vmctl-agent.c"
AGENT_BINARY = "vmctl-agent"
GCC_PACKAGES = "apt-get install gcc libc6-dev"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: the kernels the default guest can be built from: Debian's cloud kernel (small, boots fast; no
#: 9p) and its generic one (``linux-image-amd64``: 9p as well), each cached under its own key
KERNEL_FLAVOURS = {"cloud": KERNEL_META_PACKAGE, "generic": "linux-image-amd64"}
KernelFlavour = Literal["cloud", "generic"]
KERNEL_PACKAGE_ENV = "VMCTL_KERNEL_PACKAGE"
BUSYBOX = Path("/bin/busybox")

#: Modules the guest loads at boot; their dependencies are added and ordered automatically.
GUEST_MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_console", "virtio_blk", "virtio_scsi", "sd_mod",
    "virtio_net", "virtio_rng", "virtio_balloon", "vmw_vsock_virtio_transport", "pvpanic_pci",
)  # fmt: skip
#: Modules in the initramfs that nothing loads at boot: the guest loads them when a device needs
#: them (a shared directory's file system), so a sandbox without one pays nothing at boot.
ON_DEMAND_MODULES = ("virtiofs", "9p", "9pnet_virtio")  # each where the kernel has it
#: the share file systems and the module each needs
SHARE_FILESYSTEMS = {"virtiofs": "virtiofs", "9p": "9p"}
#: the file beside load-order naming them and what they need, in load order (the init copies the
#: list and the modules to /run/vmctl/modules before it switches to a disk root)
ON_DEMAND_LIST = "on-demand"


@dataclass(frozen=True)
class GuestAssets:
    """A built default guest: pass ``kernel`` and ``initrd`` to :class:`~vmctl.SandboxConfig`."""

    kernel: Path
    initrd: Path
    kernel_version: str
    kernel_package: str
    modules: tuple[str, ...]
    key: str
    image: Path | None = None
    #: the compressed kernel as packaged; ``kernel`` is its unpacked PVH image when one was made
    bzimage: Path | None = None

    @property
    def directory(self) -> Path:
        return self.kernel.parent


ROOT_IMAGE = "root.img"
ROOT_IMAGE_MIB = 64

#: What the init mounts first, in one ``mount -a -T`` (one process instead of one per mount)
FSTAB = b"""proc /proc proc defaults 0 0
sysfs /sys sysfs defaults 0 0
devtmpfs /dev devtmpfs defaults 0 0
tmpfs /run tmpfs mode=0755 0 0
tmpfs /tmp tmpfs mode=1777 0 0
"""


def _root_tree(busybox: bytes, agent: bytes, applets: Iterable[str]) -> list[cpio.Entry]:
    """The busybox root shared by the initramfs and the disk image. Busybox's applets are links
    made here, not by ``busybox --install`` at boot (hundreds of calls in the guest's init)."""
    entries = [cpio.dir_entry(d) for d in
               ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "lib", "lib/modules",
                "proc", "sys", "run", "tmp", "root")]  # fmt: skip
    links = sorted({a for a in applets if a and "/" not in a and a not in ("busybox", "sh")})
    return entries + [
        cpio.file_entry("bin/busybox", busybox, 0o755),
        cpio.symlink_entry("bin/sh", "busybox"),
        *(cpio.symlink_entry(f"bin/{name}", "busybox") for name in links),
        cpio.file_entry("init", _guest_file("init"), 0o755),
        cpio.file_entry("sbin/vmctl-agent", agent, 0o755),
        cpio.file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        cpio.file_entry("etc/group", b"root:x:0:\n"),
        cpio.file_entry("etc/vmctl-fstab", FSTAB),
    ]


def _busybox_applets() -> list[str]:
    """The applets of the host's static busybox (``busybox --list``), the one the guest carries."""
    try:
        done = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostError(f"{BUSYBOX} --list failed: {exc}") from exc
    return done.stdout.decode(errors="replace").split()


async def _build_root_image(target: Path, agent: bytes) -> None:
    """ext4 image of the busybox root, built without privileges by ``mke2fs -d``."""
    if shutil.which("mke2fs") is None:
        raise HostError("building the root image needs mke2fs: apt-get install e2fsprogs")
    busybox = BUSYBOX.read_bytes()
    applets = await anyio.to_thread.run_sync(_busybox_applets)
    work = Path(tempfile.mkdtemp(prefix=".image-", dir=target.parent))
    try:
        tree = work / "tree"
        root = _root_tree(busybox, agent, applets)
        for entry in [*root, cpio.file_entry("etc/vmctl-disk-root", b"")]:
            path = tree / entry.name
            if stat.S_ISDIR(entry.mode):
                path.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(entry.mode):
                path.symlink_to(entry.data.decode())
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(entry.data)
                path.chmod(entry.mode & 0o7777)
        partial = work / ROOT_IMAGE
        await anyio.run_process(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmctl-root", "-E", "root_owner=0:0",
                                 "-d", str(tree), str(partial), f"{ROOT_IMAGE_MIB}M"])  # fmt: skip
        partial.replace(target)
    except subprocess.CalledProcessError as exc:
        raise HostError(f"mke2fs failed: {(exc.stderr or b'').decode(errors='replace').strip()}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _guest_file(name: str) -> bytes:
    return resources.files("vmctl.guest").joinpath("files", name).read_bytes()


#: Where vmctl's own files go in an image built from another root filesystem (see guest_payload)
PAYLOAD_DIR = "usr/lib/vmctl"


async def guest_payload() -> list[tuple[str, bytes, int]]:
    """What vmctl adds to a root filesystem it did not make (``vmctl.guest.build_image``): the
    init (``/init``, where the initramfs switches to), the agent (compiled with the default
    guest, which is built first if need be) and a static busybox, as ``(path in the image,
    content, permission bits)``. Busybox goes to ``/usr/lib/vmctl`` so the distribution's own
    ``/bin`` stays as it is; the init finds it there and puts its applets last on ``PATH``, to fill
    gaps only. The one place that says what the guest side is made of."""
    if not BUSYBOX.is_file():
        raise HostError("building the guest needs a static busybox: apt-get install busybox-static")
    busybox = BUSYBOX.read_bytes()
    _require_static(busybox)
    assets = await _ensure_kernel_and_initrd(rebuild=False, meta_package=KERNEL_META_PACKAGE)
    return [
        ("init", _guest_file("init"), 0o755),
        ("sbin/vmctl-agent", (assets.directory / AGENT_BINARY).read_bytes(), 0o755),
        (f"{PAYLOAD_DIR}/busybox", busybox, 0o755),
    ]


async def ensure_default_assets(*, rebuild: bool = False, image: bool = False,
                                kernel: KernelFlavour = "cloud") -> GuestAssets:  # fmt: skip
    """Return the default guest, building it first if the cache has no build for these inputs.
    ``kernel``: Debian's ``cloud`` kernel, or its ``generic`` one (for 9p shares).

    With ``image=True`` the result also has ``image``: an ext4 root filesystem made from the same
    busybox root (``mke2fs -d``, no privileges needed). Boot it with ``initrd=assets.initrd``
    too: the initramfs loads the virtio modules, mounts the disk and switches to it.
    """
    if kernel not in KERNEL_FLAVOURS:
        raise InvalidArgument(f"kernel: {kernel!r}; use one of {', '.join(KERNEL_FLAVOURS)}")
    assets = await _ensure_kernel_and_initrd(rebuild=rebuild, meta_package=KERNEL_FLAVOURS[kernel])
    if not image:
        return assets
    root_img = assets.directory / ROOT_IMAGE
    if rebuild or not root_img.is_file():
        await _build_root_image(root_img, (assets.directory / AGENT_BINARY).read_bytes())
    return dataclasses.replace(assets, image=root_img)


async def _ensure_kernel_and_initrd(*, rebuild: bool, meta_package: str) -> GuestAssets:
    _require_tools()
    package, version = await _kernel_package(meta_package)
    busybox = BUSYBOX.read_bytes()
    _require_static(busybox)
    gcc_version = await _require_gcc()
    key = _cache_key(package, version, busybox, gcc_version)
    target = cache_dir() / "guest" / key
    manifest = target / MANIFEST
    if manifest.is_file() and not rebuild:
        return _load(manifest)
    log.info("building default guest", package=package, version=version, into=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        await anyio.run_process(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise HostError(f"apt-get download {package} produced {len(debs)} .deb files")
        await anyio.run_process(["dpkg-deb", "-x", str(debs[0]), str(work / "pkg")])
        out = work / "out"
        out.mkdir()
        agent = await _compile_agent(out / AGENT_BINARY)
        assets = await anyio.to_thread.run_sync(_assemble, work / "pkg", out, busybox, agent, package, key)
        if rebuild and target.exists():
            shutil.rmtree(target)
        try:
            out.rename(target)
        except OSError:  # a concurrent build won the race; theirs is identical
            if not manifest.is_file():
                raise
        log.info(
            "built default guest", modules=len(assets.modules), initrd_bytes=(target / "initrd.img").stat().st_size
        )
        return _load(manifest)
    except anyio.get_cancelled_exc_class():
        raise
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise HostError(f"building the default guest failed: {' '.join(map(str, exc.cmd))} exited with "
                        f"{exc.returncode}: {detail[0]} (is Debian's archive reachable?)") from exc  # fmt: skip
    except OSError as exc:
        raise HostError(f"building the default guest failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _require_tools() -> None:
    missing = [(tool, pkg) for tool, pkg in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg"))
               if shutil.which(tool) is None]  # fmt: skip
    if missing:
        tools = ", ".join(t for t, _ in missing)
        raise HostError(f"building the guest needs {tools} (Debian's {missing[0][1]} package)")
    if not BUSYBOX.is_file():
        raise HostError("building the guest needs a static busybox: apt-get install busybox-static")


async def _require_gcc() -> str:
    """``gcc --version``'s first line (part of the cache key); :class:`HostError` without gcc or a
    static C library."""
    if shutil.which("gcc") is None:
        raise HostError(f"building the guest agent needs gcc: {GCC_PACKAGES}")
    found = await anyio.run_process(["gcc", "-print-file-name=libc.a"], check=False)
    libc = found.stdout.decode().strip()
    if found.returncode != 0 or not os.path.isabs(libc) or not os.path.isfile(libc):
        raise HostError(f"building the guest agent needs the static C library (libc.a): {GCC_PACKAGES}")
    version = await anyio.run_process(["gcc", "--version"], check=False)
    return version.stdout.decode(errors="replace").strip()


async def _compile_agent(target: Path) -> bytes:
    """``gcc -static -O2`` of the agent's C source into ``target``; its bytes."""
    source = target.with_name(AGENT_SOURCE)
    source.write_bytes(_guest_file(AGENT_SOURCE))
    done = await anyio.run_process(["gcc", "-static", "-O2", "-s", "-o", str(target), str(source)], check=False)
    source.unlink()
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[-2000:]
        raise HostError(f"compiling the guest agent failed ({GCC_PACKAGES}?): {detail}")
    return target.read_bytes()


def _require_static(busybox: bytes) -> None:
    if b"ld-linux" in busybox[:8192]:
        raise HostError(f"{BUSYBOX} is dynamically linked; install the static one: apt-get install busybox-static")


async def _kernel_package(meta_package: str) -> tuple[str, str]:
    package = os.environ.get(KERNEL_PACKAGE_ENV, "") if meta_package == KERNEL_META_PACKAGE else ""
    if not package:
        result = await anyio.run_process(["apt-cache", "depends", meta_package], check=False)
        match = re.search(rb"Depends: (linux-image-[\w.+-]+)", result.stdout)
        if match is None:
            raise HostError(
                f"apt-cache knows no {meta_package}: run 'apt-get update' "
                "(Debian's main archive must be in the apt sources)"
            )
        package = match.group(1).decode()
    policy = await anyio.run_process(["apt-cache", "policy", package], check=False)
    match = re.search(rb"Candidate: (\S+)", policy.stdout)
    if match is None or match.group(1) == b"(none)":
        raise HostError(f"apt-cache has no candidate for {package}: run 'apt-get update'")
    return package, match.group(1).decode()


def _cache_key(package: str, version: str, busybox: bytes, gcc_version: str) -> str:
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, package, version, ",".join(GUEST_MODULES), ",".join(ON_DEMAND_MODULES), gcc_version):
        h.update(part.encode() + b"\0")
    for blob in (busybox, _guest_file("init"), _guest_file(AGENT_SOURCE)):
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()[:16]


def _load(manifest: Path) -> GuestAssets:
    data: dict[str, Any] = json.loads(manifest.read_text())
    return GuestAssets(
        kernel=manifest.parent / data.get("boot_kernel", "vmlinuz"),
        bzimage=manifest.parent / "vmlinuz",
        initrd=manifest.parent / "initrd.img",
        kernel_version=data["kernel_version"],
        kernel_package=data["kernel_package"],
        modules=tuple(data["modules"]),
        key=data["key"],
    )


def _assemble(pkg: Path, out: Path, busybox: bytes, agent: bytes, package: str, key: str) -> GuestAssets:
    vmlinuz = sorted((pkg / "boot").glob("vmlinuz-*"))
    module_roots = sorted((pkg / "lib" / "modules").glob("*"))
    if not vmlinuz or not module_roots:
        raise HostError(f"{package} holds no kernel or no modules")
    kernel_version = module_roots[0].name
    available = _index_modules(module_roots[0])
    builtin_file = module_roots[0] / "modules.builtin"
    builtin = (
        {_module_name(Path(line)) for line in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    wanted = [m for m in GUEST_MODULES if m not in builtin]
    boot = _load_order(wanted, available)
    order = _load_order(wanted + [m for m in ON_DEMAND_MODULES if m not in builtin and m in available], available)
    on_demand = [m for m in order if m not in boot]  # with what they need, in load order
    # where busybox modprobe looks (uname -r); load-order names what the init asks modprobe for,
    # modules.dep adds what each needs
    mods = f"lib/modules/{kernel_version}"
    modules = {m: _read_module(available[m]) for m in order}  # each decompressed once from here on
    entries = _root_tree(busybox, agent, _busybox_applets()) + [
        cpio.chardev_entry("dev/console", 5, 1),
        cpio.chardev_entry("dev/null", 1, 3, 0o666),
        cpio.file_entry("etc/vmctl-initramfs", b"this initramfs switches to root= when given\n"),
        cpio.dir_entry(mods),
        cpio.file_entry(f"{mods}/load-order", "".join(f"{m}\n" for m in wanted).encode()),
        cpio.file_entry(f"{mods}/{ON_DEMAND_LIST}", "".join(f"{m}\n" for m in on_demand).encode()),
        cpio.file_entry(f"{mods}/modules.dep", _modules_dep(order, modules).encode()),
    ]
    entries += [cpio.file_entry(f"{mods}/{m}.ko", data) for m, data in modules.items()]
    shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
    cpio.write_initramfs(out / "initrd.img", entries, compress=False)  # faster to boot, see cpio
    assets = GuestAssets(out / "vmlinuz", out / "initrd.img", kernel_version, package, tuple(order), key)
    manifest = {k: v for k, v in asdict(assets).items() if k not in ("kernel", "initrd", "image", "bzimage")}
    manifest[SWITCHES_ROOT] = True
    manifest[FILESYSTEMS] = [fs for fs, module in SHARE_FILESYSTEMS.items() if module in order or module in builtin]
    manifest["boot_kernel"] = _boot_kernel(out / "vmlinuz")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return assets


def _boot_kernel(bzimage: Path) -> str:
    """The kernel file the guest boots: the unpacked PVH ``vmlinux`` next to the bzImage (no
    firmware decompression under TCG, see :mod:`vmctl.guest.vmlinux`), or the bzImage itself."""
    if extract_pvh_vmlinux(bzimage, bzimage.with_name("vmlinux")):
        return "vmlinux"
    log.warning("cannot unpack the kernel for direct PVH boot; booting the bzImage", kernel=str(bzimage))
    return bzimage.name


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _index_modules(root: Path) -> dict[str, Path]:
    return {_module_name(p): p for p in root.rglob("*.ko*") if re.search(r"\.ko(\.xz)?$", p.name)}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo strings."""
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def _modules_dep(order: list[str], modules: dict[str, bytes]) -> str:
    """``modules.dep`` for busybox ``modprobe``, which then loads a module and its dependencies in
    one process (one ``insmod`` each cost a fork and an exec). As depmod writes it: each module's
    dependencies, all of them, the ones loaded last first. ``order`` (from :func:`_load_order`) has
    every module after its dependencies, so each one's closure is known by the time it comes."""
    needs: dict[str, set[str]] = {}
    lines = []
    for name in order:
        direct = module_depends(modules[name])
        needs[name] = set(direct).union(*(needs[d] for d in direct))
        chain = [m for m in reversed(order) if m in needs[name]]
        lines.append(f"{name}.ko:" + "".join(f" {m}.ko" for m in chain) + "\n")
    return "".join(lines)


def _load_order(wanted: Iterable[str], available: dict[str, Path]) -> list[str]:
    """Wanted modules and their dependencies, each after everything it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise HostError(f"module dependency cycle at {name}")
        if name not in available:
            raise HostError(f"kernel module {name} not found in the kernel package (built in?)")
        visiting.add(name)
        for dep in module_depends(_read_module(available[name])):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
