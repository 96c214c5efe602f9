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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import anyio

from vmctl.agent import InvalidArgument, parse_cpu_list
from vmctl.devices import Placement, QmpCommand
from vmctl.hotplug import HotplugError, HotplugTimeout, PluggedDevice

if TYPE_CHECKING:
    from vmctl.sandbox import Sandbox

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
        [ -f "$f/online" ] || continue
        [ "$(cat "$f/online")" = 0 ] || continue
        echo 1 > "$f/online" && cur=$((cur + 1))
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


_WAIT_PRESENT = r"""
while [ "$(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l)" -lt "$1" ]; do sleep 0.05; done
"""
_WAIT_MEMTOTAL = r"""
while [ "$(sed -n 's/^MemTotal: *\([0-9]*\) kB//p' /proc/meminfo)" -lt "$1" ]; do sleep 0.05; done
"""


async def _present_cpus(sb: Sandbox) -> list[int]:
    result = await sb.exec(["cat", f"{GUEST_CPU_DIR}/present"], check=True)
    return parse_cpu_list(result.text)


async def resize_vcpus(sb: Sandbox, count: int, timeout: float) -> tuple[int, int]:
    max_vcpus = sb.config.max_vcpus or 1
    if not 1 <= count <= max_vcpus:
        raise InvalidArgument(f"vcpus: {count} is outside 1..{max_vcpus} (max_vcpus); raise max_vcpus in the config")
    old = len(await sb.guest_online_cpus())
    if count == old:
        return old, old
    with anyio.fail_after(timeout):
        if count > old:
            present = await _present_cpus(sb)
            missing = count - len(present)
            if missing > 0:
                await _plug_cpus(sb, missing)
                # the guest registers a CPU just after its ACPI ack: wait for it there, not across the port
                await sb.exec(["sh", "-c", _WAIT_PRESENT, "sh", str(count)], check=True)
        result = await sb.exec(["sh", "-c", _SET_ONLINE, "sh", str(count)], check=True)
    new = len(parse_cpu_list(result.text))
    if new != count:
        raise HotplugError(f"asked for {count} online vCPUs, the guest has {new}")
    return old, new


async def _plug_cpus(sb: Sandbox, missing: int) -> None:
    queue = sb._require_queue()  # noqa: SLF001 - resize is part of the sandbox
    slots: list[dict[str, Any]] = await sb.hypervisor.execute("query-hotpluggable-cpus")
    free = sorted((s for s in slots if "qom-path" not in s), key=lambda s: (s["props"].get("socket-id", 0),
                                                                             s["props"].get("core-id", 0)))  # fmt: skip
    for slot in free[:missing]:
        dev_id = f"cpu{slot['props'].get('core-id', 0)}"
        await queue.add_and_wait_ost({"driver": slot["type"], "id": dev_id, **slot["props"]})
        queue.devices[dev_id] = PluggedDevice(dev_id, None, Placement(), hotplugged=True)


async def memory_mib(sb: Sandbox) -> int:
    summary = await sb.hypervisor.execute("query-memory-size-summary")
    return int((summary["base-memory"] + summary.get("plugged-memory", 0)) // MIB)


async def resize_memory(sb: Sandbox, target: int, timeout: float) -> int:
    config = sb.config
    max_mib = config.max_memory_mib or config.memory_mib
    if not config.memory_mib <= target <= max_mib:
        raise InvalidArgument(
            f"memory_mib: {target} is outside {config.memory_mib}..{max_mib} (boot memory..max_memory_mib)"
        )
    queue = sb._require_queue()  # noqa: SLF001
    current = await memory_mib(sb)
    with anyio.fail_after(timeout):
        if target > current:
            block = await _block_mib(sb)
            delta = math.ceil((target - current) / block) * block
            if current + delta > max_mib:
                raise InvalidArgument(f"memory_mib: {target} rounds up to {current + delta} MiB "
                                      f"({block} MiB blocks), above max_memory_mib={max_mib}")  # fmt: skip
            dimms = [d for d in queue.devices if d.startswith("dimm")]
            if len(dimms) >= config.memory_slots:
                raise HotplugError(f"all {config.memory_slots} memory slots are in use; raise memory_slots")
            await _add_dimm(sb, delta)
        elif target < current:
            await _remove_dimms(sb, current, target)
    return await memory_mib(sb)


async def _block_mib(sb: Sandbox) -> int:
    result = await sb.exec(["cat", "/sys/devices/system/memory/block_size_bytes"], check=True)
    return int(result.text.strip(), 16) // MIB


async def _add_dimm(sb: Sandbox, delta: int) -> None:
    queue = sb._require_queue()  # noqa: SLF001
    before = (await sb.guest_memory()).total_kib
    dev_id = queue.new_id("dimm")
    mem_id = f"{dev_id}-mem"
    await queue.submit("object-add", {"qom-type": "memory-backend-ram", "id": mem_id, "size": delta * MIB})
    try:
        await queue.add_and_wait_ost({"driver": "pc-dimm", "id": dev_id, "memdev": mem_id})
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await queue.submit("object-del", {"id": mem_id})
        raise
    queue.devices[dev_id] = PluggedDevice(dev_id, None, Placement(), hotplugged=True,
                                          cleanup=[QmpCommand("object-del", {"id": mem_id})])  # fmt: skip
    # onlining is the guest kernel's job, right after the ACPI ack: wait for it in the guest
    await sb.exec(["sh", "-c", _WAIT_MEMTOTAL, "sh", str(before + delta * 1024 * 3 // 4)], check=True)


async def _remove_dimms(sb: Sandbox, current: int, target: int) -> None:
    queue = sb._require_queue()  # noqa: SLF001
    dimms = await sb.hypervisor.execute("query-memory-devices")
    sizes = {d["data"]["id"]: int(d["data"]["size"]) // MIB for d in dimms if d.get("type") == "dimm"}
    for dev_id in sorted(sizes, key=lambda i: int(i[4:]) if i[4:].isdigit() else 0, reverse=True):
        if current - sizes[dev_id] < target:
            break
        try:
            await queue.unplug(dev_id)
        except HotplugTimeout:
            raise HotplugError(f"the guest did not release {dev_id}: its memory is in use (not movable?)") from None
        current -= sizes[dev_id]
