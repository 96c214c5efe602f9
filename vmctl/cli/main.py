"""The ``vmctl`` command: build the guest, check the host, run a command in a fresh sandbox."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vmctl import host
from vmctl.cli import detached as detachedcli
from vmctl.config import SandboxConfig
from vmctl.core.guestmanifest import initrd_filesystems
from vmctl.core.log import configure
from vmctl.core.state import state_diagram
from vmctl.errors import ConfigError, VmctlError
from vmctl.guest import ImageProgress, build_image, ensure_default_assets
from vmctl.guest.image import DEFAULT_SUITE, describe
from vmctl.hypervisors import jail
from vmctl.sandbox.facade import Sandbox


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmctl", description="Control sandbox virtual machines on QEMU.")
    p.add_argument("--log-level", default="warning", help="debug, info, warning (default) or error")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of console text")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("guest", help="the default guest")
    gsub = g.add_subparsers(dest="guest_command", required=True)
    b = gsub.add_parser("build", help="build (or reuse) the default guest kernel and initramfs")
    b.add_argument("--rebuild", action="store_true", help="build again even if the cache has it")
    b.add_argument("--image", action="store_true", help="also build an ext4 root filesystem image")
    b.add_argument("--kernel", choices=("cloud", "generic"), default="cloud",
                   help="Debian's cloud kernel (default) or its generic one, which has 9p (cached apart)")  # fmt: skip
    b.add_argument("--debian", action="store_true", help="with --image: a Debian minbase root made by mmdebstrap")
    b.add_argument("--packages", default="", help="with --debian: packages to add, comma-separated (python3,git)")
    b.add_argument("--suite", default=DEFAULT_SUITE, help=f"with --debian: the Debian suite (default {DEFAULT_SUITE})")
    b.add_argument("--mirror", default=None, help="with --debian: a mirror URL or sources file (default: the host's)")
    b.add_argument("--from-tar", type=Path, default=None, metavar="ROOTFS.tar",
                   help="with --image: a root filesystem tarball (e.g. from docker export)")  # fmt: skip
    b.add_argument("--from-dir", type=Path, default=None, metavar="DIR", help="with --image: a root filesystem directory")
    b.add_argument("--size", type=int, default=None, metavar="MiB", help="image size (default: content + margin)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")

    d = sub.add_parser("doctor", help="report what this host offers")
    d.add_argument("--json", action="store_true", help="machine-readable report")

    r = sub.add_parser("run", help="boot a sandbox, run CMD in it, print its output, exit with its code")
    _config_options(r)
    r.add_argument("--timeout", type=float, default=None, help="kill CMD in the guest after this many seconds")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    s = sub.add_parser("start", help="start a detached sandbox that outlives this command; prints its id")
    _config_options(s)
    s.add_argument("--id", dest="sandbox_id", default=None, help="its id (default: a random sb-XXXXXXXX)")
    s.add_argument("--json", action="store_true", help="print id, pid and state as JSON")

    ps = sub.add_parser("ps", help="list detached sandboxes (stale records are reported and removed)")
    ps.add_argument("--json", action="store_true", help="machine-readable list")

    e = sub.add_parser("exec", help="run CMD in a detached sandbox, print its output, exit with its code")
    e.add_argument("sandbox_id", metavar="ID")
    e.add_argument("--timeout", type=float, default=None, help="kill CMD in the guest after this many seconds")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    st = sub.add_parser("stop", help="stop a detached sandbox (guest power-off, then QEMU quit / kill)")
    st.add_argument("sandbox_id", metavar="ID")
    st.add_argument("--force", action="store_true", help="kill QEMU at once instead of powering the guest off")

    f = sub.add_parser("fleet", help="boot a fleet from a TOML spec, run its commands in each, report")
    f.add_argument("spec", type=Path, help="fleet spec (see examples/fleet.toml)")
    f.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    f.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run it on a Ray cluster (ADDRESS or auto; needs vmctl[ray]); shows each member's node")  # fmt: skip

    sub.add_parser("state-diagram", help="print the sandbox state diagram (Mermaid)")
    return p


async def _guest_build(args: argparse.Namespace) -> int:
    if args.debian or args.from_tar is not None or args.from_dir is not None:
        return await _image_build(args)
    if args.packages or args.size is not None:
        print("vmctl guest build: --packages and --size go with --image --debian / --from-tar / --from-dir",
              file=sys.stderr)  # fmt: skip
        return 2
    assets = await ensure_default_assets(rebuild=args.rebuild, image=args.image, kernel=args.kernel)
    if args.json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(assets).items()}))
    else:
        print(f"kernel  {assets.kernel}  ({assets.kernel_package})")
        print(f"initrd  {assets.initrd}  ({len(assets.modules)} modules, {assets.initrd.stat().st_size // 1024} KiB)")
        print(f"shares  {', '.join(sorted(initrd_filesystems(assets.initrd) or ())) or 'none'}")
        if assets.image is not None:
            print(f"image   {assets.image}  (ext4, boot it with the initrd above)")
    return 0


async def _image_build(args: argparse.Namespace) -> int:
    """A root filesystem image with real software, with live progress on stderr (rich)."""
    if not args.image:
        print("vmctl guest build: --debian, --from-tar and --from-dir build an image: add --image", file=sys.stderr)
        return 2
    packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[step]:<9}"), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("the default guest (kernel, initramfs)", step="guest")
        assets = await ensure_default_assets(rebuild=args.rebuild)  # the kernel and initramfs that boot it

        def show(event: ImageProgress) -> None:
            bar.update(task, description=event.message[:100], step=event.step)
            if not console.is_terminal and event.message:
                console.print(f"{event.step}: {event.message}", highlight=False)

        built = await build_image(debian=args.debian, from_tar=args.from_tar, from_dir=args.from_dir,
                                  packages=packages, suite=args.suite, mirror=args.mirror, size_mib=args.size,
                                  rebuild=args.rebuild, progress=show)  # fmt: skip
    if args.json:
        print(json.dumps({**describe(built), "kernel": str(assets.kernel), "initrd": str(assets.initrd)}))
    else:
        how = "from the cache" if built.cached else f"built in {built.build_seconds:.1f} s"
        print(f"image   {built.image}  ({built.source}, {built.size_bytes // (1024 * 1024)} MiB, {how})")
        print(f"kernel  {assets.kernel}")
        print(f"initrd  {assets.initrd}")
        print("boot it with all three: SandboxConfig(kernel=..., initrd=..., image=..., image_overlay=True)")
    return 0


async def _doctor(args: argparse.Namespace) -> int:
    kernel = None
    try:
        kernel = (await ensure_default_assets()).kernel
    except VmctlError:
        pass
    report = await host.report(kernel)
    data = dataclasses.asdict(report)
    jailed = jail.host_status()
    if args.json:
        data["jail"] = {part: {"active": ok, "why": why} for part, (ok, why) in jailed.items()}
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in [*data, *(f"jail {p}" for p in jailed)])
        for key, value in data.items():
            print(f"{key.replace('_', ' '):<{width}}  {value}")
        for part, (ok, why) in jailed.items():  # what each QEMU gets here, or why not
            print(f"{'jail ' + part:<{width}}  {'on' if ok else 'off'}: {why}")
    return 0 if report.qemu_binary else 1


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vcpus", type=int, default=None, help="vCPUs (default 1, or the config file's)")
    parser.add_argument("--memory", type=int, default=None, metavar="MiB",
                        help="memory (default 256, or the config file's)")  # fmt: skip
    parser.add_argument("--config", type=Path, help="TOML file with a [sandbox] table (flags override it)")


async def _config_from(args: argparse.Namespace) -> SandboxConfig:
    overrides: dict[str, Any] = {k: v for k, v in (("vcpus", args.vcpus), ("memory_mib", args.memory)) if v is not None}
    assets = await ensure_default_assets()  # cached: what a table without a kernel means, as in fleet specs
    if args.config is not None:
        config = SandboxConfig.from_toml(args.config, defaults={"kernel": assets.kernel, "initrd": assets.initrd})
        return config.replace(**overrides) if overrides else config
    return SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, **{"vcpus": 1, "memory_mib": 256, **overrides})


def _command(args: argparse.Namespace) -> list[str] | None:
    cmd: list[str] = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print(f"vmctl {args.command}: give a command after --, e.g. vmctl {args.command} "
              f"{'ID ' if args.command == 'exec' else ''}-- uname -a", file=sys.stderr)  # fmt: skip
        return None
    return cmd


async def _run(args: argparse.Namespace) -> int:
    cmd = _command(args)
    if cmd is None:
        return 2
    config = await _config_from(args)
    async with Sandbox(config) as sb:
        result = await sb.exec(cmd, timeout=args.timeout)
    return detachedcli.relay(result, "run", args.timeout)


async def _start(args: argparse.Namespace) -> int:
    return await detachedcli.start(await _config_from(args), args.sandbox_id, args.json)


async def _ps(args: argparse.Namespace) -> int:
    return await detachedcli.ps(args.json)


async def _exec(args: argparse.Namespace) -> int:
    cmd = _command(args)
    if cmd is None:
        return 2
    return await detachedcli.exec_in(args.sandbox_id, cmd, args.timeout)


async def _stop(args: argparse.Namespace) -> int:
    return await detachedcli.stop(args.sandbox_id, args.force)


async def _fleet(args: argparse.Namespace) -> int:
    from vmctl.cli.fleet import run_fleet_command

    return await run_fleet_command(args.spec, as_json=args.json, ray_address=args.ray)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure(json=args.log_json, level=args.log_level)
    handlers = {"guest": _guest_build, "doctor": _doctor, "run": _run, "fleet": _fleet,
                "start": _start, "ps": _ps, "exec": _exec, "stop": _stop}  # fmt: skip
    if args.command == "state-diagram":
        print(state_diagram())
        return 0
    try:
        return anyio.run(handlers[args.command], args)
    except ConfigError as exc:
        print(f"vmctl: {exc}", file=sys.stderr)
        return 2
    except VmctlError as exc:
        print(f"vmctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
