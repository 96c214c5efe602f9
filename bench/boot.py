"""Cold boot to ready: where the time goes, and today's boot against an older vmctl, side by side.

Each sample is one boot in a fresh process, timed inside it: ``new`` is this tree's vmctl,
``old`` the vmctl of ``--old REF`` (default ff3b471, before the fast boot path), unpacked with
``git archive`` into a cache directory, with its own default guest and command line. Variants of
``new`` split the time before the kernel's clock starts: ``new-bzimage`` boots the compressed
bzImage (its decompressor runs in the guest), ``new-qboot`` the unpacked kernel with QEMU's qboot
firmware instead of SeaBIOS. Variants alternate within every round, so drift in machine load
hits them alike; every table prints the load average and the accelerator used.

Breakdown per boot (seconds, host clock from the ``Sandbox`` call): ``qemu`` until QEMU runs the
guest (``cont``), ``pre-kernel`` until the guest kernel's clock starts (host time of the first exec
minus the guest's ``/proc/uptime``), ``to-init`` the kernel's ``Run /init`` (dmesg), ``modules``
init's module loading (new guest only: /run/vmctl-boot-times), ``ready`` the agent's READY.

    python bench/boot.py --rounds 5 [--machines q35,microvm] [--old ff3b471] [--variants new,old,new-bzimage]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
QBOOT = "/usr/share/qemu/qboot.rom"
VARIANTS = ("new", "old", "new-bzimage", "new-qboot")


async def boot_once(machine: str, memory: int, variant: str) -> dict[str, object]:
    """One boot with the vmctl on sys.path; the numbers as a dict (run in a fresh process)."""
    from vmctl import Sandbox, SandboxConfig, guest  # the old or new tree, as PYTHONPATH says

    assets = await guest.ensure_default_assets()
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=memory, machine=machine)
    if variant == "new-qboot":
        config = config.replace(firmware=QBOOT)
    elif variant == "new-bzimage":
        config = config.replace(kernel=getattr(assets, "bzimage", None) or assets.kernel)
    started = time.perf_counter()
    async with Sandbox(config) as sb:
        ready = time.perf_counter() - started
        sent = time.perf_counter() - started
        result = await sb.exec(["sh", "-c", "cat /proc/uptime /run/vmctl-boot-times 2>/dev/null; dmesg"])
        answered = time.perf_counter() - started
        hv = getattr(sb, "_hv", None)
        timings = dict(getattr(hv, "startup_timings", {}))
        accel = sb.config.accel
    text = result.stdout.decode(errors="replace")
    uptime = float(text.split()[0])
    kernel_start = (sent + answered) / 2 - uptime
    run_init = re.search(r"\[\s*([0-9.]+)\] Run /init", text)
    init = re.search(r"init=([0-9.]+) modules=([0-9.]+)", text)
    to_init = float(run_init.group(1)) if run_init else None
    out: dict[str, object] = {"ready": ready, "pre_kernel": kernel_start, "to_init": to_init, "accel": accel,
                              "qemu": timings.get("cont"), "timings": timings}  # fmt: skip
    if init:
        out["modules"] = float(init.group(2)) - float(init.group(1))
    return out


def old_tree(ref: str) -> Path:
    """``ref``'s files (git archive), unpacked once into bench/results/tree-REF."""
    target = RESULTS / f"tree-{ref}"
    if not (target / "vmctl" / "__init__.py").is_file():
        blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "vmctl"], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(blob)) as tar:
            tar.extractall(target, filter="data")
    return target


def sample(tree: Path, machine: str, memory: int, variant: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, __file__, "--one", machine, str(memory), variant], env=env,
                          capture_output=True, text=True, cwd=tree, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} {machine} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(rounds: int, memory: int, machines: list[str], old: str, variants: list[str]) -> None:
    trees = {v: (old_tree(old) if v == "old" else REPO) for v in variants}
    samples: dict[str, list[dict[str, object]]] = {}
    loads = [os.getloadavg()]
    for i in range(rounds):
        for machine in machines:
            chosen = [v for v in variants if machine == "q35" or not v.startswith("new-")]
            for variant in chosen if i % 2 == 0 else reversed(chosen):
                s = sample(trees[variant], machine, memory, variant)
                samples.setdefault(f"{variant} {machine}", []).append(s)
                print(f"  round {i + 1} {variant:12} {machine:8} ready {s['ready']:.2f}s", flush=True)
        loads.append(os.getloadavg())
    accel = sorted({str(s["accel"]) for ss in samples.values() for s in ss})
    load = f"load average {min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f} (1 min)"
    print(f"\ncold boot to ready, p50 of {rounds} rounds (seconds), accel {','.join(accel)}, {memory} MiB, {load}")
    cols = ("qemu", "pre_kernel", "to_init", "modules", "ready")
    print(f"{'':22}" + "".join(f"{c:>11}" for c in cols) + f"{'init→ready':>11}")
    table: dict[str, dict[str, float]] = {}
    for name, ss in samples.items():
        row = {c: p50([float(s[c]) for s in ss if s.get(c) is not None]) for c in cols}  # type: ignore[arg-type]
        row["init_to_ready"] = p50([float(s["ready"]) - float(s["pre_kernel"]) - float(s["to_init"])  # type: ignore[arg-type]
                                    for s in ss if s.get("to_init") is not None])  # fmt: skip
        table[name] = row
        print(f"{name:22}" + "".join(f"{row[c]:11.3f}" for c in cols) + f"{row['init_to_ready']:11.3f}")
    ratios = {}
    for machine in machines:
        if f"old {machine}" in table and f"new {machine}" in table:
            ratios[machine] = table[f"new {machine}"]["ready"] / table[f"old {machine}"]["ready"]
            print(f"new / old ({old}), {machine}, ready p50: {ratios[machine]:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"boot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "memory_mib": memory,
                               "old": old, "accel": accel, "loadavg": loads, "samples": samples,
                               "p50": table, "ratio_new_old": ratios}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        import anyio

        print(json.dumps(anyio.run(boot_once, sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--machines", default="q35,microvm", help="comma-separated machine types")
    parser.add_argument("--old", default="ff3b471", help="git ref of the vmctl to compare with")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    main(args.rounds, args.memory, args.machines.split(","), args.old, args.variants.split(","))
