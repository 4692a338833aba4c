"""``robo-run eval``: a trained run, offline on a validation split and closed loop in an Env.

    robo-run eval --run RUN_DIR [--checkpoint NAME] [--offline | --closed-loop]
        offline:     [--split PATH] [--batches N] [--batch-size N]
        closed loop: [--env NAME] [--env.FIELD VALUE ...] [--protocol long-horizon|episodes]
                     [--sequences N] [--shard I/N] [--episodes N] [--steps N] [--envs N]
                     [--workers auto|process|inline] [--resume | --overwrite] [--record N]
                     [--execute POLICY] [--seed S]
        [--device cpu|cuda] [--out DIR] [--no-progress]
    robo-run eval --merge long_horizon-shard-*.json [--out DIR]

Without --offline or --closed-loop both run where they can: offline when the run has a
validation split, closed loop when an env is named (or the run was trained with
``--train.eval_env``). Reports go to ``RUN_DIR/eval/<checkpoint>/`` (``--out``): per part
a JSON file and a PNG chart, and a table printed on the terminal. Closed loop, ``--envs N``
envs run side by side, each in its own worker process unless the env is safe in-process
(robovla.env_workers); every finished chain is written down at once (``*.jsonl``), so
``--resume`` continues an interrupted evaluation (robovla.eval_log); ``--record N`` films
the first N chains (robovla.videos). ``--shard I/N`` runs chains I, I+N, I+2N, ... (one
process each, e.g. one per machine); ``--merge`` combines their reports into the report of
all chains.

Offline metrics (shape letters: B batch, T window, C chunk, A action dim): the head's
loss, and over every unmasked (window step, chunk position) the arm error per dimension
in normalized units (L1 and squared) and the gripper accuracy (P(open) >= 0.5 against the
target), overall and per task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from robovla.errors import ConfigError, RobovlaError

ARM = ("x", "y", "z", "roll", "pitch", "yaw")


# ------------------------------------------------------------------------------ offline


def offline(policy: Any, run: Any, split: Path | None = None, batches: int | None = None, batch_size: int = 8,
            progress: bool = True) -> dict[str, Any]:
    """Offline metrics of ``policy``'s model on the validation windows of ``run`` (a
    RunConfig; the split: ``split`` or the run's validation folder)."""
    import torch
    from tqdm import tqdm

    from robovla.data import open_dataset
    from robovla.loader import Preprocess, make_loader
    from robovla.losses import action_errors
    from robovla.windows import WindowDataset

    # the given split, or the run's (the sibling validation/ folder also when training skipped it)
    val_path = str(split) if split is not None else run.train.val_path if run.train.val_path != "none" else "auto"
    run = run._replace(train=run.train.model_copy(update={"val_path": val_path}))
    if split is not None and not Path(split).expanduser().is_dir():
        raise RobovlaError(f"--split {split}: no such folder; give a dataset split folder (e.g. .../validation)")
    data = open_dataset(run, "val")
    if data is None:
        raise RobovlaError(f"no validation split: {dict(run.dataset.config).get('path')} has no sibling "
                           "validation/ folder; pass --split PATH")
    vla, t = policy.vla, run.train
    windows = WindowDataset(data, policy.action_space, t.window, t.chunk)
    if len(windows) == 0:
        raise RobovlaError(f"the validation split has no windows of {t.window} frames")
    loader = make_loader(windows, batch_size, preprocess=Preprocess.for_backbone(vla.backbone, train=False),
                         shuffle=False, num_workers=0, drop_last=False)
    tasks = [windows.segments[int(s)].task or "(none)" for s in windows.index[:, 0]]
    sums: dict[str, dict[str, np.ndarray]] = defaultdict(lambda: defaultdict(float))
    losses, seen = [], 0
    device = vla.lrn.device
    sampling = torch.Generator(device=device).manual_seed(t.seed)
    total = len(loader) if batches is None else min(batches, len(loader))
    with torch.no_grad():
        for i, batch in enumerate(tqdm(loader, total=total, desc="offline", unit="batch", disable=not progress)):
            if i >= total:
                break
            batch = batch.to(device)
            prediction = vla(batch)
            loss, _ = vla.head.loss(prediction, batch.actions, batch.action_mask)
            losses.append((float(loss), len(batch.instruction)))
            actions = vla.head.actions(prediction, generator=sampling)  # [B, T, C, A]
            per_window = action_errors(actions, batch.actions, batch.action_mask)  # each [B] or [B, A-1]
            per_window = {k: v.cpu().numpy().astype(np.float64) for k, v in per_window.items()}
            for b in range(len(batch.instruction)):
                for key in ("all", tasks[seen + b]):
                    s = sums[key]
                    s["windows"] += 1
                    for k, v in per_window.items():
                        s[k] = s[k] + v[b]
            seen += len(batch.instruction)

    def metrics(s: dict[str, Any]) -> dict[str, Any]:
        n = max(s["count"], 1.0)
        l1, sq = np.broadcast_to(s["l1"], 6) / n, np.broadcast_to(s["sq"], 6) / n
        return {"windows": int(s["windows"]), "arm_l1": float(l1.mean()), "arm_mse": float(sq.mean()),
                "gripper_acc": float(s["right"] / n), "arm_l1_per_dim": dict(zip(ARM, map(float, l1))),
                "arm_mse_per_dim": dict(zip(ARM, map(float, sq)))}

    overall = metrics(sums.pop("all"))
    return {"split": str(data.config.path),
            "loss": float(sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))),
            **overall, "per_task": {task: metrics(s) for task, s in sorted(sums.items())}}


