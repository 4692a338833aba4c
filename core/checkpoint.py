"""Run folders and checkpoints: written atomically, read back with weights_only.

    runs/<name>/
      config.toml               the resolved configuration, with plugin versions under [meta]
      action_stats.json         the fitted action space (travels with the model)
      metrics.csv               every logged value: step, split, key, value
      checkpoints/step-000500/  model.safetensors (full fine-tuning) or trainable.safetensors
                                + adapter_config.json (LoRA: adapter and fully trained weights),
                                optimizer.pt, state.json (step, epoch, batch, RNG, schedule)
      checkpoints/last          symlink to the newest complete checkpoint

With FSDP or DeepSpeed the weights and optimizer state are Fabric's sharded checkpoint
(``sharded/``, every process writes its shard) beside the same state.json.

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into
place; only then does ``last`` move (by renaming a new symlink over it). A process killed
at any moment leaves ``last`` at a complete checkpoint; unfinished folders are removed the
next time the run starts.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robovla import finetune

CHECKPOINTS, LAST, STATE, OPTIMIZER, FULL = "checkpoints", "last", "state.json", "optimizer.pt", "model.safetensors"
SHARDED = "sharded"  # FSDP and DeepSpeed: Fabric's own sharded checkpoint of model and optimizer


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states, JSON-ready."""
    return {"python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
            "numpy": base64.b64encode(json.dumps(np.random.get_state()[1].tolist()).encode()).decode(),
            "numpy_pos": int(np.random.get_state()[2]),
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = json.loads(base64.b64decode(state["python"]))
    random.setstate((version, tuple(internal), gauss))
    keys = np.asarray(json.loads(base64.b64decode(state["numpy"])), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint ``step`` (the same name in every process)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(run_dir: Path, step: int, tmp: Path, state: dict[str, Any]) -> Path:
    """Add state.json, flush, rename ``tmp`` into place and point ``last`` at it."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    (tmp / STATE).write_text(json.dumps({**state, "step": step, "rng": rng_state()}, indent=2))
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    if final.exists():  # the same step again (e.g. a signal right after a scheduled save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    link = root / f".tmp-last-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / LAST)  # atomic: `last` is the old or the new checkpoint, never neither
    _fsync(root)
    return final


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], lora: bool = False) -> Path:
    """Write checkpoint ``step`` atomically and point ``last`` at it; returns its folder. Under
    LoRA the weights are :func:`robovla.finetune.save_trainable`'s (adapter and trainable)."""
    from safetensors.torch import save_model

    tmp = begin(run_dir, step)
    if lora:
        finetune.save_trainable(model, tmp)
    else:
        save_model(model, str(tmp / FULL))  # tied weights (e.g. an LM head) stored once
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    return commit(run_dir, step, tmp, state)


def clean(run_dir: Path) -> list[Path]:
    """Remove unfinished checkpoint folders left by a killed process; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return stale


def last(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run folder, or a clear error."""
    link = Path(run_dir) / CHECKPOINTS / LAST
    if not link.exists():
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint ({link} is missing); the run saved none yet, "
                                "or this is not a run folder")
    return link.resolve()


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns its state.json contents."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if (folder / FULL).is_file():
        load_model(model, str(folder / FULL))
    else:
        finetune.load_trainable(model, folder)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
    return json.loads((folder / STATE).read_text())
