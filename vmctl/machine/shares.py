"""A shared directory's guest side: the agent loads virtio-fs (an on-demand module of vmctl's
initramfs, kept past the switch to a disk root) and mounts the share's tag at its guest path;
on unplug it unmounts first, and a share still in use stays plugged with the processes named.
"""

from __future__ import annotations

from vmctl.agent.client import AgentClient
from vmctl.config import SandboxConfig
from vmctl.devices import DEFAULT_MSIZE_9P, Device, SharedDirectory
from vmctl.errors import ConfigError, GuestError, Problem

#: a few seconds: the module is loaded once, the mount answers at once
MOUNT_TIMEOUT = 30.0

#: why a 9p share is cold-plugged only and stays for the sandbox's life
NINE_P_COLD_ONLY = ("a 9p share is cold-plugged only (QEMU 7.2 has no fsdev command over QMP, so it can "
                    "neither be added nor given back): put it in SandboxConfig(devices=[...]), or use "
                    "protocol='virtiofs' for a share that comes and goes")  # fmt: skip

# $1 tag, $2 mount point, $3 options, $4 file system, $5 tries (tenths of a second). The module list is the initramfs's, or the
# copy the init kept in /run/vmctl/modules when it switched to a disk root.
_MOUNT = r"""
if ! grep -qw "$4" /proc/filesystems; then
    read -r rel < /proc/sys/kernel/osrelease
    if [ -s "/lib/modules/$rel/on-demand" ]; then
        modprobe -a $(cat "/lib/modules/$rel/on-demand") 2>/dev/null
    elif [ -s /run/vmctl/modules/on-demand ]; then
        while read -r m; do insmod "/run/vmctl/modules/$m.ko" 2>/dev/null; done < /run/vmctl/modules/on-demand
    fi
fi
grep -qw "$4" /proc/filesystems || { echo "this guest's kernel has no $4 (for 9p: vmctl guest build --kernel generic)" >&2; exit 3; }
mkdir -p "$2" || exit 1
# a device just plugged may not be probed yet (its tag unknown: EINVAL): tried again for $5 tenths
n=0
until err=$(mount -t "$4" -o "$3" "$1" "$2" 2>&1); do
    n=$((n + 1))
    case "$err" in *"Invalid argument"*|*"No such device"*) ;; *) n=$5 ;; esac  # only a tag not seen yet
    [ "$n" -lt "$5" ] || { echo "$err" >&2; exit 1; }
    sleep 0.1
done
# larger reads: FUSE requests of 4 MiB instead of 128 KiB (one 256 MiB file reads ~1.5x sooner)
bdi=$(awk -v m="$2" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1)
[ -n "$bdi" ] && echo 4096 > "/sys/class/bdi/$bdi/read_ahead_kb" 2>/dev/null
exit 0
"""

# $1 mount point. Busy: the pids using it (fuser) on stdout, for the error.
_UNMOUNT = r"""
grep -q " $1 virtiofs " /proc/mounts || exit 0
umount "$1" 2>/dev/null && exit 0
fuser -m "$1" 2>/dev/null
exit 4
"""


# $@ mount points. Each one in use: "path pids" (fuser), one line each.
_IN_USE = r"""
for m in "$@"; do
    grep -q " $m virtiofs " /proc/mounts || continue  # not mounted: fuser would name the root's users
    p=$(fuser -m "$m" 2>/dev/null)
    [ -n "$p" ] && echo "$m $p"
done
exit 0
"""


def member_config(config: SandboxConfig, *, sandbox_id: str, index: int | None = None) -> SandboxConfig:
    """``config`` with ``{id}`` (and, in a fleet or a pool, ``{index}``) filled into its shares'
    host paths, each member's directory made (0700) if it is missing; it stays afterwards."""
    devices, changed = [], False
    for i, device in enumerate(config.devices):
        if isinstance(device, SharedDirectory) and device.member_template()[1]:
            device = member_share(device, f"devices[{i}].host_path", sandbox_id=sandbox_id, index=index)
            changed = True
        devices.append(device)
    return config.replace(devices=tuple(devices)) if changed else config


