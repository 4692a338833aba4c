"""The training loop, on Lightning Fabric: setup -> fit (train_step, validate, save).

``robo-run [train]`` calls :func:`train` with a resolved :class:`robovla.config.RunConfig`;
it launches one process per device, each running :func:`setup` (run folder, model, data
from :mod:`robovla.data`, optimizer, a resumed run's state) and :func:`fit` over one
:class:`Session`. Every process builds the same model from the same seed, reads its share
of every batch (seeded shuffling split across ranks), and steps AdamW with parameter
groups; Fabric handles devices, distribution and precision. Checkpoints are atomic
(:mod:`robovla.checkpoint`) and every process saves its own RNG states, so a resumed run
continues exactly where the saved one stood: the same weights, optimizer state, position
in the epoch and random draws, and its losses equal those of a run that never stopped.
Logs go through :mod:`robovla.logs`. With ``--train.eval_env`` the saved model is read back
through :meth:`robovla.Policy.from_run` and evaluated in closed loop once every process
is done.

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

import torch

from robovla import checkpoint, runs
from robovla.config import RunConfig
from robovla.errors import ConfigError
from robovla.logs import Logs, plot
from robovla.preflight import started_rank
from robovla.runs import load_rng, save_rng

RUN_DIR_ENV = "ROBOVLA_RUN_DIR"  # how re-launched ranks learn the run folder the first one chose


# ----------------------------------------------------------------------- optimization


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


@dataclass
class Session:
    """What one process's training loop reads and advances (:func:`setup` builds it)."""

    fabric: Any
    run: RunConfig
    run_dir: Path
    vla: Any  # the model as built: its head computes losses and actions
    model: Any  # the same model as Fabric wrapped it (devices, precision, distribution)
    optimizer: Any
    loader: Any
    val_loader: Any | None
    logs: Logs
    steps_per_epoch: int
    total: int  # optimizer steps of the whole run
    warmup: int
    sharded: bool  # FSDP or DeepSpeed: every process saves its shard
    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # batches of this epoch already trained on (what a resumed run skips)
    trained_before: float = 0.0  # seconds of training before the run was resumed
    started: float = field(default_factory=time.perf_counter)
    validated: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest validation


def run_dir_for(run: RunConfig) -> Path:
    """The run folder: --train.run_name, or <backbone>-<head>-<date>-<time>, under output_dir."""
    chosen = os.environ.get(RUN_DIR_ENV)
    if chosen:
        return Path(chosen)
    name = run.train.run_name or f"{run.backbone.name}-{run.head.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(run.train.output_dir) / name


def train(run: RunConfig, config_text: str, resume: Path | None = None, progress: bool = True,
          overwrite: bool = False, accept_changes: bool = False) -> Path:
    """Train ``run``; ``config_text`` is its resolved TOML (saved as config.toml). Returns the run
    folder. With ``--train.eval_env`` the saved model is then evaluated in closed loop.

    A new run refuses an existing, non-empty run folder unless ``overwrite``; a resumed run
    refuses a config or process count that differs from its checkpoint's unless ``accept_changes``.
    """
    from lightning_fabric import Fabric

    f = run.fabric
    run_dir = Path(resume) if resume is not None else run_dir_for(run)
    previous = os.environ.get(RUN_DIR_ENV)  # set: a process the launcher started, the folder checked already
    fabric = Fabric(accelerator=f.accelerator, devices=f.devices, num_nodes=f.num_nodes, strategy=f.strategy,
                    precision=f.precision)
    first = previous is None and started_rank() == 0  # the one process that checks and holds the folder
    with runs.holding(run_dir, first, overwrite, new=resume is None) as hold:
        if first:
            for note in runs.checked_folder(run, run_dir, resume is not None, fabric.world_size, overwrite,
                                            accept_changes):
                print(note)
            hold.claimed = True  # from here a failure before the first checkpoint takes this run's files away
        os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks started by the launcher choose the same folder
        try:
            result = fabric.launch(_main, run, config_text, run_dir, resume is not None, progress)
        finally:
            if previous is None:
                os.environ.pop(RUN_DIR_ENV, None)
            else:
                os.environ[RUN_DIR_ENV] = previous
    run_dir = Path(result) if result else run_dir
    if run.train.eval_env and fabric.is_global_zero:  # the strategy is done: read back what it saved
        evaluate_run(run, run_dir, device="cuda" if fabric.device.type == "cuda" else "cpu")
    return run_dir


