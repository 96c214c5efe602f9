"""Files in the guest: write, read, upload and download (files and whole trees), streamed.

Each file goes over one channel of the agent client in DATA frames, within the receiver's
credit, so a transfer of any size needs a window of memory on each side, not the file. The
guest writes into a temporary name beside the target (``.NAME.vmctl-ID``) and renames it at the
end; a cancelled or failed upload removes it (the channel's CLOSE). A download likewise writes a
temporary local file (or directory) and renames it into place once complete. Uploads keep
their modes; downloads never carry setuid, setgid or sticky bits onto the host and apply the
controller's umask unless asked to keep the guest's permission bits (``keep_modes``).
A problem on the guest's side (missing path, full disk, no permission) is a
:class:`~vmctl.GuestOSError` carrying the guest's ``errno`` and ``reason`` (strerror).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath

import anyio

from vmctl.agent import protocol as proto
from vmctl.agent.client import WINDOW, AgentClient
from vmctl.agent.protocol import FrameType, pack
from vmctl.errors import GuestError, InvalidArgument

__all__ = ["download", "read_file", "upload", "write_file", "write_local"]

GuestPath = str | bytes | PurePosixPath
LocalPath = str | os.PathLike[str]
READ_BLOCK = 1024 * 1024


def guest_path(path: GuestPath) -> bytes:
    raw = os.fsencode(path)
    if not raw.startswith(b"/") or b"\0" in raw:
        raise InvalidArgument(f"guest path {path!r}: give an absolute path without NUL bytes")
    return raw.rstrip(b"/") or b"/"


def _mode(mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"mode: {mode:#o} is not a file mode (0 to 0o7777)")
    return mode


async def _put(client: AgentClient, remote: bytes, mode: int, blocks: AsyncIterator[bytes]) -> None:
    channel = client.open_channel()  # no credit until the guest opened its temporary file
    try:
        client.post(pack(FrameType.FWRITE, channel.id, proto.u32(mode) + remote))
        async for block in blocks:
            await channel.send(block)
        channel.send_eof()
        await channel.wait_reply()
        channel.finished = True
    finally:
        client.release(channel)


async def _get(client: AgentClient, remote: bytes, sink: Callable[[bytes], Awaitable[object]]) -> int:
    """Stream a guest file into ``sink``; its mode."""
    channel = client.open_channel(output=(1,), limit=2 * WINDOW)  # credit only as the sink keeps up
    try:
        client.post(pack(FrameType.FREAD, channel.id, proto.u32(WINDOW) + remote))
        info = (await channel.wait_reply()).payload
        if len(info) != 12:
            raise GuestError(f"guest agent sent a malformed file header: {info[:40]!r}")
        while True:
            try:
                chunk = await channel.receive(proto.STDOUT, READ_BLOCK)
            except anyio.EndOfStream:
                break
            await sink(chunk)
        channel.finished = True
        return int.from_bytes(info[:4], "little")
    finally:
        client.release(channel)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def write_file(client: AgentClient, path: GuestPath, data: bytes, *, mode: int = 0o644) -> None:
    await _put(client, guest_path(path), _mode(mode), _one(bytes(data)))


async def read_file(client: AgentClient, path: GuestPath) -> bytes:
    parts: list[bytes] = []

    async def keep(chunk: bytes) -> None:
        parts.append(chunk)

    await _get(client, guest_path(path), keep)
    return b"".join(parts)


async def _stat(client: AgentClient, remote: bytes) -> tuple[int, int, int]:
    try:
        return proto.parse_stat(await client.request(FrameType.STAT, remote))
    except proto.ProtocolError as exc:
        raise GuestError(f"guest agent sent a malformed stat reply: {exc}") from exc


async def _list(client: AgentClient, remote: bytes) -> list[tuple[int, int, bytes]]:
    try:
        return proto.parse_list(await client.request(FrameType.LIST, remote))
    except proto.ProtocolError as exc:
        raise GuestError(f"guest agent sent a malformed listing: {exc}") from exc


async def _local_blocks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while block := await f.read(READ_BLOCK):
            yield block


async def upload(client: AgentClient, local: LocalPath, remote: GuestPath) -> list[Path]:
    """Copy a local file or directory tree to ``remote`` in the guest, modes kept. Entries that
    are neither files nor directories (symlinks, devices) are not copied: they are returned.

    What is there already: a file replaces a file or symlink (the link, not what it names), never
    a directory (``EISDIR``); a tree merges into a directory (same-named files replaced, other
    entries and the existing directories' modes kept; onto a file: ``ENOTDIR``). Each file is
    atomic; a tree is not: a failure part-way keeps the files copied so far."""
    source, target = Path(local), guest_path(remote)
    info = source.stat()
    if not stat.S_ISDIR(info.st_mode):
        await _put(client, target, stat.S_IMODE(info.st_mode), _local_blocks(source))
        return []
    skipped: list[Path] = []
    for root, dirs, files in os.walk(source):
        here = Path(root)
        rel = here.relative_to(source)
        base = target if rel == Path(".") else target + b"/" + os.fsencode(rel)
        mode = stat.S_IMODE(here.stat().st_mode)
        await client.request(FrameType.MKDIR, proto.u32(mode) + base)
        for name in sorted(files) + [d for d in dirs if (here / d).is_symlink()]:
            entry = here / name
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode):
                skipped.append(entry)
                continue
            await _put(client, base + b"/" + os.fsencode(name), stat.S_IMODE(st.st_mode), _local_blocks(entry))
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
    return skipped


#: The deepest directory a tree download creates below ``local``: a hostile agent could otherwise
#: describe an endless tree (each level holds one descriptor open while it is filled).
MAX_DEPTH = 128
#: The longest file name Linux file systems take (``NAME_MAX``).
NAME_MAX = 255
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _umask() -> int:
    """The process's umask, read without changing it where ``/proc`` says it (Linux 4.7+)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _mode_policy(keep_modes: bool) -> Callable[[int], int]:
    """What a guest mode becomes on the host: never setuid, setgid or sticky; the umask applied
    unless ``keep_modes`` (read once per download: the umask is process-wide)."""
    mask = 0o777 if keep_modes else 0o777 & ~_umask()
    return lambda mode: mode & mask


def _refuse_directory(target: Path) -> None:
    try:
        if stat.S_ISDIR(target.lstat().st_mode):
            raise InvalidArgument(f"download target {target} is a directory; give the file's new path")
    except FileNotFoundError:
        pass


async def _fetch(client: AgentClient, remote: bytes, fd: int, policy: Callable[[int], int]) -> None:
    """Stream a guest file into the new host file ``fd`` (closed here) and give it its mode."""
    async with anyio.wrap_file(open(fd, "wb")) as f:  # noqa: ASYNC230 - an open descriptor: no I/O
        mode = await _get(client, remote, f.write)
        await f.flush()
        os.fchmod(f.wrapped.fileno(), policy(mode))


async def _download_file(client: AgentClient, remote: bytes, target: Path, policy: Callable[[int], int]) -> None:
    """One file onto ``target`` (replacing a file or symlink there, never writing through it)."""
    _refuse_directory(target)
    partial = target.with_name(f".{target.name}.vmctl-{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        await _fetch(client, remote, fd, policy)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_local(target: Path, data: bytes) -> None:
    """Write ``data`` to the host file ``target`` as a download does: a new temporary file
    (``O_EXCL``, never through a symlink), mode 0o666 minus the umask, renamed onto ``target``."""
    _refuse_directory(target)
    partial = target.with_name(f".{target.name}.vmctl-{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _guest_name(remote: bytes, name: bytes, seen: set[bytes]) -> None:
    """A name from the guest's listing that the host can create once in this directory (the
    agent protocol already refuses ``/``, NUL, empty names, ``.`` and ``..``)."""
    if name in seen:
        raise GuestError(f"guest agent listed {os.fsdecode(name[:100])!r} twice in {os.fsdecode(remote)!r}")
    if len(name) > NAME_MAX:
        raise GuestError(f"guest agent listed a name of {len(name)} bytes in {os.fsdecode(remote)!r}")
    seen.add(name)


async def _download_tree(client: AgentClient, remote: bytes, dir_fd: int, skipped: list[str],
                         policy: Callable[[int], int], depth: int) -> None:  # fmt: skip
    """Fill the host directory ``dir_fd`` from ``remote``. Every entry is made relative to its
    directory's descriptor, new (``O_EXCL``, ``mkdir``) and never through a symlink
    (``O_NOFOLLOW``), so nothing found on the host, or put there meanwhile, redirects a write."""
    entries = await _list(client, remote)
    seen: set[bytes] = set()
    for _kind, _mode, name in entries:  # the whole listing first: a bad one creates nothing
        _guest_name(remote, name, seen)
    for kind, mode, name in entries:
        child = remote + b"/" + name
        if kind == proto.KIND_FILE:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
            await _fetch(client, child, fd, policy)
        elif kind == proto.KIND_DIR:
            if depth >= MAX_DEPTH:
                raise GuestError(f"{os.fsdecode(child)}: the guest's tree is deeper than {MAX_DEPTH} directories")
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
            try:
                await _download_tree(client, child, sub, skipped, policy, depth + 1)
                os.fchmod(sub, policy(mode))  # last: a read-only directory is filled first
            finally:
                os.close(sub)
        else:
            skipped.append(os.fsdecode(child))


def _remove_partial(path: Path) -> None:
    """Remove a partial download, opening up directories that already got a read-only mode."""
    try:
        for _root, dirs, _files, root_fd in os.fwalk(path):
            for name in dirs:
                with contextlib.suppress(OSError):
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=root_fd)
                    try:
                        os.fchmod(fd, 0o700)
                    finally:
                        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


async def download(client: AgentClient, remote: GuestPath, local: LocalPath, *, keep_modes: bool = False) -> list[str]:
    """Copy a guest file or directory tree to ``local``; returns the guest paths of entries that
    are neither files nor directories (symlinks, devices, fifos, sockets: never made on the host).

    Modes: never setuid, setgid or sticky; the guest's permission bits minus the controller's
    umask (as ``tar`` extracts for a non-root user), or as they are with ``keep_modes=True``.
    A file replaces a file or symlink at ``local`` (never writing through a link); a directory's
    ``local`` must not exist. Names are kept byte for byte (a newline included)."""
    source, target = guest_path(remote), Path(local)
    policy = _mode_policy(keep_modes)
    kind, mode, _ = await _stat(client, source)
    if kind == proto.KIND_FILE:
        await _download_file(client, source, target, policy)
        return []
    if kind != proto.KIND_DIR:
        raise InvalidArgument(f"{os.fsdecode(source)} in the guest is neither a file nor a directory")
    if os.path.lexists(target):
        raise InvalidArgument(f"download target {target} exists; give a new path for a directory")
    partial = target.with_name(f".{target.name}.vmctl-{secrets.token_hex(4)}")
    skipped: list[str] = []
    os.mkdir(partial, 0o700)
    try:
        top = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        try:
            await _download_tree(client, source, top, skipped, policy, 0)
            os.fchmod(top, policy(mode))
        finally:
            os.close(top)
        partial.rename(target)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_partial, partial)
        raise
    return skipped
