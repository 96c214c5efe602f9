"""Template clones: start to first answer (alone and N at once) and QEMU PSS per clone, against an
older vmctl in the same run.

Every sample is a fresh process running one vmctl tree (``new``: this one; ``old``: ``--old REF``,
unpacked by bench/boot.py): it boots a template (q35, 256 MiB), then starts clones: ``--alone``
times one at a time, then ``--at-once`` together, then ``--pss-clones`` together and reads each
clone QEMU's ``Pss`` from /proc/PID/smaps_rollup while all of them run. The trees alternate from
round to round. Times are from the ``Sandbox`` call until the clone answered its first exec; the
new tree also reports its start-up steps (QEMU spawned, QMP, agent connected, device state
loaded, ``cont``, agent ping) as seconds after spawn.

    python bench/clones.py --rounds 2 [--old ff3b471] [--alone 5] [--at-once 4] [--pss-clones 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot import REPO, RESULTS, old_tree  # noqa: E402

CLONES_DIR = Path(os.environ.get("XDG_RUNTIME_DIR") or "/dev/shm")


async def clones_once(alone: int, at_once: int, pss_clones: int, extra: dict[str, Any]) -> dict[str, Any]:
    import anyio

    from vmctl import Sandbox, SandboxConfig, guest

    assets = await guest.ensure_default_assets()
    work = Path(tempfile.mkdtemp(prefix="bench-clones-", dir=CLONES_DIR))
    paths = {"memory_path": work / "tpl.mem", "devices_state_path": work / "tpl.state"}
    base = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256, **extra)
    try:
        t = time.perf_counter()
        async with Sandbox(base.replace(boot_to_be_template=True, **paths)) as template:
            template_s = time.perf_counter() - t  # a cold boot, plus saving the device state
            template_pss = _pss_mib(template.pid)  # a cold-booted guest's QEMU (its RAM is the shared file)
        clone_cfg = base.replace(boot_from_template=True, **paths)

        async def clone_until_answer(out: list[dict[str, Any]], hold: anyio.Event | None = None,
                                     pss: list[float] | None = None, all_up: list[int] | None = None) -> None:  # fmt: skip
            started = time.perf_counter()
            async with Sandbox(clone_cfg) as sb:
                entered = time.perf_counter()
                await sb.exec(["true"])
                answered = time.perf_counter() - started
                steps = dict(getattr(getattr(sb, "_hv", None), "startup_timings", {}))
                if steps:  # the first exec, as a step after spawn too
                    steps["exec_answered"] = round(steps.get("ready", 0.0) + answered - (entered - started), 4)
                out.append({"answer": answered, "steps": steps, "accel": sb.config.accel,
                            "tb": await _translated_blocks(sb)})  # fmt: skip
                if hold is not None and pss is not None and all_up is not None:
                    all_up.append(1)
                    if len(all_up) == pss_clones:
                        hold.set()
                    await hold.wait()
                    pss.append(_pss_mib(sb.pid))
                    all_up.append(1)
                    while len(all_up) < 2 * pss_clones:  # noqa: ASYNC110  (every clone is measured while all run)
                        await anyio.sleep(0.05)

        single: list[dict[str, Any]] = []
        for _ in range(alone):
            await clone_until_answer(single)
        together: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(at_once):
                tg.start_soon(clone_until_answer, together)
        pss: list[float] = []
        hold = anyio.Event()
        up: list[int] = []
        async with anyio.create_task_group() as tg:
            for _ in range(pss_clones):
                tg.start_soon(clone_until_answer, [], hold, pss, up)
        return {"template_s": template_s, "template_pss_mib": template_pss, "alone": single, "at_once": together, "pss_mib": pss,
                "accel": single[0]["accel"] if single else None}  # fmt: skip
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


async def _translated_blocks(sb: Any) -> int | None:
    """TCG translation blocks made so far in this clone's QEMU (``info jit``), if it tells."""
    qmp = getattr(getattr(sb, "_hv", None), "qmp", None)
    if qmp is None or sb.config.accel != "tcg":
        return None
    out = await qmp.execute("human-monitor-command", {"command-line": "info jit"})
    for line in str(out).splitlines():
        if line.startswith("TB count"):
            return int(line.split()[-1])
    return None