def _main(fabric: Any, run: RunConfig, config_text: str, run_dir: Path, resuming: bool, progress: bool) -> str:
    s = setup(fabric, run, config_text, run_dir, resuming)
    stopped = fit(s, progress)
    check_replicas(s)
    save(s)
    if stopped is not None:
        s.logs.close()
        raise Interrupted(stopped, run_dir, s.step)
    late = not (s.validated and s.validated[0] == s.step)  # validated after the last save drew loss.png
    final = validate(s) if late else s.validated[1]
    if fabric.is_global_zero and final:
        fabric.print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    s.logs.close()
    if fabric.is_global_zero and late and final:
        plot(run_dir)
    return str(run_dir)


def setup(fabric: Any, run: RunConfig, config_text: str, run_dir: Path, resuming: bool) -> Session:
    """The run folder, model, data, optimizer and schedule of this process; a resumed run's
    weights, optimizer state, position and RNG states."""
    import robovla
    from robovla.vla import build

    t = run.train
    if t.threads:
        torch.set_num_threads(t.threads)
    elif fabric.world_size > 1 and fabric.device.type == "cpu":  # ranks share the cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean(run_dir)
        if not resuming:
            (run_dir / checkpoint.CONFIG).write_text(config_text)
        fabric.print(robovla.registry.active_plugins())
    fabric.barrier()
    # a resumed run's checkpoint holds every weight, but a LoRA one only the trained: the frozen base
    # comes from --train.init again
    vla = build(run, init=not resuming or run.lora.enabled)
    if fabric.is_global_zero:
        fabric.print("\n".join(robovla.finetune.summary(vla)))
    loader, val_loader = loaders(fabric, run, vla, run_dir, resuming)
    if fabric.is_global_zero and not resuming:  # model and data are ready: an overwritten run's files can go
        note = runs.finish_overwrite(run_dir)
        if note:
            fabric.print(note)
    optimizer = torch.optim.AdamW(parameter_groups(vla, t.weight_decay), lr=t.lr)
    steps_per_epoch = len(loader) // t.grad_accum
    sharded = f"{run.fabric.strategy}".startswith(("fsdp", "deepspeed"))
    folder = checkpoint.last(run_dir) if resuming else None
    state = checkpoint.load(folder, vla, optimizer, verified=True) if folder and not sharded else None
    model, optimizer = fabric.setup(vla, optimizer)
    model.mark_forward_method("loss")
    if folder and sharded:
        fabric.load(folder / checkpoint.SHARDED, {"model": model, "optimizer": optimizer})
        state = checkpoint.read_state(folder)
    if resuming and fabric.is_global_zero:  # the checkpoint loaded: config.toml records a raised length
        runs.record_length(run_dir, config_text)
    s = Session(fabric, run, run_dir, vla, model, optimizer, loader, val_loader,
                Logs.open(run_dir, fabric.is_global_zero, state["step"] if state else None, t.wandb_project),
                steps_per_epoch, total=t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch)),
                warmup=round(t.warmup_epochs * steps_per_epoch) + t.warmup_steps, sharded=sharded)
    if state is None:
        torch.manual_seed(t.seed + fabric.global_rank)
        return s
    s.step, s.epoch, s.consumed = state["step"], state["epoch"], state["batch"]
    s.trained_before = state.get("train_seconds", 0.0)
    if not load_rng(folder, fabric.global_rank, fabric.device):
        fabric.print(f"note: {folder} holds no RNG state for process {fabric.global_rank} (it was saved by "
                     f"{state.get('world_size')}); that process starts a fresh stream, so the run is not bit-exact")
        torch.manual_seed(t.seed + fabric.global_rank + s.step)
    return s


