"""Disk images with real software: a Debian root filesystem (``mmdebstrap``), or any root
filesystem given as a tarball or a directory, plus vmctl's guest payload, as an ext4 image.

The guest boots it with the default kernel and initramfs: the initramfs loads the virtio
modules, mounts ``root=`` and switches to the image's ``/init``, which is vmctl's init (not the
distribution's systemd). vmctl's files come from :func:`vmctl.guest.build.guest_payload`; busybox
lands in ``/usr/lib/vmctl`` so the distribution's own tools stay in place.

Images are cached like the default guest, under a key of every input (source, suite, mirror,
package list, the tarball's or directory's content, the payload, the size, this format's
version): a second call with nothing changed returns at once. A build happens in a private
directory next to the cache entry and is renamed into place at the end, so a failed or
cancelled build leaves nothing that looks like an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream

from vmctl.core.log import get_logger
from vmctl.core.paths import cache_dir
from vmctl.errors import HostError, InvalidArgument
from vmctl.guest.build import guest_payload

log = get_logger("vmctl.guest.image")

IMAGE_FORMAT_VERSION = "1"
IMAGE_NAME = "root.img"
DEFAULT_SUITE = "bookworm"
#: Room left free in an image whose size is worked out from its content
MARGIN_MIB = 128
MIB = 1024 * 1024
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?\Z")
_SUITE = re.compile(r"^[a-z][a-z0-9-]*\Z")
#: Directories the initramfs and vmctl's init need in any root
_NEEDED_DIRS = ("dev", "proc", "sys", "run", "tmp", "root", "etc")


@dataclass(frozen=True)
class ImageProgress:
    """One step of a build, for progress displays: ``step`` is bootstrap, unpack, payload,
    mke2fs or done; ``message`` says what happens (a line of mmdebstrap's output, say)."""

    step: str
    message: str = ""


ProgressCallback = Callable[[ImageProgress], None]


@dataclass(frozen=True)
class BuiltImage:
    """A built (or cached) root filesystem image: ``SandboxConfig(..., image=built.image)``."""

    image: Path
    key: str
    source: str  # "debian:bookworm", "tar:/path", "dir:/path"
    packages: tuple[str, ...]
    size_bytes: int  # the image's size (its file is sparse: less is used on disk)
    build_seconds: float  # how long the build took (0 when it came from the cache)
    cached: bool


async def build_image(*, debian: bool = False, from_tar: str | os.PathLike[str] | None = None,
                      from_dir: str | os.PathLike[str] | None = None, packages: Sequence[str] = (),
                      suite: str = DEFAULT_SUITE, mirror: str | None = None, size_mib: int | None = None,
                      rebuild: bool = False, progress: ProgressCallback | None = None) -> BuiltImage:  # fmt: skip
    """Build (or reuse) an ext4 root filesystem image with vmctl's init and agent in it.

    Exactly one source: ``debian=True`` (a Debian ``suite`` minbase made by ``mmdebstrap``, with
    ``packages`` added; the host's apt sources for that suite unless ``mirror`` is given),
    ``from_tar`` (a root filesystem tarball, e.g. from ``docker export``) or ``from_dir`` (a root
    filesystem directory). ``size_mib`` fixes the image size (default: the content plus a
    margin). ``progress`` is called with an :class:`ImageProgress` at each step.

    Boot it with the default guest's kernel and initramfs:
    ``SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, image=built.image)``."""
    report = _reporter(progress)
    sources = [s for s in (debian, from_tar is not None, from_dir is not None) if s]
    if len(sources) != 1:
        raise InvalidArgument("give exactly one source: debian=True, from_tar=... or from_dir=...")
    if packages and not debian:
        raise InvalidArgument("packages: only a Debian build installs packages (debian=True)")
    bad = [p for p in packages if not _PACKAGE.match(p)]
    if bad:
        raise InvalidArgument(f"packages: {bad} are not Debian package names")
    if not _SUITE.match(suite):
        raise InvalidArgument(f"suite: {suite!r} is not a Debian suite name like 'bookworm'")
    if size_mib is not None and (isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib < 16):
        raise InvalidArgument(f"size_mib: {size_mib!r}: give a whole number of MiB, at least 16")
    _require_tools(debian=debian)
    payload = await guest_payload()
    inputs: dict[str, Any] = {"format": IMAGE_FORMAT_VERSION, "size_mib": size_mib,
                              "payload": [[p, hashlib.sha256(d).hexdigest(), m] for p, d, m in payload]}  # fmt: skip
    tar = dirsrc = None
    if debian:
        source = f"debian:{suite}"
        mirrors = _mirrors(suite, mirror)
        inputs.update(suite=suite, packages=sorted(set(packages)), mirrors=[_mirror_identity(m) for m in mirrors])
    elif from_tar is not None:
        tar = Path(from_tar).expanduser().absolute()
        if not tar.is_file():
            raise InvalidArgument(f"from_tar: {tar} does not exist or is not a file")
        source = f"tar:{tar}"
        report(ImageProgress("hash", f"hashing {tar.name}"))
        inputs["tar"] = await anyio.to_thread.run_sync(_file_digest, tar)
    else:
        assert from_dir is not None
        dirsrc = Path(from_dir).expanduser().absolute()
        if not dirsrc.is_dir():
            raise InvalidArgument(f"from_dir: {dirsrc} does not exist or is not a directory")
        _check_root(dirsrc, f"from_dir: {dirsrc}")  # fail before any work
        source = f"dir:{dirsrc}"
        inputs["dir"] = await anyio.to_thread.run_sync(_tree_digest, dirsrc)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "images" / key
    manifest = target / "manifest.json"
    if manifest.is_file() and not rebuild:
        report(ImageProgress("done", f"cached: {target / IMAGE_NAME}"))
        return _load(manifest, cached=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    started = time.monotonic()
    log.info("building image", source=source, key=key)
    try:
        tree = work / "tree"
        if debian:
            await _debootstrap(tree, suite, sorted(set(packages)), mirrors, report)
        elif tar is not None:
            tree.mkdir()
            report(ImageProgress("unpack", f"unpacking {tar.name}"))
            await _run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(tree)], "unpacking the tarball")
        else:
            assert dirsrc is not None
            report(ImageProgress("unpack", f"copying {dirsrc}"))
            await _run(["cp", "-a", f"{dirsrc}/.", str(tree)], "copying the directory")
        report(ImageProgress("payload", "adding vmctl's init, agent and busybox"))
        await anyio.to_thread.run_sync(_add_payload, tree, payload)
        _check_root(tree, source)
        needed_mib, files = await anyio.to_thread.run_sync(_needed_mib, tree)
        chosen = size_mib if size_mib is not None else needed_mib + MARGIN_MIB
        if chosen < needed_mib:
            raise InvalidArgument(f"size_mib: {chosen} MiB is too small for this root filesystem, which needs about "
                                  f"{needed_mib} MiB: give a larger size (--size {needed_mib + MARGIN_MIB}) or "
                                  "leave it out to have it worked out")  # fmt: skip
        out = work / "out"
        out.mkdir()
        report(ImageProgress("mke2fs", f"writing a {chosen} MiB ext4 image ({files} files)"))
        await _mke2fs(tree, out / IMAGE_NAME, chosen, files)
        seconds = round(time.monotonic() - started, 2)
        record = {"key": key, "source": source, "packages": sorted(set(packages)), "size_mib": chosen,
                  "build_seconds": seconds, "inputs": inputs}  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
        built = _load(manifest, cached=False)
        log.info("built image", image=str(built.image), size_mib=chosen, seconds=seconds)
        report(ImageProgress("done", f"{built.image} ({chosen} MiB) in {seconds:.1f} s"))
        return built
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, work, True)


