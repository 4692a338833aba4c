"""Time per training step of the demo run, end to end (loader, model, optimizer, logging),
for variants measured side by side in one invocation.

    python bench/train_loop.py [--steps 300] [--rounds 3] [--against PATH] [--lerobot] [--json]

Each variant trains the demo preset (``robo-run --preset demo``: cnn-pool + LSTM on the
synthetic reach task, 2 CPU threads) for ``--steps`` steps without validation, evaluation
or intermediate checkpoints, in a fresh process; the time is the run's own ``train_seconds``
(from the first step to the final checkpoint) over its steps. Variants alternate round by
round, each round starting with the next (A B C, B C A, C A B, ...), so that machine noise
and order effects hit all alike; the median of the
rounds is reported, with its ratio to this tree.

Variants:
  this tree        the robovla this script belongs to
  fresh batches    the same, with the batch ring off: every batch written into fresh
                   memory, as when torch lacks the storage use count (robovla.batch_ring)
  --against PATH   another robovla checkout (its core/ and plugins/ imported instead),
                   e.g. a worktree of an earlier commit
  --lerobot        the same episodes as a LeRobotDataset (robo-run data export --to lerobot,
                   AV1 videos), trained through --dataset lerobot --action-space continuous
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = """
import sys
{setup}
from robovla.cli import main
sys.exit(main(sys.argv[1:]))
"""
FRESH = "import robovla.batch_ring as ring; ring._USE_COUNT = None"


def shim(folder: Path, checkout: Path) -> Path:
    """A folder that imports ``checkout``'s core/ as robovla and plugins/ as robovla_plugins."""
    folder.mkdir()
    (folder / "robovla").symlink_to(checkout.resolve() / "core")
    (folder / "robovla_plugins").symlink_to(checkout.resolve() / "plugins")
    return folder


def seconds_per_step(code: str, steps: int, out: Path, name: str, env: dict[str, str],
                     extra: tuple[str, ...] = ()) -> float:
    argv = ["--preset", "demo", "--train.max_steps", str(steps), "--train.val_path", "none", "--train.eval_env",
            "none", "--train.checkpoint_every", str(10 * steps), "--train.output_dir", str(out),
            "--train.run_name", name, *extra]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    state = json.loads((out / name / "checkpoints" / "last" / "state.json").read_text())
    return state["train_seconds"] / state["step"]


def lerobot_copy(out: Path) -> tuple[str, ...]:
    """The demo's training split (written first if needed) exported as a LeRobotDataset into
    ``out``; the flags that train the demo recipe on it."""
    import robovla
    from robovla import registry_file
    from robovla_plugins.datasets.lerobot.export import export

    config = {k: v for k, v in registry_file.preset("demo")["dataset"].items() if k != "name"}
    export(robovla.create("dataset", "calvin", config), out, progress=False)
    return ("--dataset", "lerobot", "--dataset.path", str(out), "--dataset.cameras", "gripper", "--action-space",
            "continuous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every variant (default 3)")
    parser.add_argument("--against", type=Path, default=None, help="another robovla checkout to compare with")
    parser.add_argument("--lerobot", action="store_true", help="also train on a LeRobotDataset copy of the episodes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # every variant imports its robovla the same way, from a folder on PYTHONPATH: an
        # editable install's import hooks alone shift these times by a few percent
        mine = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(shim(Path(tmp) / "this", ROOT))}
        variants = {"this tree": (RUN.format(setup=""), mine, ()), "fresh batches": (RUN.format(setup=FRESH), mine, ())}
        if args.against is not None:
            other = {**mine, "PYTHONPATH": str(shim(Path(tmp) / "other", args.against))}
            variants[f"{args.against}"] = (RUN.format(setup=""), other, ())
        if args.lerobot:
            variants["lerobot dataset"] = (RUN.format(setup=""), mine, lerobot_copy(Path(tmp) / "lerobot"))
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for i in range(len(names)):  # each round starts with the next variant: no variant always goes first
                name = names[(r + i) % len(names)]
                code, variant_env, extra = variants[name]
                times[name].append(seconds_per_step(code, args.steps, Path(tmp), f"r{r}-v{i}", variant_env, extra))
                print(f"round {r + 1}/{args.rounds} {name}: {1000 * times[name][-1]:.2f} ms/step", file=sys.stderr)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["this tree"]
    if args.json:
        print(json.dumps({name: {"ms_per_step": 1000 * m, "ratio": m / base, "rounds_ms": [1000 * t for t in
                                                                                           times[name]]}
                          for name, m in median.items()}, indent=2))
        return
    print(f"demo training, {args.steps} steps, median of {args.rounds} rounds")
    for name, m in median.items():
        print(f"  {name:<40} {1000 * m:8.2f} ms/step   x{m / base:.3f} of this tree")


if __name__ == "__main__":
    main()
