"""Run folders and checkpoints: written atomically, read back with weights_only.

    runs/<name>/
      config.toml               the resolved configuration, with plugin versions under [meta]
      action_stats.json         the fitted action space (travels with the model)
      metrics.csv               every logged value: step, split, key, value
      checkpoints/step-000500/  model.safetensors (full fine-tuning) or trainable.safetensors
                                + adapter_config.json (LoRA: adapter and fully trained weights),
                                optimizer.pt, state.json (step, epoch, batch, schedule),
                                rng-<rank>.json (each process's RNG states)
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
from robovla.errors import ConfigError, RobovlaError

CHECKPOINTS, LAST, STATE, OPTIMIZER, FULL = "checkpoints", "last", "state.json", "optimizer.pt", "model.safetensors"
SHARDED = "sharded"  # FSDP and DeepSpeed: Fabric's own sharded checkpoint of model and optimizer
CONFIG, STATS = "config.toml", "action_stats.json"


class CheckpointError(RobovlaError, FileNotFoundError):
    """A folder is not the checkpoint a command needs; the message says what it lacks."""


class NotARunError(ConfigError, FileNotFoundError):
    """A folder given as a run folder lacks what ``robo-run`` writes into one."""


def run_config(run_dir: str | Path, what: str, header: str = "not a run folder", stats: bool = False) -> Path:
    """The config.toml of run folder ``run_dir`` (and, with ``stats``, a check that its fitted
    action space is there too), or :class:`NotARunError` naming ``what`` and what is missing."""
    run_dir = Path(run_dir).expanduser()
    missing = [name for name in (CONFIG, STATS)[:1 + stats] if not (run_dir / name).is_file()]
    if missing:
        raise NotARunError([f"{what}: no {' or '.join(missing)} there; give a run folder written by robo-run "
                            "(runs/<name>)"], header=header)
    return run_dir / CONFIG


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, numpy and torch CPU RNG states, and ``device``'s when it is a
    CUDA device; JSON-ready."""
    state = {"python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
             "numpy": base64.b64encode(json.dumps(np.random.get_state()[1].tolist()).encode()).decode(),
             "numpy_pos": int(np.random.get_state()[2]),
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device is not None and device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    def tensor(key: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(state[key])), dtype=torch.uint8)

    version, internal, gauss = json.loads(base64.b64decode(state["python"]))
    random.setstate((version, tuple(internal), gauss))
    keys = np.asarray(json.loads(base64.b64decode(state["numpy"])), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"]))
    torch.set_rng_state(tensor("torch"))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor("cuda"), device)


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng-{rank}.json"


def save_rng(folder: Path, rank: int, device: torch.device | None = None) -> None:
    """Write process ``rank``'s RNG states into checkpoint folder ``folder`` (every process its own)."""
    rng_file(folder, rank).write_text(json.dumps(rng_state(device)))


def load_rng(folder: Path, rank: int, device: torch.device | None = None) -> bool:
    """Restore process ``rank``'s RNG states from ``folder``; False when it holds none for
    that rank (a run resumed on more processes than it was saved from)."""
    file = rng_file(folder, rank)
    if file.is_file():
        set_rng_state(json.loads(file.read_text()), device)
        return True
    legacy = json.loads((Path(folder) / STATE).read_text()).get("rng")  # one state for all ranks
    if rank == 0 and legacy is not None:
        set_rng_state(legacy, device)
        return True
    return False


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
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
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
    LoRA the weights are :func:`robovla.finetune.save_trainable`'s (adapter and trainable).
    One process: its RNG state is saved as rank 0's."""
    tmp = begin(run_dir, step)
    save_rng(tmp, 0)
    write_model(tmp, model, optimizer, lora)
    return commit(run_dir, step, tmp, state)


def write_model(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool = False) -> None:
    """The weights (all, or under LoRA the adapter and trainable ones) and the optimizer state,
    into the temporary folder of a checkpoint being written."""
    from safetensors.torch import save_model

    if lora:
        finetune.save_trainable(model, tmp)
    else:
        save_model(model, str(tmp / FULL))  # tied weights (e.g. an LM head) stored once
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)