def _reporter(progress: ProgressCallback | None) -> ProgressCallback:
    def report(event: ImageProgress) -> None:
        if progress is not None:
            try:
                progress(event)
            except Exception as exc:  # a broken progress display must not break the build
                log.warning("image progress callback failed", error=repr(exc))

    return report


def _require_tools(*, debian: bool) -> None:
    needed = [("mke2fs", "e2fsprogs"), ("tar", "tar")] + ([("mmdebstrap", "mmdebstrap")] if debian else [])
    missing = [(tool, pkg) for tool, pkg in needed if shutil.which(tool) is None]
    if missing:
        raise HostError("building an image needs " + ", ".join(t for t, _ in missing)
                        + ": apt-get install " + " ".join(p for _, p in missing))  # fmt: skip
    if debian and os.geteuid() != 0:
        raise HostError("a Debian image is built with mmdebstrap in root mode: run it as root")


def _mirrors(suite: str, mirror: str | None) -> list[str]:
    """``mirror`` if given, else the host's deb822 apt sources that carry ``suite`` (so the build
    uses the host's mirror and proxy), else nothing (mmdebstrap then uses deb.debian.org)."""
    if mirror:
        return [mirror]
    found = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        if re.search(rf"^Suites:.*\b{re.escape(suite)}\b", text, re.M) and re.search(r"^Types:.*\bdeb\b", text, re.M):
            found.append(str(path))
    return found


def _mirror_identity(mirror: str) -> str:
    path = Path(mirror)
    if path.is_file():  # a sources file: what it says counts, not where it is
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return mirror


async def _debootstrap(tree: Path, suite: str, packages: list[str], mirrors: list[str],
                       report: ProgressCallback) -> None:  # fmt: skip
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [suite, str(tree), *mirrors]
    report(ImageProgress("bootstrap", f"mmdebstrap {suite} minbase" + (f" + {', '.join(packages)}" if packages else "")))
    tail: list[str] = []
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT) as proc:  # fmt: skip
        assert proc.stdout is not None
        async for line in _lines(proc.stdout):
            tail = [*tail[-19:], line]
            if line.startswith(("I:", "E:", "W:")):
                report(ImageProgress("bootstrap", line))
        await proc.wait()
    if proc.returncode != 0:
        detail = " | ".join(tail[-5:])
        raise HostError(f"mmdebstrap {suite} failed (exit {proc.returncode}): {detail} "
                        "(is Debian's mirror reachable? see /etc/apt/sources.list.d or pass a mirror)")  # fmt: skip


