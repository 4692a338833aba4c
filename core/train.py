"""The training loop, on Lightning Fabric: setup -> fit -> validate, in one file.

``robo-run [train]`` calls :func:`train` with a resolved :class:`robovla.config.RunConfig`.
Each process (one per device) builds the same model from the same seed, reads its share
of every batch (seeded shuffling split across ranks), and steps AdamW with parameter
groups; Fabric handles devices, distribution and precision. Checkpoints are atomic
(robovla.checkpoint) and a resumed run continues exactly where the saved one stood: the
same weights, optimizer state, position in the epoch and RNG state, so its losses equal
those of a run that never stopped.

Shape letters: B batch (per device), T window, C chunk, A action dim.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from robovla import checkpoint
from robovla.config import RunConfig

RUN_DIR_ENV = "ROBOVLA_RUN_DIR"  # how re-launched ranks learn the run folder the first one chose


# --------------------------------------------------------------------------- building


def open_dataset(run: RunConfig, split: str = "train") -> Any:
    """The training split, or the validation split (``--train.val_path``; auto: the sibling
    ``validation/`` folder), behind the frame cache unless ``--train.cache none``."""
    import robovla
    from robovla.frame_cache import CachedDataset

    config = dict(run.dataset.config)
    if split == "val":
        val = run.train.val_path
        if val == "none" or "path" not in config:
            return None
        path = Path(config["path"]).expanduser().parent / "validation" if val == "auto" else Path(val).expanduser()
        if not path.is_dir():
            if val == "auto":
                return None
            raise FileNotFoundError(f"--train.val_path {val}: no such folder")
        config["path"] = path
    source = robovla.create("dataset", run.dataset.name, config)
    if run.train.cache == "none":
        return source
    folder = Path(config["path"]).expanduser() / "robovla_cache" if run.train.cache == "auto" \
        else Path(run.train.cache).expanduser() / split
    return CachedDataset(source, folder)


def fit_action_space(space: Any, dataset: Any) -> None:
    """One streaming pass over the annotated frames, block by block, for the space's statistics."""
    from robovla.frame_cache import frame_blocks, merged_ranges

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a, b in frame_blocks(merged_ranges(dataset.segments())):
            frames = dataset.load(a, b)
            yield frames.actions[space.source], frames.robot_obs

    space.fit(blocks())


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; none on norms, biases and [LRN]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name == "lrn" or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_scale(step: int, warmup: int, total: int, kind: str, floor: float) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup, then
    constant, or cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- logging