def loaders(fabric: Any, run: RunConfig, vla: Any, run_dir: Path, resuming: bool) -> tuple[Any, Any | None]:
    """The training loader and the validation loader (None without a validation split), each
    process reading its share; the action space fitted once and saved as action_stats.json."""
    from robovla.data import action_space, open_dataset, saved_action_space
    from robovla.loader import Preprocess, make_loader
    from robovla.windows import WindowDataset

    t = run.train
    data = open_dataset(run, "train")
    missing = [cam for cam in vla.backbone.cameras if cam not in data.cameras]
    if missing:  # a backbone config without a `cameras` field escapes the preflight check
        raise ConfigError([f"--backbone {run.backbone.name}: reads cameras {list(vla.backbone.cameras)}, but dataset "
                           f"{run.dataset.name!r} provides {list(data.cameras)} (no {missing}); load them (e.g. "
                           "--dataset.cameras) or have the backbone read only those"])
    if resuming:
        space = saved_action_space(run, run_dir)
    else:
        space = action_space(run, data)
        if fabric.is_global_zero:
            (run_dir / checkpoint.STATS).write_text(json.dumps(space.state_dict(), indent=2))
    windows = WindowDataset(data, space, t.window, t.chunk)
    if len(windows) < t.batch_size * fabric.world_size:
        raise ConfigError([f"--train.batch_size {t.batch_size}: the training split gives {len(windows)} windows, fewer "
                           f"than one global batch ({t.batch_size} x {fabric.world_size} processes); lower "
                           "--train.batch_size or --train.window"])
    share = {"num_workers": t.num_workers, "rank": fabric.global_rank, "world_size": fabric.world_size}
    loader = make_loader(windows, t.batch_size, preprocess=Preprocess.for_backbone(vla.backbone, train=t.augment),
                         seed=t.seed, pin_memory=fabric.device.type == "cuda", **share)
    val_data = open_dataset(run, "val")
    val_loader = None if val_data is None else make_loader(
        WindowDataset(val_data, space, t.window, t.chunk), t.batch_size,
        preprocess=Preprocess.for_backbone(vla.backbone, train=False), shuffle=False, drop_last=False,
        seed=t.seed, **share)
    return loader, val_loader


def fit(s: Session, progress: bool = True) -> int | None:
    """Train until the last step, the time budget or a signal; returns the signal, if one came."""
    from tqdm import tqdm

    t = s.run.train
    bar = tqdm(total=s.total, initial=s.step, disable=not (progress and s.fabric.is_global_zero), unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)  # logs get a line per 30 s
    s.model.train()
    s.started = time.perf_counter()
    deadline = None if t.max_minutes is None else s.started + 60 * t.max_minutes
    with Stop().installed() as stop:
        while s.step < s.total and stop.signal is None:
            s.loader.set_epoch(s.epoch)
            s.loader.batch_sampler.skip = s.consumed  # resuming mid-epoch: the batches already trained on
            batches = iter(s.loader)
            exhausted = fit_epoch(s, batches, stop, bar, deadline)
            del batches  # shut its workers down before the next epoch starts new ones
            if exhausted:
                s.epoch, s.consumed = s.epoch + 1, 0
                if not t.val_every and s.step < s.total:
                    validate(s)
    bar.close()
    return stop.signal


def fit_epoch(s: Session, batches: Iterator[Any], stop: Stop, bar: Any, deadline: float | None) -> bool:
    """Optimizer steps over the rest of one epoch; returns whether the epoch's batches ran out."""
    t, fabric = s.run.train, s.fabric
    global_batch = t.batch_size * fabric.world_size * t.grad_accum
    last_time = time.perf_counter()
    while s.step < s.total and stop.signal is None:
        micro = []
        try:
            while len(micro) < t.grad_accum:
                micro.append(next(batches))
        except StopIteration:
            return True  # an incomplete accumulation at the epoch end is dropped
        except Exception:  # e.g. workers hit by the same Ctrl-C: stop at the last complete step
            if stop.signal is None:
                raise
            return False
        loss, metrics = train_step(s, micro)
        now = time.perf_counter()
        speed, last_time = global_batch / max(now - last_time, 1e-9), now
        lr = s.optimizer.param_groups[0]["lr"]
        if s.step % t.log_every == 0 or s.step == s.total:
            s.logs.log(s.step, "train", {"loss": loss, "lr": lr, **metrics, "samples_per_s": speed})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}", refresh=False)
        bar.update(1)
        if t.val_every and s.step % t.val_every == 0:
            validate(s)
        if s.step % t.checkpoint_every == 0:
            save(s)
        if deadline is not None and fabric.broadcast(time.perf_counter() > deadline):
            s.total = s.step  # the time budget is spent: finish as if this were the last step
    return False


