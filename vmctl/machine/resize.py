"""vCPU and memory resize, through the hotplug queue and confirmed in the guest.

vCPUs. Growing plugs CPU devices in ascending core order (``query-hotpluggable-cpus``), waits for
each ``ACPI_DEVICE_OST``, and onlines the new CPUs in the guest. Shrinking *offlines* CPUs in the
guest and leaves their devices plugged: on QEMU 7.2 under TCG a CPU ``device_add`` after a CPU
unplug crashes QEMU, so a sandbox that shrank by unplugging would be one resize away from dying.
Growing again onlines the offlined CPUs first. The count returned is the guest's online count.

Memory. Growing adds a ``pc-dimm`` backed by RAM, sized up to the guest's memory block size
(128 MiB on x86_64), acknowledged by ``ACPI_DEVICE_OST``; the guest onlines it as movable
(``memhp_default_state=online_movable``), so it can be removed later. Shrinking removes whole
DIMMs, newest first, each confirmed by ``DEVICE_DELETED``. The size returned is QEMU's view
(boot memory plus DIMMs), after the guest confirmed it.

CPUs and DIMMs are rows of the device table (:class:`~vmctl.devices.CpuDevice`,
:class:`~vmctl.devices.DimmDevice`), entered through the queue like any other device. One resize
runs at a time per sandbox (the :class:`Resizer` lock): two concurrent resizes both succeed,
one after the other, and the guest ends with the count of the last.
"""

from __future__ import annotations

import math
from typing import Any

import anyio

from vmctl.agent.client import AgentClient
from vmctl.agent.results import parse_cpu_list
from vmctl.config import SandboxConfig
from vmctl.devices import CpuDevice, DimmDevice
from vmctl.errors import HotplugError, InvalidArgument, NotSupported
from vmctl.machine.hotplug import Executor, HotplugQueue

MIB = 1024 * 1024
GUEST_CPU_DIR = "/sys/devices/system/cpu"

# Online offline-but-present CPUs in ascending order until TARGET are online (or offline the
# highest-numbered ones down to TARGET); prints the online list.
_SET_ONLINE = r"""
target=$1
count() { n=0; for c in $(cat /sys/devices/system/cpu/online | tr ',' ' '); do
    case $c in *-*) n=$((n + ${c#*-} - ${c%-*} + 1));; *) n=$((n + 1));; esac; done; echo $n; }
cur=$(count)
if [ "$cur" -lt "$target" ]; then
    for f in $(ls -d /sys/devices/system/cpu/cpu[0-9]* | sort -t u -k 3 -n); do
        [ "$cur" -ge "$target" ] && break
        # a CPU just plugged gets its online switch a moment after its directory (cpu0 has none)
        n=0; while [ "${f##*/}" != cpu0 ] && [ ! -f "$f/online" ] && [ "$n" -lt 100 ]; do sleep 0.02; n=$((n + 1)); done
        [ -f "$f/online" ] || continue
        [ "$(cat "$f/online")" = 0 ] || continue
        echo 1 > "$f/online" || { sleep 0.1; echo 1 > "$f/online"; } && cur=$((cur + 1))
    done
elif [ "$cur" -gt "$target" ]; then
    for f in $(ls -d /sys/devices/system/cpu/cpu[0-9]* | sort -t u -k 3 -rn); do
        [ "$cur" -le "$target" ] && break
        [ -f "$f/online" ] || continue
        [ "$(cat "$f/online")" = 1 ] || continue
        echo 0 > "$f/online" && cur=$((cur - 1))
    done
fi
cat /sys/devices/system/cpu/online
"""

# The guest's init loads its less urgent modules in the background after boot; a CPU or DIMM
# plugged while that runs crashed the guest kernel now and then under TCG: wait for it first.
_WAIT_MODULES = r"""
n=0
while [ -e /run/vmctl-modules-loading ] && [ "$n" -lt 600 ]; do sleep 0.05; n=$((n + 1)); done
"""

_WAIT_PRESENT = r"""
while [ "$(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l)" -lt "$1" ]; do sleep 0.05; done
"""
_WAIT_MEMTOTAL = r"""
while [ "$(sed -n 's/^MemTotal: *\([0-9]*\) kB//p' /proc/meminfo)" -lt "$1" ]; do sleep 0.05; done
"""


