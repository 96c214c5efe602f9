"""vhost-user disks served by a real backend (qemu-storage-daemon), checked from inside the guest.

A vhost-user backend is a separate process that reads the guest's virtqueues straight out of guest
RAM, so the guest's memory must be a shared, fd-backed mapping it can map. These tests start
qemu-storage-daemon on a raw image, plug its socket into a sandbox (hot and cold) and check what a
user checks: the device table names the guest disk, the guest reads what the host wrote into the
image, and what the guest writes lands in the image file on the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from socket import AF_UNIX
from socket import socket as unix_socket

import pytest

from vmctl import ConfigError, Sandbox, SandboxConfig, SandboxState, VhostUserBlockDevice, VhostUserNetDevice

pytestmark = pytest.mark.qemu
@contextmanager
def serving(process: subprocess.Popen[bytes], socket: Path, log: Path, *, limit: float) -> Iterator[None]:
    """A backend process from when its socket exists (polled: an outside program gives no event)
    until the block ends, when it is stopped."""
    try:
        deadline = time.monotonic() + limit
        while not socket.exists():
            assert process.poll() is None, f"{process.args[0]} did not start: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"{process.args[0]} did not create its socket"
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
needs_testpmd = pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="needs dpdk-testpmd (dpdk-dev)")

IMAGE_BYTES = 48 * 1024 * 1024  # a size no other disk of the default guest has
BLOCK = 4096
HOST_MARK_BLOCK = 0  # the host writes here before the guest starts; the guest must read it
GUEST_BLOCK = 8  # the guest writes here; the host must find it in the image


@dataclass
class Backend:
    image: Path
    socket: Path
    process: subprocess.Popen[bytes]
    log: Path
    host_mark: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_healthy(self) -> None:
        assert self.process.poll() is None, f"qemu-storage-daemon exited: {self.log_text()}"
        assert "vu_panic" not in self.log_text(), f"the vhost-user backend gave up: {self.log_text()}"


@pytest.fixture
def vhost_user_disk(tmp_path: Path) -> Iterator[Backend]:
    """qemu-storage-daemon exporting a fresh raw image as vhost-user-blk on a unix socket."""
    image, socket, log = tmp_path / "disk.img", tmp_path / "vub.sock", tmp_path / "qsd.log"
    subprocess.run(["truncate", "-s", str(IMAGE_BYTES), str(image)], check=True)
    host_mark = "host-" + secrets.token_hex(8)
    with image.open("r+b") as f:
        f.seek(HOST_MARK_BLOCK * BLOCK)
        f.write(host_mark.encode())
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={socket},"
                         "writable=on"],  # fmt: skip
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    with serving(process, socket, log, limit=10):
        yield Backend(image, socket, process, log, host_mark)


async def check_disk_in_guest(sb: Sandbox, disk: str, backend: Backend) -> None:
    """``disk`` is the vhost-user disk: right size, holds the host's mark, and takes a write."""
    size = await sb.exec(["cat", f"/sys/block/{disk.removeprefix('/dev/')}/size"], timeout=30, check=True)
    assert int(size.text.strip()) * 512 == IMAGE_BYTES, f"{disk} is not the {IMAGE_BYTES}-byte vhost-user disk"

    # O_DIRECT both ways, so the data really goes through the backend, not the guest's page cache
    read_mark = await sb.exec(
        ["sh", "-c", f"dd if={disk} bs={BLOCK} skip={HOST_MARK_BLOCK} count=1 iflag=direct 2>/dev/null"],
        timeout=30, check=True,
    )  # fmt: skip
    assert read_mark.stdout[: len(backend.host_mark)] == backend.host_mark.encode()

    token = "guest-" + secrets.token_hex(8)
    await sb.exec(
        ["sh", "-c", f"printf %s {token} | dd of={disk} bs={BLOCK} seek={GUEST_BLOCK} conv=sync oflag=direct"],
        timeout=30, check=True,
    )  # fmt: skip
    read_back = await sb.exec(
        ["sh", "-c", f"dd if={disk} bs={BLOCK} skip={GUEST_BLOCK} count=1 iflag=direct 2>/dev/null"],
        timeout=30, check=True,
    )  # fmt: skip
    assert read_back.stdout[: len(token)] == token.encode()
    assert read_back.stdout[len(token) : BLOCK] == bytes(BLOCK - len(token))

    with backend.image.open("rb") as f:  # the backend wrote it into the image on the host
        f.seek(GUEST_BLOCK * BLOCK)
        assert f.read(len(token)) == token.encode()
    backend.assert_healthy()


@needs_qsd
async def test_hotplug_vhost_user_block(make_config: Callable[..., SandboxConfig], vhost_user_disk: Backend) -> None:
    async with Sandbox(make_config(shared_memory=True)) as sb:
        record = await sb.hotplug(VhostUserBlockDevice(socket=vhost_user_disk.socket), timeout=60)
        assert record.guest_path is not None and record.guest_path.startswith("/dev/vd"), record
        assert [d.guest_path for d in sb.devices if d.id == record.id] == [record.guest_path]
        await check_disk_in_guest(sb, record.guest_path, vhost_user_disk)

        await sb.unplug(record, timeout=60)
        names = (await sb.exec(["ls", "/sys/block"], timeout=30, check=True)).text.split()
        assert record.guest_path.removeprefix("/dev/") not in names
        vhost_user_disk.assert_healthy()