def train_step(s: Session, micro: list[Any]) -> tuple[float, dict[str, float]]:
    """One optimizer step over the micro-batches ``micro`` (gradient accumulation); returns
    the mean loss and the mean of each loss term and metric."""
    t, fabric = s.run.train, s.fabric
    for group in s.optimizer.param_groups:
        group["lr"] = t.lr * lr_scale(s.step, s.warmup, s.total, t.schedule, t.min_lr_scale)
    losses, metrics = [], {}
    for i, batch in enumerate(micro):
        with fabric.no_backward_sync(s.model, enabled=i < len(micro) - 1):
            loss, parts = s.model.loss(batch.to(fabric.device))
            fabric.backward(loss / len(micro))
        losses.append(float(loss.detach()))
        for k, v in parts.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / len(micro)
    if t.grad_clip is not None:
        metrics["grad_norm"] = float(fabric.clip_gradients(s.model, s.optimizer, max_norm=t.grad_clip))
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step, s.consumed = s.step + 1, s.consumed + len(micro)
    return sum(losses) / len(losses), metrics


def validate(s: Session) -> dict[str, float]:
    """Mean loss, metrics and arm MSE over the validation batches, across processes; logged."""
    from robovla.losses import action_errors, error_metrics

    if s.val_loader is None:
        return {}
    t, fabric, head = s.run.train, s.fabric, s.vla.head
    s.model.eval()
    sampling = torch.Generator(device=fabric.device).manual_seed(t.seed)  # sampling heads: the same noise
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for i, batch in enumerate(s.val_loader):
            if t.val_batches is not None and i >= t.val_batches:
                break
            batch = batch.to(fabric.device)
            prediction = s.model(batch)
            loss, metrics = head.loss(prediction, batch.actions, batch.action_mask)
            errors = action_errors(head.actions(prediction, generator=sampling), batch.actions, batch.action_mask)
            for k, v in {"loss": loss, **metrics, "arm_mse": error_metrics(errors)["arm_mse"]}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    s.model.train()
    keys = sorted(sums)
    reduced = fabric.all_reduce(torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64), reduce_op="sum")
    result = {k: float(reduced[i] / max(1, reduced[-1])) for i, k in enumerate(keys)}
    s.logs.log(s.step, "val", result)
    s.validated = (s.step, result)
    return result


def save(s: Session) -> None:
    """Checkpoint ``s.step``: every process writes its RNG states (and under FSDP/DeepSpeed its
    shard) into one temporary folder, which the first process completes and commits."""
    fabric = s.fabric
    state = {"epoch": s.epoch, "batch": s.consumed, "world_size": fabric.world_size,
             "steps_per_epoch": s.steps_per_epoch, "train_seconds": s.trained_before + time.perf_counter() - s.started,
             "config": s.run.to_dict()}  # what --resume compares its config.toml with
    tmp = fabric.broadcast(checkpoint.begin(s.run_dir, s.step) if fabric.is_global_zero else None)
    save_rng(tmp, fabric.global_rank, fabric.device)
    if s.sharded:
        fabric.save(tmp / checkpoint.SHARDED, {"model": s.model, "optimizer": s.optimizer})
    fabric.barrier()
    if fabric.is_global_zero:
        if not s.sharded:
            checkpoint.write_model(tmp, s.vla, s.optimizer, lora=s.run.lora.enabled)
        checkpoint.commit(s.run_dir, s.step, tmp, state)
        try:
            plot(s.run_dir)  # the curves so far, beside every checkpoint
        except Exception as exc:  # noqa: BLE001 - a picture never ends a run
            fabric.print(f"note: loss.png not drawn at step {s.step}: {type(exc).__name__}: {exc}")
    fabric.barrier()


def check_replicas(s: Session) -> None:
    """Replicas must hold the same weights; a silent divergence would waste the run."""
    if s.fabric.world_size == 1 or s.sharded:
        return
    total = torch.stack([p.detach().double().sum() for p in s.vla.parameters()]).sum()
    sums = s.fabric.all_gather(total)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0):
        raise RuntimeError(f"the {s.fabric.world_size} processes ended with different weights: {sums.tolist()}")


def evaluate_run(run: RunConfig, run_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Closed-loop evaluation of the run's saved model in ``--train.eval_env``, read back through
    :meth:`robovla.Policy.from_run` like any later evaluation; prints the success rate,
    writes eval.json."""
    import robovla
    from robovla.rollout import evaluate

    t = run.train
    policy = robovla.Policy.from_run(run_dir, device=device)
    env = robovla.create("env", t.eval_env, {})
    try:
        report = evaluate(policy, env, episodes=t.eval_episodes, seed=t.eval_seed)
    finally:
        env.close()
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"closed-loop success in {t.eval_env}: {100 * report['success_rate']:.1f}% of {t.eval_episodes} episodes "
          f"({run_dir / 'eval.json'})")
    return report