def save_weights(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint of full weights and no optimizer state (a converted model),
    atomically, and point ``last`` at it."""
    from safetensors.torch import save_file

    tmp = begin(run_dir, step)
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in weights.items():  # safetensors stores no two names over one memory
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.contiguous() if key not in seen else t.clone().contiguous()
        seen.add(key)
    save_file(tensors, str(tmp / FULL), metadata={"format": "pt"})
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
        raise CheckpointError(f"{run_dir}: no complete checkpoint ({link} is missing); the run saved none yet, "
                              "or this is not a run folder")
    return link.resolve()


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns its state.json contents.
    A sharded (FSDP or DeepSpeed) checkpoint's weights are gathered in this one process."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if (folder / FULL).is_file():
        load_model(model, str(folder / FULL))
    elif (folder / SHARDED).exists():
        if optimizer is not None:
            raise RobovlaError(f"{folder}: a sharded optimizer state is restored by the strategy that wrote it "
                               "(robo-run --resume), not in one process")
        model.load_state_dict(checked_state(model, consolidated(folder), str(folder)), strict=False)
    else:
        finetune.load_trainable(model, folder)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
    return json.loads((folder / STATE).read_text())


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint, gathered in one process (on the CPU, all in
    memory): FSDP's distributed checkpoint as lightning's ``fabric consolidate`` reads it,
    or DeepSpeed's ZeRO files through deepspeed's own ``zero_to_fp32``."""
    path = Path(folder) / SHARDED
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint, as Fabric's FSDP writes it
        from lightning_fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["model"]
    if (path / "latest").is_file():  # a DeepSpeed engine's checkpoint
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exc:
            raise RobovlaError(f"{folder} holds a DeepSpeed checkpoint; reading it needs deepspeed "
                               "(pip install deepspeed)") from exc
        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    raise CheckpointError(f"{path}: neither an FSDP distributed checkpoint (.metadata) nor a DeepSpeed one (latest)")


def resumable(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from, or a clear error when it cannot."""
    folder = last(run_dir)
    if not (folder / OPTIMIZER).is_file() and not (folder / SHARDED).exists():
        raise CheckpointError(f"{folder} holds weights but no optimizer state (e.g. a converted checkpoint), so "
                              f"there is nothing to resume; start a new run from its weights with --train.init "
                              f"{run_dir}")
    return folder


def checkpoint_folder(path: str | Path, what: str = "--train.init") -> Path:
    """A run folder (its ``last`` checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path).expanduser()
    if (path / CHECKPOINTS).is_dir():
        return last(path)
    if (path / STATE).is_file():
        return path
    raise CheckpointError(f"{what} {path}: neither a run folder (with checkpoints/) nor a checkpoint folder "
                          "(with state.json); give runs/<name> or runs/<name>/checkpoints/step-N")


def checked_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``weights`` checked against ``model``'s state_dict, every problem named at once: missing
    and unexpected names, and shapes that differ. Names the model ties to one tensor (e.g. an
    LM head and the embedding) need to be there once; the copy returned keeps one of them."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    kept: dict[str, torch.Tensor] = {}
    found: dict[str, list[str]] = {"shapes differ": [], "missing": [], "not in the model": [], "tied copies differ": []}
    for names in groups.values():
        present = [n for n in names if n in weights]
        if not present:
            found["missing"].append(names[0])
            continue
        first, shape = weights[present[0]], list(expected[names[0]].shape)
        if list(first.shape) != shape:
            found["shapes differ"].append(f"{present[0]} {list(first.shape)}, the model's {shape}")
        found["tied copies differ"] += [f"{n} and {present[0]}" for n in present[1:]
                                        if weights[n].shape != first.shape or not torch.equal(weights[n], first)]
        kept[present[0]] = first
    found["not in the model"] = sorted(set(weights) - set(expected))
    lines = []
    for label, items in found.items():
        if items:
            lines.append(f"  {label} ({len(items)}): " + "".join(f"\n    {i}" for i in items[:10])
                         + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""))
    if lines:
        raise RobovlaError(f"{where} does not fit the model:\n" + "\n".join(lines))
    return kept


def init_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load the weights of a run or checkpoint folder into ``model`` (``--train.init``); a LoRA
    checkpoint is rebuilt from its run's config and merged first. Returns the checkpoint folder."""
    from safetensors.torch import load_file

    folder = checkpoint_folder(path)
    if (folder / FULL).is_file():
        state = load_file(folder / FULL)
    elif (folder / SHARDED).exists():
        state = consolidated(folder)
    else:
        from robovla import config as cfg
        from robovla.vla import build

        config_file = folder.parent.parent / "config.toml"
        if not config_file.is_file():
            raise CheckpointError(f"--train.init {path}: a LoRA checkpoint is read with its run's config.toml, and "
                                  f"{config_file} is missing")
        with torch.random.fork_rng(devices=[]):
            source = build(cfg.resolve(cfg.NONE, config_file, []), init=False)
        load(folder, source)
        finetune.merge_lora(source)
        state = source.state_dict()
    model.load_state_dict(checked_state(model, state, f"--train.init {folder}"), strict=False)
    return folder
