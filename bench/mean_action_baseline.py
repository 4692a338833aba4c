"""How much better than predicting the mean action is a trained run?

    python bench/mean_action_baseline.py RUN_DIR [RUN_DIR ...]

For each run folder: the validation loss of the constant predictor that outputs the
training split's mean normalized arm action and mean gripper state at every step (Huber
on the arm plus arm_gripper_loss_ratio x gripper BCE, masked, as the continuous heads
compute it), next to the run's final validation loss and its closed-loop success
(eval.json), so that the gap between a policy and the mean predictor is a number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import robovla
from robovla import losses
from robovla.config import resolve
from robovla.data import open_dataset
from robovla.windows import WindowDataset


def mean_predictor_loss(run_dir: Path) -> dict[str, float]:
    run = resolve("none", run_dir / "config.toml", [])
    space = robovla.create("action_space", run.action_space.name, run.action_space.config)
    space.load_state_dict(json.loads((run_dir / "action_stats.json").read_text()))
    t, head = run.train, run.head.config
    train = WindowDataset(open_dataset(run, "train"), space, t.window, t.chunk)
    val = WindowDataset(open_dataset(run, "val"), space, t.window, t.chunk)
    step = max(1, len(train) // 2000)
    targets = np.stack([train[i].actions[0, 0] for i in range(0, len(train), step)])  # [n, A]
    mean = torch.from_numpy(targets.mean(0))
    actions = torch.from_numpy(np.stack([val[i].actions for i in range(len(val))]))  # [N, T, C, A]
    mask = torch.from_numpy(np.stack([val[i].action_mask for i in range(len(val))]))
    arm = mean[:-1].expand(*actions.shape[:-1], -1)
    p_open = mean[-1].clamp(1e-6, 1 - 1e-6)
    logits = torch.log(p_open / (1 - p_open)).expand(*actions.shape[:-1], 1)
    arm_loss = losses.arm_regression(arm, actions, mask, getattr(head, "arm_loss", "huber"))
    gripper_loss = losses.gripper_bce(logits, actions, mask)
    ratio = getattr(head, "arm_gripper_loss_ratio", 0.01)
    return {"loss": float(arm_loss + ratio * gripper_loss), "arm_loss": float(arm_loss),
            "gripper_loss": float(gripper_loss)}


def final_val(run_dir: Path) -> dict[str, float]:
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    last = max((int(s) for s, split, _, _ in rows if split == "val"), default=None)
    return {k: float(v) for s, split, k, v in rows if split == "val" and int(s) == last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (runs/<name>)")
    args = parser.parse_args()
    print(f"{'run':<24} {'val loss':>9} {'mean pred.':>10} {'ratio':>7} {'arm loss':>9} {'mean arm':>9} {'success':>8}")
    for run_dir in args.runs:
        base, got = mean_predictor_loss(run_dir), final_val(run_dir)
        report = run_dir / "eval.json"
        success = f"{100 * json.loads(report.read_text())['success_rate']:.0f}%" if report.is_file() else "-"
        print(f"{run_dir.name:<24} {got.get('loss', float('nan')):>9.4f} {base['loss']:>10.4f} "
              f"{got.get('loss', float('nan')) / base['loss']:>7.3f} {got.get('arm_loss', float('nan')):>9.4f} "
              f"{base['arm_loss']:>9.4f} {success:>8}")


if __name__ == "__main__":
    main()
