"""Closed-loop evaluation throughput against the number of envs: worker processes, envs in one
process, and ``--shard`` processes, measured side by side in one invocation.

    python bench/eval_envs.py [--run RUN] [--env synthetic] [--env.FIELD VALUE ...]
                              [--protocol long-horizon|episodes] [--sequences 32] [--steps 20]
                              [--n 1,2,4] [--rounds 2] [--json]

The policy is a demo run (``robo-run --preset demo``) trained for ``--train-steps`` steps
into a temporary folder, or the run ``--run`` names. Every variant is one complete
``robo-run eval --closed-loop`` of the same ``--sequences`` long-horizon chains with
``--steps`` env steps per subtask, or as many single-task episodes of at most ``--steps``
steps (a fresh process, its startup included: loading the policy, spawning workers), on
the CPU:

  process N   --envs N --workers process: N worker processes stepped in lockstep, one
              batched policy call per control step in the main process
  inline N    --envs N --workers inline: the N envs in the main process (only for envs
              that declare themselves safe in-process, e.g. synthetic)
  shards N    N processes at once, each ``--shard I/N`` with one env (the way to spread an
              evaluation over machines), their wall time until the last one ends

Reported per variant (medians of the rounds): wall seconds of the whole command, seconds in
the closed loop alone (as ``robo-run eval`` prints it; a shard variant's slowest shard),
env steps (from the reports), env steps per second of each with its ratio to the first
variant, and chains per second of wall time. Shard processes run with OMP_NUM_THREADS=1,
one core each, as docs/calvin-eval.md runs them.
Variants alternate round by round (each round starts with the next one), so that machine
noise hits all alike. For CALVIN's simulator, run this with the Python that has calvin_env
(docs/calvin-eval.md) and pass ``--env calvin --env.path /data/task_D_D/validation``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_run import CLI, train_demo


def commands(variant: tuple[str, int], base: list[str], out: Path) -> list[list[str]]:
    kind, n = variant
    if kind == "shards":
        return [[*base, "--shard", f"{i}/{n}", "--out", str(out / f"shard-{i}")] for i in range(n)]
    return [[*base, "--envs", str(n), "--workers", kind, "--out", str(out)]]


def measure(variant: tuple[str, int], base: list[str], out: Path,
            env: dict[str, str]) -> tuple[float, float, int, int]:
    """(wall seconds, seconds in the closed loop (the slowest shard's), env steps, chains) of one
    complete evaluation of ``variant``."""
    if variant[0] == "shards":
        env = {**env, "OMP_NUM_THREADS": "1"}  # one core each, as docs/calvin-eval.md runs shards
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CLI, *argv], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for argv in commands(variant, base, out)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    loop = 0.0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise SystemExit(f"{variant}: robo-run eval failed:\n{err[-3000:]}")
        found = re.search(r"env steps in ([0-9.]+) s", err)
        loop = max(loop, float(found.group(1)) if found else float("nan"))
    steps = chains = 0
    for report in [*out.rglob("long_horizon*.json"), *out.rglob("episodes.json")]:
        results = json.loads(report.read_text())["results"]
        steps += sum(sum(r["steps"]) if isinstance(r["steps"], list) else r["steps"] for r in results)
        chains += len(results)
    return wall, loop, steps, chains


def main() -> None:
    argv, env_flags = [], []
    raw = sys.argv[1:]
    while raw:
        token = raw.pop(0)
        if token.startswith("--env."):
            env_flags += [token] + ([raw.pop(0)] if "=" not in token and raw else [])
        else:
            argv.append(token)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="the run to evaluate (default: train a demo run)")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--env", default="synthetic")
    p.add_argument("--protocol", choices=("long-horizon", "episodes"), default="long-horizon")
    p.add_argument("--sequences", type=int, default=32, help="chains (long-horizon) or episodes to run")
    p.add_argument("--steps", type=int, default=20, help="env steps per subtask")
    p.add_argument("--n", default="1,2,4", help="numbers of envs, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.n.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    from robovla.registry import get_component

    safe = get_component("env", args.env).load().safe_in_process
    long = args.protocol == "long-horizon"
    variants = [("process", n) for n in ns] + [("inline", n) for n in ns if safe]
    variants += [("shards", n) for n in ns if n > 1 and long]  # shards split chains only
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_demo(Path(tmp) / "runs", args.train_steps, env)
        count = ["--sequences", str(args.sequences)] if long else \
            ["--protocol", "episodes", "--episodes", str(args.sequences)]
        base = ["eval", "--run", str(run), "--closed-loop", "--env", args.env, *env_flags, *count, "--steps",
                str(args.steps), "--no-progress", "--overwrite"]
        measured: dict[tuple[str, int], list[tuple[float, float, int, int]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for variant in order:
                out = Path(tmp) / f"{variant[0]}-{variant[1]}-{r}"
                measured[variant].append(measure(variant, base, out, env))
                print(f"round {r + 1}: {variant[0]} {variant[1]}: {measured[variant][-1][0]:.1f} s "
                      f"({measured[variant][-1][1]:.1f} s in the loop)", file=sys.stderr)
    rows = []
    for variant, values in measured.items():
        wall, loop = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        steps, chains = values[0][2], values[0][3]
        rows.append({"variant": f"{variant[0]} {variant[1]}", "wall_s": wall, "loop_s": loop, "env_steps": steps,
                     "steps_per_s": steps / wall, "loop_steps_per_s": steps / loop, "chains_per_s": chains / wall})
    first, first_loop = rows[0]["steps_per_s"], rows[0]["loop_steps_per_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    unit = "chains" if long else "episodes"
    print(f"{args.env}: {args.sequences} {unit}, {args.steps} steps per {'subtask' if long else 'episode'}, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print("wall: the whole command (startup included); loop: the closed loop alone (the slowest shard's)")
    print(f"{'variant':<12} {'wall s':>7} {'loop s':>7} {'env steps':>10} {'steps/s':>8} {'x':>5} "
          f"{'loop steps/s':>13} {'x':>5} {unit + '/s':>11}")
    for row in rows:
        print(f"{row['variant']:<12} {row['wall_s']:>7.1f} {row['loop_s']:>7.1f} {row['env_steps']:>10} "
              f"{row['steps_per_s']:>8.1f} {row['steps_per_s'] / first:>5.2f} {row['loop_steps_per_s']:>13.1f} "
              f"{row['loop_steps_per_s'] / first_loop:>5.2f} {row['chains_per_s']:>11.2f}")


if __name__ == "__main__":
    main()