def _pss_mib(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample(tree: Path, alone: int, at_once: int, pss_clones: int, extra: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, __file__, "--one", str(alone), str(at_once), str(pss_clones), json.dumps(extra)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tree, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"clones in {tree} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(rounds: int, old: str, alone: int, at_once: int, pss_clones: int, variants: list[str],
         tb_sizes: list[int]) -> None:  # fmt: skip
    trees = {"new": REPO, "old": old_tree(old)}
    runs: list[tuple[str, dict[str, Any]]] = [(v, {}) for v in variants]
    runs += [(f"new tb={n}", {"tcg_tb_size_mib": n}) for n in tb_sizes]
    samples: dict[str, list[dict[str, Any]]] = {}
    loads = [os.getloadavg()]
    for i in range(rounds):
        for name, extra in runs if i % 2 == 0 else list(reversed(runs)):
            s = sample(trees[name.split()[0]], alone, at_once, pss_clones, extra)
            samples.setdefault(name, []).append(s)
            print(f"  round {i + 1} {name:12} alone {med([c['answer'] for c in s['alone']]):.3f}s "
                  f"{at_once} at once {med([c['answer'] for c in s['at_once']]):.3f}s "
                  f"PSS {med(s['pss_mib']):.1f} MiB", flush=True)  # fmt: skip
        loads.append(os.getloadavg())
    accel = sorted({str(s["accel"]) for ss in samples.values() for s in ss})
    load = f"load average {min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f} (1 min)"
    print(f"\ntemplate clones, {rounds} rounds, accel {','.join(accel)}, 256 MiB, {load}")
    print(f"{'':14}{'alone p50':>11}{f'{at_once} at once p50':>16}{f'{at_once} at once max':>16}"
          f"{f'PSS/clone ({pss_clones})':>17}{'template s':>11}{'tpl PSS':>9}")  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for name, ss in samples.items():
        row = {
            "alone": med([c["answer"] for s in ss for c in s["alone"]]),
            "at_once": med([c["answer"] for s in ss for c in s["at_once"]]),
            "at_once_max": med([max(c["answer"] for c in s["at_once"]) for s in ss if s["at_once"]]),
            "pss": med([p for s in ss for p in s["pss_mib"]]),
            "template": med([s["template_s"] for s in ss]),
            "template_pss": med([s["template_pss_mib"] for s in ss]),
        }
        table[name] = row
        print(f"{name:14}{row['alone']:11.3f}{row['at_once']:16.3f}{row['at_once_max']:16.3f}{row['pss']:17.1f}"
              f"{row['template']:11.2f}{row['template_pss']:9.1f}")  # fmt: skip
    if "new" in samples:
        keys = sorted({k for s in samples["new"] for c in s["alone"] for k in c["steps"]},
                      key=lambda k: med([c["steps"].get(k, 0) for s in samples["new"] for c in s["alone"]]))  # fmt: skip
        print("new, alone, steps after spawn (p50 s): " + ", ".join(
            f"{k} {med([c['steps'][k] for s in samples['new'] for c in s['alone'] if k in c['steps']]):.3f}"
            for k in keys))  # fmt: skip
        tbs = [c["tb"] for s in samples["new"] for c in s["alone"] if c.get("tb")]
        if tbs:
            print(f"new, alone, TCG blocks translated by the first answer (p50): {med(tbs):.0f}")
    ratios = {}
    if "new" in table and "old" in table:
        ratios = {k: table["new"][k] / table["old"][k] for k in ("alone", "at_once", "pss")}
        print(f"new / old ({old}): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"clones-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "old": old,
                               "accel": accel, "loadavg": loads, "samples": samples, "p50": table,
                               "ratio_new_old": ratios}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        import anyio

        result = anyio.run(clones_once, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
        print(json.dumps(result))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old", default="ff3b471", help="git ref of the vmctl to compare with")
    parser.add_argument("--alone", type=int, default=5, help="clones started one at a time")
    parser.add_argument("--at-once", type=int, default=4)
    parser.add_argument("--pss-clones", type=int, default=8, help="clones running together for the PSS figure")
    parser.add_argument("--variants", default="new,old")
    parser.add_argument("--tb-sizes", default="", help="also run the new tree with these tcg_tb_size_mib values")
    args = parser.parse_args()
    sizes = [int(n) for n in args.tb_sizes.split(",") if n]
    main(args.rounds, args.old, args.alone, args.at_once, args.pss_clones, args.variants.split(","), sizes)