@needs_qsd
async def test_coldplug_vhost_user_block(make_config: Callable[..., SandboxConfig], vhost_user_disk: Backend) -> None:
    device = VhostUserBlockDevice(socket=vhost_user_disk.socket)
    async with Sandbox(make_config(devices=[device], shared_memory=True), start_timeout=60) as sb:
        records = [d for d in sb.devices if isinstance(d.device, VhostUserBlockDevice)]
        assert len(records) == 1, sb.devices
        guest_path = records[0].guest_path
        assert guest_path is not None and guest_path.startswith("/dev/vd"), records[0]
        await check_disk_in_guest(sb, guest_path, vhost_user_disk)


@pytest.fixture
def vhost_user_switch(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes], Path]]:
    """DPDK testpmd as a vhost-user net backend (no hugepages, no NIC): one vhost port in io
    forwarding mode, so every frame the guest sends comes straight back to it."""
    socket, log = tmp_path / "vhu-net.sock", tmp_path / "testpmd.log"
    prefix = f"vmctl-test-{secrets.token_hex(4)}"  # its own runtime dir under /var/run/dpdk
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["dpdk-testpmd", "--no-huge", "-m", "256", f"--file-prefix={prefix}", "--no-pci", "-l", "0-1",
             "--vdev", f"net_vhost0,iface={socket},queues=1",
             "--", "--forward-mode=io", "--auto-start", "--stats-period", "1", "--nb-cores=1",
             "--total-num-mbufs=2048"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with serving(process, socket, log, limit=20):
            yield socket, process, log
    finally:
        for base in (Path("/var/run/dpdk"), Path(f"/run/user/{os.getuid()}/dpdk")):
            shutil.rmtree(base / prefix, ignore_errors=True)


async def check_nic_in_guest(sb: Sandbox, name: str) -> None:
    """``name`` comes up with carrier, and frames it sends come back through the backend."""
    script = (
        'i=$1; ip link set "$i" up && ip addr add 10.213.0.1/24 dev "$i" || exit 1\n'
        'n=0; until [ "$(cat /sys/class/net/$i/carrier 2>/dev/null)" = 1 ]; do\n'
        '  n=$((n+1)); [ $n -gt 100 ] && { echo no carrier >&2; exit 1; }; sleep 0.1; done\n'
        "ping -c 3 -W 1 10.213.0.2 >/dev/null 2>&1\n"  # unanswered, but its ARP requests go out
        'echo "$(cat /sys/class/net/$i/statistics/tx_packets) $(cat /sys/class/net/$i/statistics/rx_packets)"'
    )
    result = await sb.exec(["sh", "-c", script, "sh", name], timeout=60, check=True)
    tx, rx = map(int, result.text.split())
    assert tx > 0 and rx > 0, f"{name}: sent {tx}, received {rx} frames through the vhost-user backend"


@needs_testpmd
async def test_hotplug_vhost_user_net(make_config: Callable[..., SandboxConfig], vhost_user_switch: tuple[Path, subprocess.Popen[bytes], Path]) -> None:
    socket, process, log = vhost_user_switch
    async with Sandbox(make_config(shared_memory=True)) as sb:
        record = await sb.hotplug(VhostUserNetDevice(socket=socket), timeout=60)
        assert record.guest_path is not None and not record.guest_path.startswith("/"), record
        await check_nic_in_guest(sb, record.guest_path)
        assert process.poll() is None, log.read_text(errors="replace")


@needs_testpmd
async def test_coldplug_vhost_user_net(make_config: Callable[..., SandboxConfig], vhost_user_switch: tuple[Path, subprocess.Popen[bytes], Path]) -> None:
    socket, process, log = vhost_user_switch
    async with Sandbox(make_config(devices=[VhostUserNetDevice(socket=socket)], shared_memory=True), start_timeout=60) as sb:
        records = [d for d in sb.devices if isinstance(d.device, VhostUserNetDevice)]
        assert len(records) == 1 and records[0].guest_path is not None, sb.devices
        await check_nic_in_guest(sb, records[0].guest_path)
        assert process.poll() is None, log.read_text(errors="replace")


def test_vhost_user_needs_shared_memory_and_no_templates(make_config: Callable[..., SandboxConfig], tmp_path: Path) -> None:
    """Refused before anything starts, naming the field to change: a backend cannot map private RAM."""
    sock = tmp_path / "backend.sock"
    listener = unix_socket(AF_UNIX)
    listener.bind(str(sock))
    try:
        with pytest.raises(ConfigError) as info:
            make_config(devices=[VhostUserBlockDevice(socket=sock)])
        assert "shared_memory=True" in str(info.value)
        with pytest.raises(ConfigError) as info:
            make_config(shared_memory=True, boot_to_be_template=True, memory_path=tmp_path / "m",
                        devices_state_path=tmp_path / "s")  # fmt: skip
        assert "shared_memory" in info.value.fields
        with pytest.raises(ConfigError) as info:
            make_config(machine="microvm", shared_memory=True, devices=[VhostUserNetDevice(socket=sock)])
        assert "PCI" in str(info.value)
    finally:
        listener.close()


async def test_hotplug_vhost_user_without_shared_memory_is_refused(make_config: Callable[..., SandboxConfig],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """A running sandbox whose RAM is private cannot take a vhost-user device: a ConfigError, and
    the sandbox goes on as before."""
    sock = tmp_path / "backend.sock"
    listener = unix_socket(AF_UNIX)
    listener.bind(str(sock))
    try:
        async with Sandbox(make_config()) as sb:
            with pytest.raises(ConfigError, match="shared_memory"):
                await sb.hotplug(VhostUserBlockDevice(socket=sock))
            assert sb.state is SandboxState.RUNNING and sb.devices == []
    finally:
        listener.close()
