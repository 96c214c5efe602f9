"""Files in the guest: write, read, upload and download (files and whole trees), streamed.

Each file goes over one channel of the agent client in DATA frames, within the receiver's
credit, so a transfer of any size needs a window of memory on each side, not the file. The
guest writes into a temporary name beside the target (``.NAME.vmctl-ID``) and renames it at the
end; a cancelled or failed upload removes it (the channel's CLOSE). A download likewise writes a
temporary local file (or directory) and renames it into place once complete. Modes are kept.
A problem on the guest's side (missing path, full disk, no permission) is a
:class:`~vmctl.GuestOSError` carrying the guest's ``errno`` and ``reason`` (strerror).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath

import anyio

from vmctl import agentproto as proto
from vmctl.agent import WINDOW, AgentClient
from vmctl.agentproto import T, pack
from vmctl.errors import GuestError, InvalidArgument

__all__ = ["download", "read_file", "upload", "write_file"]

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
        client.post(pack(T.FWRITE, channel.id, proto.u32(mode) + remote))
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
        client.post(pack(T.FREAD, channel.id, proto.u32(WINDOW) + remote))
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
        return proto.parse_stat(await client.request(T.STAT, remote))
    except proto.ProtocolError as exc:
        raise GuestError(f"guest agent sent a malformed stat reply: {exc}") from exc


async def _list(client: AgentClient, remote: bytes) -> list[tuple[int, int, bytes]]:
    try:
        return proto.parse_list(await client.request(T.LIST, remote))
    except proto.ProtocolError as exc:
        raise GuestError(f"guest agent sent a malformed listing: {exc}") from exc


async def _local_blocks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while block := await f.read(READ_BLOCK):
            yield block


async def upload(client: AgentClient, local: LocalPath, remote: GuestPath) -> list[Path]:
    """Copy a local file or directory tree to ``remote`` in the guest, modes kept. Entries that
    are neither files nor directories (symlinks, devices) are not copied: they are returned."""
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
        await client.request(T.MKDIR, proto.u32(mode) + base)
        for name in sorted(files) + [d for d in dirs if (here / d).is_symlink()]:
            entry = here / name
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode):
                skipped.append(entry)
                continue
            await _put(client, base + b"/" + os.fsencode(name), stat.S_IMODE(st.st_mode), _local_blocks(entry))
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
    return skipped


async def _download_file(client: AgentClient, remote: bytes, target: Path) -> None:
    partial = target.with_name(f".{target.name}.vmctl-{secrets.token_hex(4)}")
    try:
        async with await anyio.open_file(partial, "wb") as f:
            mode = await _get(client, remote, f.write)
        partial.chmod(mode)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


async def _download_tree(client: AgentClient, remote: bytes, target: Path, skipped: list[str]) -> None:
    target.mkdir(mode=0o700)
    modes: list[tuple[Path, int]] = []
    for kind, mode, name in await _list(client, remote):
        child, local = remote + b"/" + name, target / os.fsdecode(name)
        if kind == proto.KIND_FILE:
            await _download_file(client, child, local)
        elif kind == proto.KIND_DIR:
            await _download_tree(client, child, local, skipped)
            modes.append((local, mode))
        else:
            skipped.append(os.fsdecode(child))
    for path, mode in modes:  # last: a read-only directory is filled first
        path.chmod(mode)


async def download(client: AgentClient, remote: GuestPath, local: LocalPath) -> list[str]:
    """Copy a guest file or directory tree to ``local``, modes kept; a directory's ``local`` must
    not exist yet. Entries that are neither files nor directories are returned, not copied."""
    source, target = guest_path(remote), Path(local)
    kind, mode, _ = await _stat(client, source)
    if kind == proto.KIND_FILE:
        await _download_file(client, source, target)
        return []
    if kind != proto.KIND_DIR:
        raise InvalidArgument(f"{os.fsdecode(source)} in the guest is neither a file nor a directory")
    if target.exists():
        raise InvalidArgument(f"download target {target} exists; give a new path for a directory")
    partial = target.with_name(f".{target.name}.vmctl-{secrets.token_hex(4)}")
    skipped: list[str] = []
    try:
        await _download_tree(client, source, partial, skipped)
        partial.chmod(mode)
        partial.rename(target)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(partial, ignore_errors=True))
        raise
    return skipped