def offline_chart(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """A PNG: the arm L1 per dimension, and the arm L1 and gripper accuracy per task."""
    from robovla.eval_report import report_figure, save_figure

    tasks = sorted(report["per_task"], key=lambda k: report["per_task"][k]["arm_l1"])
    fig, ax, bx = report_figure(len(tasks))
    dims = report["arm_l1_per_dim"]
    bars = ax.bar(list(dims), list(dims.values()), color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("masked L1 (normalized units)")
    ax.set_title(f"arm L1 per dimension; gripper accuracy {100 * report['gripper_acc']:.1f}% "
                 f"({report['windows']} windows)", fontsize=10)
    hb = bx.barh(tasks, [report["per_task"][k]["arm_l1"] for k in tasks], color="#55a868")
    bx.bar_label(hb, labels=[f"grip {100 * report['per_task'][k]['gripper_acc']:.0f}%, "
                             f"{report['per_task'][k]['windows']} win" for k in tasks], fontsize=8, padding=2)
    bx.set_xlabel("arm L1 per task")
    bx.margins(x=0.35)
    return save_figure(fig, path, title)


def offline_table(report: dict[str, Any]) -> str:
    dims = "  ".join(f"{k} {v:.4f}" for k, v in report["arm_l1_per_dim"].items())
    lines = [f"{report['windows']} validation windows from {report['split']}",
             f"loss {report['loss']:.4f}  arm L1 {report['arm_l1']:.4f}  arm MSE {report['arm_mse']:.4f}  "
             f"gripper accuracy {100 * report['gripper_acc']:.1f}%", f"arm L1 per dimension: {dims}", "",
             f"{'task':<32} {'windows':>8} {'arm L1':>8} {'gripper':>8}"]
    lines += [f"{k:<32} {v['windows']:>8} {v['arm_l1']:>8.4f} {100 * v['gripper_acc']:>7.1f}%"
              for k, v in report["per_task"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------- command line


CHECKPOINT_HELP = ("a checkpoint of RUN: a name under RUN/checkpoints (e.g. step-000500) or a folder inside it "
                   "(default: last); another run's checkpoint needs --run of that run")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="robo-run eval", description="Evaluate a trained run: offline metrics on a validation split and "
        "closed-loop control in an env (CALVIN's long-horizon protocol, or single-task episodes). Env fields: "
        "--env.FIELD VALUE.")
    p.add_argument("--run", type=Path, help="the run folder (runs/<name>), an exported one, or a Hugging Face hub "
                   "repo id (owner/name; downloaded, reports then go to eval/owner/name/<checkpoint>)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="REPORT",
                   help="merge the long-horizon reports of shards (--shard) into one, instead of evaluating")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--offline", action="store_true", help="only the offline metrics")
    what.add_argument("--closed-loop", action="store_true", help="only the closed-loop evaluation")
    p.add_argument("--split", type=Path, default=None, help="offline: the split (default: the run's validation/)")
    p.add_argument("--batches", type=int, default=None, help="offline: at most this many batches (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="offline: windows per batch (default 8)")
    p.add_argument("--env", default=None, help="closed loop: the env plugin (default: the run's --train.eval_env)")
    p.add_argument("--protocol", choices=("long-horizon", "episodes"), default="long-horizon",
                   help="closed loop: CALVIN's chains of subtasks (default), or single-task episodes")
    p.add_argument("--sequences", type=int, default=1000, help="long-horizon: chains to run (default 1000)")
    p.add_argument("--shard", default=None, help="long-horizon: I/N runs chains I, I+N, I+2N, ... (0 <= I < N)")
    p.add_argument("--episodes", type=int, default=100, help="episodes: episodes to run (default 100)")
    p.add_argument("--steps", type=int, default=None, help="env steps per (sub)task (default: the env's max_steps)")
    p.add_argument("--envs", type=int, default=1, help="envs run side by side, stepped as one batch (default 1)")
    p.add_argument("--workers", choices=("auto", "process", "inline"), default="auto",
                   help="where the envs run: each in its own worker process (process), all in this one (inline), "
                        "or auto (default): inline only for envs that declare themselves safe in-process")
    p.add_argument("--env-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="envs in worker processes: a worker that takes longer for one call (reset, start a task, "
                        "step) is stopped and its chain re-run (default 300; building an env may take 600)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the interrupted evaluation in the report "
                                                             "folder (its .jsonl) with the same flags")
    again.add_argument("--overwrite", action="store_true", help="start over even where an evaluation did not end")
    p.add_argument("--record", type=int, default=0, metavar="N",
                   help="write the first N chains (episodes) as MP4 videos into OUT/videos (needs robovla[video])")
    p.add_argument("--execute", default="first", help="action-chunk execution: first (default), chunk:K, "
                                                      "ensemble[:M]")
    p.add_argument("--seed", type=int, default=None, help="seed of sampling heads and episodes "
                                                          "(default: the run's --train.eval_seed)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="(default 32-true)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default RUN/eval/<checkpoint>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    from robovla import config as cfg
    from robovla import rollout
    from robovla.checkpoint import run_config
    from robovla.closed_loop import closed_loop, env_spec, merge
    from robovla.flags import section_flags
    from robovla.sharing import local_folder

    argv, env_fields = section_flags(argv, "env")
    args = parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.run is None:
        raise ConfigError(["--run RUN_DIR: the run to evaluate (or --merge REPORT ... to merge shard reports)"],
                          header="cannot evaluate")
    shard = parse_shard(args.shard)
    for flag, value in (("--envs", args.envs), ("--sequences", args.sequences), ("--episodes", args.episodes),
                        ("--batch-size", args.batch_size), ("--batches", args.batches), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ConfigError([f"{flag}: must be >= 1, got {value}"], header="invalid arguments")
    if args.record < 0 or not args.env_timeout > 0:
        raise ConfigError([f"--record {args.record}: must be >= 0" if args.record < 0 else
                           f"--env-timeout {args.env_timeout}: must be > 0 seconds"], header="invalid arguments")
    source, args.run = args.run, local_folder(args.run, "--run")  # a hub repo id: its files, downloaded
    run = cfg.resolve(cfg.NONE, run_config(args.run, f"--run {args.run}", header="cannot evaluate"), [])
    env_name = args.env or run.train.eval_env
    do_offline = not args.closed_loop
    do_closed = not args.offline and env_name is not None
    if args.closed_loop and env_name is None:
        raise ConfigError(["--closed-loop: name an env with --env NAME (robo-run plugins lists them)"],
                          header="cannot evaluate")
    if env_fields and env_name is None:
        raise ConfigError([f"--{env_fields[0][0]}: name the env with --env NAME"], header="cannot evaluate")
    spec = env_spec(env_name, env_fields) if do_closed else None
    if args.record and do_closed:
        from robovla.videos import require_av

        require_av()  # before the model loads
    policy = load_policy(args, "cannot evaluate")
    out = args.out or (args.run / "eval" if args.run == source else Path("eval") / source) / policy.info["checkpoint"]
    out.mkdir(parents=True, exist_ok=True)
    title = f"{source.name} @ {policy.info['checkpoint']}"
    progress = not args.no_progress
    written = []
    if do_offline:
        try:
            report = offline(policy, run, args.split, args.batches, args.batch_size, progress)
        except RobovlaError as exc:
            if args.offline:
                raise
            print(f"offline: skipped ({exc})", file=sys.stderr)
        else:
            print(offline_table(report))
            (out / "offline.json").write_text(json.dumps(report, indent=2))
            written += [out / "offline.json", offline_chart(report, out / "offline.png", title)]
    if do_closed:
        report, name = closed_loop(policy, spec, args, run, out, shard)
        print(("\n" if do_offline else "") + rollout.table(report))
        written += [out / f"{name}.json", out / f"{name}.jsonl", rollout.chart(report, out / f"{name}.png", title)]
    if not written:
        raise RobovlaError("nothing to evaluate: the run has no validation split and names no env; pass --split "
                           "PATH or --env NAME")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def load_policy(args: argparse.Namespace, header: str) -> Any:
    """``Policy.from_run`` of ``--run`` with ``--checkpoint``, ``--device``, ``--precision`` and
    ``--execute``; each flag checked before the model loads (a ConfigError naming it)."""
    from robovla.checkpoint import CheckpointError
    from robovla.policy import Execution, ExecutionError, Policy, checkpoint_folder

    problems = []
    if args.checkpoint is not None:
        try:
            checkpoint_folder(args.run, args.checkpoint, "--checkpoint")
        except CheckpointError as exc:
            problems.append(str(exc))
    try:
        Execution.parse(args.execute)
    except ExecutionError as exc:
        problems.append(f"--execute {args.execute}: {exc}")
    problems += device_problems(args.device)
    if problems:
        raise ConfigError(problems, header=header)
    try:
        return Policy.from_run(args.run, args.checkpoint, device=args.device, precision=args.precision,
                               execution=args.execute)
    except ExecutionError as exc:  # it does not fit the model (chunk:K past the chunk)
        raise ConfigError([f"--execute {args.execute}: {exc}"], header=header) from None


def device_problems(device: str) -> list[str]:
    """What is wrong with ``--device`` on this machine (nothing: [])."""
    import torch

    fix = "use --device cpu" + (", or cuda / cuda:N on a machine with a GPU" if not torch.cuda.is_available() else
                                f", or cuda:0..cuda:{torch.cuda.device_count() - 1}")
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return [f"--device {device!r}: not a torch device ({exc}); {fix}"]
    if kind.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {device}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); {fix}"]
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        return [f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); {fix}"]
    if kind.type == "mps" and not torch.backends.mps.is_available():
        return [f"--device {device}: the MPS backend is not available here; {fix}"]
    if kind.type not in ("cpu", "cuda", "mps"):
        return [f"--device {device}: a policy runs on cpu, cuda or mps, not {kind.type}; {fix}"]
    return []


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N), checked; None stays None."""
    if text is None:
        return None
    i, slash, n = text.partition("/")
    if not (slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ConfigError([f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/8"], header="invalid arguments")
    return int(i), int(n)