def member_share(share: SharedDirectory, field: str, *, sandbox_id: str, index: int | None = None) -> SharedDirectory:
    """``share`` with its placeholders filled and its directory made (0700) if missing; a
    ConfigError naming ``field`` when ``{index}`` is left (a sandbox outside a fleet has none)."""
    values = {"id": sandbox_id} | ({"index": str(index)} if index is not None else {})
    share = share.for_member(**values)
    if share.member_template()[1]:
        raise ConfigError([Problem(field, "{index} is filled in for each member of a Fleet or a SandboxPool; "
                                          "a sandbox on its own has none: use {id}")])  # fmt: skip
    share.host_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return share


async def check_unused(agent: AgentClient, placed: list[tuple[str, Device]], timeout: float | None = None) -> None:
    """A GuestError naming each share the guest has files open on (nothing is unmounted)."""
    paths = {d.guest_path: dev_id for dev_id, d in placed if isinstance(d, SharedDirectory)}
    result = await agent.exec(["sh", "-c", _IN_USE, "sh", *paths], timeout=timeout or MOUNT_TIMEOUT)
    busy = [line.split(None, 1) for line in result.text.splitlines()[:16] if line.strip()]
    named = [f"{paths[b[0]]} at {b[0]} (pids {_pids(b[1])})" for b in busy if len(b) > 1 and b[0] in paths]
    if named:
        raise GuestError(f"the guest has files open on shared directories: {'; '.join(named)}; end those "
                         "processes (a share is unplugged for the save and cannot carry open files across it)")


async def mount(agent: AgentClient, dev_id: str, share: SharedDirectory, timeout: float | None = None, *,
                msize_9p: int = DEFAULT_MSIZE_9P) -> str:  # fmt: skip
    """Mount ``share`` in the guest; its guest path once mounted. A 9p share's ``msize`` is the
    config's ``msize_9p`` (the original's Msize9p)."""
    options = ("ro" if share.read_only else "rw") + ",nodev"
    if not share.over_virtiofs:
        options += f",trans=virtio,version=9p2000.L,msize={msize_9p}"
    wait = timeout or MOUNT_TIMEOUT
    fstype = "virtiofs" if share.over_virtiofs else "9p"
    tries = str(max(1, int(wait * 10) - 20))  # the exec's own timeout stays the longer one
    result = await agent.exec(["sh", "-c", _MOUNT, "sh", share.mount_tag(dev_id), share.guest_path, options, fstype,
                               tries], timeout=wait)  # fmt: skip
    if not result.ok:
        why = _printable(result.stderr)[-300:] or f"exit code {result.exit_code}"
        raise GuestError(f"the guest could not mount share {dev_id} at {share.guest_path}: {why}")
    return share.guest_path


async def unmount(agent: AgentClient, dev_id: str, share: SharedDirectory, timeout: float | None = None) -> None:
    """Unmount ``share`` in the guest before its device goes; a share in use is a GuestError."""
    result = await agent.exec(["sh", "-c", _UNMOUNT, "sh", share.guest_path], timeout=timeout or MOUNT_TIMEOUT)
    if not result.ok:
        raise GuestError(f"share {dev_id} at {share.guest_path} is in use in the guest (pids {_pids(result.text)}); "
                         "end what uses it, then unplug it again")  # fmt: skip


def _pids(said: str) -> str:
    """The pids in fuser's answer (digits only, it is the guest's; fuser marks each with letters)."""
    found = [p.rstrip("cefFrm") for p in said.split()]
    return " ".join(p for p in found if p.isdigit())[:100] or "?"


def _printable(said: bytes) -> str:
    """What the guest said, for an error message: printable characters only (it is untrusted)."""
    text = said.decode(errors="replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)