class Logs:
    """metrics.csv always; TensorBoard and W&B when installed (null objects otherwise)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, wandb_project: str | None):
        self.enabled, self.file, self.tb, self.wandb = enabled, run_dir / "metrics.csv", None, None
        if not enabled:
            return
        rows = self.file.read_text().splitlines() if self.file.is_file() else ["step,split,key,value"]
        if resume_step is not None:  # rows past the checkpoint are recomputed by the resumed run
            rows = rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= resume_step]
        self.file.write_text("\n".join(rows) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), name=run_dir.name, resume="allow")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.writelines(f"{step},{split},{k},{v:.8g}\n" for k, v in values.items())
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot(run_dir: Path) -> Path | None:
    """loss.png in the run folder: training and validation loss, and the learning rate."""
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        points = [(int(s), float(v)) for s, sp, k, v in rows if sp == split and k == key]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax, lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    for split, style in (("train", "-"), ("val", "o-")):
        x, y = series(split, "loss")
        if x:
            ax.plot(x, y, style, label=f"{split} loss")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(run_dir.name)
    x, y = series("train", "lr")
    lr.plot(x, y)
    lr.set_ylabel("learning rate")
    lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"


# ---------------------------------------------------------------------------- signals


@dataclass
class Stop:
    """Set by SIGINT or SIGTERM; the loop saves a checkpoint at the next step and exits."""

    signal: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)

    @contextmanager
    def installed(self) -> Iterator[Stop]:
        def handler(signum: int, frame: Any) -> None:
            self.signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in self.previous.items():
                signal.signal(sig, old)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved. "
                         f"Continue with: robo-run --resume {run_dir}")
        self.signum = signum


# ------------------------------------------------------------------------------- loop


def run_dir_for(run: RunConfig) -> Path:
    """The run folder: --train.run_name, or <backbone>-<head>-<date>-<time>, under output_dir."""
    chosen = os.environ.get(RUN_DIR_ENV)
    if chosen:
        return Path(chosen)
    name = run.train.run_name or f"{run.backbone.name}-{run.head.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(run.train.output_dir) / name


def train(run: RunConfig, config_text: str, resume: Path | None = None, progress: bool = True) -> Path:
    """Train ``run``; ``config_text`` is its resolved TOML (saved as config.toml). Returns the run folder."""
    from lightning_fabric import Fabric

    f = run.fabric
    if resume is not None:
        checkpoint.resumable(resume)  # before any process starts: a converted run has no optimizer state
    run_dir = Path(resume) if resume is not None else run_dir_for(run)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks started by the launcher choose the same folder
    try:
        fabric = Fabric(accelerator=f.accelerator, devices=f.devices, num_nodes=f.num_nodes, strategy=f.strategy,
                        precision=f.precision)
        result = fabric.launch(_main, run, config_text, run_dir, resume is not None, progress)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    return Path(result) if result else run_dir


def _main(fabric: Any, run: RunConfig, config_text: str, run_dir: Path, resuming: bool, progress: bool) -> str:
    import robovla
    from robovla.loader import Preprocess, make_loader
    from robovla.vla import build as build_vla
    from robovla.windows import WindowDataset

    t = run.train
    if t.threads:
        torch.set_num_threads(t.threads)
    elif fabric.world_size > 1 and fabric.device.type == "cpu":  # ranks share the cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean(run_dir)
        if not resuming:
            (run_dir / "config.toml").write_text(config_text)
    fabric.barrier()

    vla = build_vla(run, init=not resuming)  # a resumed run's checkpoint holds every weight
    if fabric.is_global_zero:
        fabric.print("\n".join(robovla.finetune.summary(vla)))
    space = robovla.create("action_space", run.action_space.name, run.action_space.config)
    train_data = open_dataset(run, "train")
    stats_file = run_dir / "action_stats.json"
    if resuming and stats_file.is_file():
        space.load_state_dict(json.loads(stats_file.read_text()))
    else:
        fit_action_space(space, train_data)
        if fabric.is_global_zero:
            stats_file.write_text(json.dumps(space.state_dict(), indent=2))
    windows = WindowDataset(train_data, space, t.window, t.chunk)
    if len(windows) < t.batch_size * fabric.world_size:
        raise ValueError(f"{len(windows)} training windows are fewer than one global batch "
                         f"({t.batch_size} x {fabric.world_size}); lower --train.batch_size")
    pre = Preprocess.for_backbone(vla.backbone, train=t.augment)
    # The loader gets its own generator so that starting it draws nothing from the global RNG:
    # dropout then sees the same random numbers whether or not the run was resumed mid-epoch.
    loader = make_loader(windows, t.batch_size, preprocess=pre, seed=t.seed, num_workers=t.num_workers,
                         rank=fabric.global_rank, world_size=fabric.world_size,
                         pin_memory=fabric.device.type == "cuda", generator=torch.Generator().manual_seed(t.seed))
    val_data = open_dataset(run, "val")
    val_loader = None if val_data is None else make_loader(
        WindowDataset(val_data, space, t.window, t.chunk), t.batch_size,
        preprocess=Preprocess.for_backbone(vla.backbone, train=False), shuffle=False,
        num_workers=t.num_workers, rank=fabric.global_rank, world_size=fabric.world_size, drop_last=False,
        generator=torch.Generator().manual_seed(t.seed))

    optimizer = torch.optim.AdamW(parameter_groups(vla, t.weight_decay), lr=t.lr)
    steps_per_epoch = len(loader) // t.grad_accum
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = round(t.warmup_epochs * steps_per_epoch) + t.warmup_steps
    step, epoch, consumed, trained_before = 0, 0, 0, 0.0
    sharded = f"{run.fabric.strategy}".startswith(("fsdp", "deepspeed"))
    if resuming and not sharded:
        state = checkpoint.load(checkpoint.last(run_dir), vla, optimizer)
    model, optimizer = fabric.setup(vla, optimizer)
    model.mark_forward_method("loss")
    if resuming and sharded:
        folder = checkpoint.last(run_dir)
        fabric.load(folder / checkpoint.SHARDED, {"model": model, "optimizer": optimizer})
        state = json.loads((folder / checkpoint.STATE).read_text())
    if resuming:
        step, epoch, consumed = state["step"], state["epoch"], state["batch"]
        trained_before = state.get("train_seconds", 0.0)
        checkpoint.set_rng_state(state["rng"])
    else:
        torch.manual_seed(t.seed + fabric.global_rank)

    logs = Logs(run_dir, fabric.is_global_zero, step if resuming else None, t.wandb_project)

    def save() -> None:
        state = {"epoch": epoch, "batch": consumed, "world_size": fabric.world_size,
                 "steps_per_epoch": steps_per_epoch,
                 "train_seconds": trained_before + time.perf_counter() - started}
        if sharded:  # every process writes its shard into the same temporary folder
            tmp = checkpoint.begin(run_dir, step) if fabric.is_global_zero else None
            tmp = fabric.broadcast(tmp)
            fabric.save(tmp / checkpoint.SHARDED, {"model": model, "optimizer": optimizer})
            fabric.barrier()
            if fabric.is_global_zero:
                checkpoint.commit(run_dir, step, tmp, state)
        elif fabric.is_global_zero:
            checkpoint.save(run_dir, step, vla, optimizer, state, lora=run.lora.enabled)
        fabric.barrier()

    def validate() -> dict[str, float]:
        if val_loader is None:
            return {}
        model.eval()
        sampling = torch.Generator(device=fabric.device).manual_seed(t.seed)
        sums: dict[str, float] = {}
        n = 0
        with torch.no_grad():
            for i, batch in enumerate(val_loader):
                if t.val_batches is not None and i >= t.val_batches:
                    break
                batch = batch.to(fabric.device)
                prediction = model(batch)
                loss, metrics = vla.head.loss(prediction, batch.actions, batch.action_mask)
                actions = vla.head.actions(prediction, generator=sampling)  # sampling heads: fixed noise
                values = {"loss": loss, **metrics, "arm_mse": arm_mse(actions, batch)}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        model.train()
        reduced = fabric.all_reduce(torch.tensor([sums[k] for k in sorted(sums)] + [n], dtype=torch.float64),
                                    reduce_op="sum")
        result = {k: float(reduced[i] / max(1, reduced[-1])) for i, k in enumerate(sorted(sums))}
        logs.log(step, "val", result)
        return result

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (progress and fabric.is_global_zero), unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)  # logs get a line per 30 s
    model.train()
    global_batch = t.batch_size * fabric.world_size * t.grad_accum
    started = last_time = time.perf_counter()
    stopped = None
    deadline = None if t.max_minutes is None else last_time + 60 * t.max_minutes
    with Stop().installed() as stop:
        while step < total and stop.signal is None:
            loader.set_epoch(epoch)
            loader.batch_sampler.skip = consumed  # resuming mid-epoch: the batches already trained on
            batches, exhausted = iter(loader), False
            while step < total and stop.signal is None:
                micro = []
                try:
                    while len(micro) < t.grad_accum:
                        micro.append(next(batches))
                except StopIteration:
                    exhausted = True  # an incomplete accumulation at the epoch end is dropped
                    break
                except Exception:  # e.g. workers hit by the same Ctrl-C: stop at the last complete step
                    if stop.signal is None:
                        raise
                    break
                for group in optimizer.param_groups:
                    group["lr"] = t.lr * lr_scale(step, warmup, total, t.schedule, t.min_lr_scale)
                losses, metrics = [], {}
                for i, batch in enumerate(micro):
                    with fabric.no_backward_sync(model, enabled=i < len(micro) - 1):
                        loss, parts = model.loss(batch.to(fabric.device))
                        fabric.backward(loss / len(micro))
                    losses.append(float(loss.detach()))
                    for k, v in parts.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / len(micro)
                if t.grad_clip is not None:
                    metrics["grad_norm"] = float(fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, consumed = step + 1, consumed + len(micro)
                now = time.perf_counter()
                speed, last_time = global_batch / max(now - last_time, 1e-9), now
                loss_value, lr = sum(losses) / len(losses), optimizer.param_groups[0]["lr"]
                if step % t.log_every == 0 or step == total:
                    logs.log(step, "train", {"loss": loss_value, "lr": lr, **metrics, "samples_per_s": speed})
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}")
                bar.update(1)
                if t.val_every and step % t.val_every == 0:
                    validate()
                if step % t.checkpoint_every == 0:
                    save()
                if deadline is not None and fabric.broadcast(time.perf_counter() > deadline):
                    total = step  # the time budget is spent: finish as if this were the last step
            del batches  # shut its workers down before the next epoch starts new ones
            if exhausted:
                epoch, consumed = epoch + 1, 0
                if not t.val_every and step < total:
                    validate()
        stopped = stop.signal
    bar.close()
    if fabric.world_size > 1:  # replicas must hold the same weights; a silent divergence would waste the run
        total_sum = torch.stack([p.detach().double().sum() for p in vla.parameters()]).sum()
        sums = fabric.all_gather(total_sum)
        if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0):
            raise RuntimeError(f"the {fabric.world_size} processes ended with different weights: {sums.tolist()}")
    save()
    if stopped is not None:
        logs.close()
        raise Interrupted(stopped, run_dir, step)
    final = validate()
    if fabric.is_global_zero:
        if final:
            fabric.print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        logs.close()
        plot(run_dir)
        if t.eval_env:
            evaluate_run(run, vla, space, run_dir)
    return str(run_dir)


def arm_mse(actions: torch.Tensor, batch: Any) -> torch.Tensor:
    """Masked mean squared error of the predicted arm actions [B, T, C, A-1] (normalized)."""
    mask = batch.action_mask.bool()
    diff = (actions[..., :-1] - batch.actions[..., :-1]).float()
    return (diff.square().mean(-1) * mask).sum() / mask.sum().clamp(min=1)


def evaluate_run(run: RunConfig, vla: Any, space: Any, run_dir: Path) -> dict[str, Any]:
    """Closed-loop evaluation in ``--train.eval_env``; prints the success rate, writes eval.json."""
    import robovla
    from robovla.rollout import evaluate

    t = run.train
    env = robovla.create("env", t.eval_env, {})
    try:
        report = evaluate(robovla.Policy(vla, space), env, episodes=t.eval_episodes, seed=t.eval_seed)
    finally:
        env.close()
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"closed-loop success in {t.eval_env}: {100 * report['success_rate']:.1f}% of {t.eval_episodes} episodes "
          f"({run_dir / 'eval.json'})")
    return report