class Resizer:
    """vCPU and memory resize for one sandbox, one at a time."""

    def __init__(self, queue: HotplugQueue, agent: AgentClient, execute: Executor, config: SandboxConfig) -> None:
        self._queue = queue
        self._agent = agent
        self._execute = execute
        self._config = config
        self._lock = anyio.Lock()

    # -- vCPUs -------------------------------------------------------------------------------

    async def online_cpus(self) -> int:
        return len(await self._agent.online_cpus())

    async def resize_vcpus(self, count: int, *, can_plug: bool) -> tuple[int, int]:
        max_vcpus = self._config.max_vcpus or 1
        if not 1 <= count <= max_vcpus:
            raise InvalidArgument(f"vcpus: {count} is outside 1..{max_vcpus} (max_vcpus); raise max_vcpus in the config")
        async with self._lock:
            old = await self.online_cpus()
            if count == old:
                return old, old
            if count > old:
                present = parse_cpu_list((await self._agent.check_exec(["cat", f"{GUEST_CPU_DIR}/present"])).text)
                missing = count - len(present)
                if missing > 0:
                    if not can_plug:
                        raise NotSupported("this sandbox cannot hotplug CPUs (max_vcpus == vcpus)")
                    await self._agent.check_exec(["sh", "-c", _WAIT_MODULES])
                    await self._plug_cpus(missing)
                    # the guest registers a CPU just after its ACPI ack: wait for it there, not across the port
                    await self._agent.check_exec(["sh", "-c", _WAIT_PRESENT, "sh", str(count)])
            result = await self._agent.check_exec(["sh", "-c", _SET_ONLINE, "sh", str(count)])
        new = len(parse_cpu_list(result.text))
        if new != count:
            raise HotplugError(f"asked for {count} online vCPUs, the guest has {new}")
        return old, new

    async def _plug_cpus(self, missing: int) -> None:
        slots: list[dict[str, Any]] = await self._execute("query-hotpluggable-cpus")
        free = sorted((s for s in slots if "qom-path" not in s),
                      key=lambda s: (s["props"].get("socket-id", 0), s["props"].get("core-id", 0)))  # fmt: skip
        for slot in free[:missing]:
            props = slot["props"]
            cpu = CpuDevice(driver=str(slot["type"]), socket_id=int(props.get("socket-id", 0)),
                            core_id=int(props.get("core-id", 0)), thread_id=int(props.get("thread-id", 0)))  # fmt: skip
            await self._queue.plug(cpu, f"cpu{cpu.core_id}")

    # -- memory ------------------------------------------------------------------------------

    async def memory_mib(self) -> int:
        summary = await self._execute("query-memory-size-summary")
        return int((summary["base-memory"] + summary.get("plugged-memory", 0)) // MIB)

    async def resize_memory(self, target: int) -> int:
        config = self._config
        max_mib = config.max_memory_mib or config.memory_mib
        if not config.memory_mib <= target <= max_mib:
            raise InvalidArgument(
                f"memory_mib: {target} is outside {config.memory_mib}..{max_mib} (boot memory..max_memory_mib)"
            )
        async with self._lock:
            current = await self.memory_mib()
            if target > current:
                block = int((await self._agent.check_exec(
                    ["cat", "/sys/devices/system/memory/block_size_bytes"])).text.strip(), 16) // MIB  # fmt: skip
                delta = math.ceil((target - current) / block) * block
                if current + delta > max_mib:
                    raise InvalidArgument(f"memory_mib: {target} rounds up to {current + delta} MiB "
                                          f"({block} MiB blocks), above max_memory_mib={max_mib}")  # fmt: skip
                if len(self._dimms()) >= config.memory_slots:
                    raise HotplugError(f"all {config.memory_slots} memory slots are in use; raise memory_slots")
                await self._add_dimm(delta)
            elif target < current:
                await self._remove_dimms(current, target)
            return await self.memory_mib()

    def _dimms(self) -> dict[str, int]:
        """Plugged DIMMs by id, with their sizes in MiB."""
        return {r.id: r.device.size_mib for r in self._queue.devices.values() if isinstance(r.device, DimmDevice)}

    async def _add_dimm(self, delta: int) -> None:
        await self._agent.check_exec(["sh", "-c", _WAIT_MODULES])
        before = (await self._agent.memory()).total_kib
        dev_id = self._queue.new_id("dimm")
        shared = self._queue.ctx.ram_shared  # a vhost-user backend maps hot-added RAM too
        record = await self._queue.plug(DimmDevice(size_mib=delta, shared=shared), dev_id)
        # a snapshot must recreate it at the same address (QEMU would accept another, and the
        # guest would then crash), so the table keeps where QEMU put it
        for info in await self._execute("query-memory-devices"):
            data = info.get("data", {})
            if info.get("type") == "dimm" and data.get("id") == dev_id:
                record.device = DimmDevice(size_mib=delta, shared=shared, addr=int(data["addr"]), slot=int(data["slot"]))
        # onlining is the guest kernel's job, right after the ACPI ack: wait for it in the guest
        await self._agent.check_exec(["sh", "-c", _WAIT_MEMTOTAL, "sh", str(before + delta * 1024 * 3 // 4)])

    async def _remove_dimms(self, current: int, target: int) -> None:
        sizes = self._dimms()
        for dev_id in sorted(sizes, key=lambda i: int(i[4:]) if i[4:].isdigit() else 0, reverse=True):
            if current - sizes[dev_id] < target:
                break
            try:
                await self._queue.unplug(dev_id)
            except HotplugError as exc:
                raise HotplugError(f"the guest did not release {dev_id}: its memory is in use (not movable?): "
                                   f"{exc}") from None  # fmt: skip
            current -= sizes[dev_id]