async def _lines(stream: ByteReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            yield raw.decode(errors="replace").rstrip()
    if buffer:
        yield buffer.decode(errors="replace").rstrip()


async def _run(argv: list[str], what: str) -> None:
    try:
        await anyio.run_process(argv, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise HostError(f"{what} failed: {' '.join(argv[:2])} exited with {exc.returncode}: {' '.join(detail)}") from None


def inside(tree: Path, relative: str) -> Path:
    """``relative`` inside the root ``tree`` with symlinks resolved as the guest would (an
    absolute link points into the tree, never at the host's file of that name)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    current = tree
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != tree else tree
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise InvalidArgument(f"/{relative}: too many symbolic links in the root filesystem")
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p not in ("", ".")] + parts
            if link.startswith("/"):
                current = tree
            continue
        current = candidate
    return current


def _add_payload(tree: Path, payload: list[tuple[str, bytes, int]]) -> None:
    for name in _NEEDED_DIRS:
        path = inside(tree, name)
        if not path.exists():
            path.mkdir(mode=0o1777 if name == "tmp" else 0o755, parents=True)
    for name, data, mode in [*payload, ("etc/vmctl-disk-root", b"", 0o644)]:
        path = inside(tree, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()  # e.g. a distribution's /init link: vmctl's init runs the guest
        path.write_bytes(data)
        path.chmod(mode)


def _check_root(tree: Path, what: str) -> None:
    """What vmctl's init and agent need from the root filesystem itself."""
    shell = inside(tree, "bin/sh")
    if not shell.is_file():
        raise InvalidArgument(f"{what}: the root filesystem has no /bin/sh, which vmctl's init and agent run on; "
                              "install a shell in it (Debian: dash; Alpine: busybox) or link /bin/sh to one")  # fmt: skip


def _needed_mib(tree: Path) -> tuple[int, int]:
    """MiB the tree needs as ext4 (4 KiB blocks, inodes, journal) and how many files it holds."""
    blocks = 0
    files = 0
    for root, dirs, names in os.walk(tree):
        for name in [*dirs, *names]:
            files += 1
            info = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                blocks += (info.st_size + 4095) // 4096 + (1 if stat.S_ISDIR(info.st_mode) else 0)
            elif stat.S_ISLNK(info.st_mode) and info.st_size > 59:
                blocks += 1
    data = blocks * 4096 * 1.08  # extent and directory overhead
    inodes = _inode_count(files) * 256
    journal = (4 if data < 100 * MIB else 16 if data < 900 * MIB else 64) * MIB  # mke2fs's defaults, rounded up
    return int((data + inodes + journal) / MIB) + 4, files


def _inode_count(files: int) -> int:
    return int(files * 1.5) + 4096


async def _mke2fs(tree: Path, image: Path, size_mib: int, files: int) -> None:
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmctl-root", "-N", str(_inode_count(files)),
            "-d", str(tree), str(image), f"{size_mib}M"]  # fmt: skip
    try:
        await anyio.run_process(argv, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-2:]
        hint = " (the image is too small: give a larger size)" if "space" in " ".join(detail).lower() or \
            "allocate" in " ".join(detail).lower() else ""  # fmt: skip
        raise HostError(f"mke2fs failed: {' '.join(detail)}{hint}") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(tree: Path) -> str:
    """A directory's identity: every entry's path, type, mode, owner, size, mtime and link target
    (reading every byte of a large root would cost more than the build)."""
    h = hashlib.sha256()
    for root, dirs, names in os.walk(tree):
        dirs.sort()
        for name in sorted([*dirs, *names]):
            path = os.path.join(root, name)
            info = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
            h.update(f"{os.path.relpath(path, tree)}\0{info.st_mode}\0{info.st_uid}:{info.st_gid}\0"
                     f"{info.st_size}\0{info.st_mtime_ns}\0{link}\n".encode())  # fmt: skip
    return h.hexdigest()


def _load(manifest: Path, *, cached: bool) -> BuiltImage:
    data = json.loads(manifest.read_text())
    image = manifest.parent / IMAGE_NAME
    return BuiltImage(image=image, key=data["key"], source=data["source"], packages=tuple(data["packages"]),
                      size_bytes=image.stat().st_size, build_seconds=0.0 if cached else float(data["build_seconds"]),
                      cached=cached)  # fmt: skip


def describe(built: BuiltImage) -> dict[str, Any]:
    """JSON-ready fields of a built image (for ``vmctl guest build --image --json``)."""
    out = asdict(built)
    out["image"] = str(built.image)
    out["allocated_bytes"] = built.image.stat().st_blocks * 512
    return out
