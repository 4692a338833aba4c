"""Run folders and checkpoints: written atomically, read back with weights_only, verified.

    runs/<name>/
      config.toml               the resolved configuration, with plugin versions under [meta]
      action_stats.json         the fitted action space (travels with the model)
      metrics.csv               every logged value: step, split, key, value
      checkpoints/step-000500/  model.safetensors (full fine-tuning) or trainable.safetensors
                                + adapter_config.json (LoRA: adapter and fully trained weights),
                                optimizer.pt, state.json (step, epoch, batch, schedule, config,
                                sha256 of every file and of action_stats.json), rng-<rank>.json
      checkpoints/last          symlink to the newest complete checkpoint

With FSDP or DeepSpeed the weights and optimizer state are Fabric's sharded checkpoint (``sharded/``, one shard
per process) beside the same state.json. A checkpoint is written into a hidden temporary folder, flushed and
renamed into place; only then does ``last`` move (a new symlink renamed over it): a process killed at any moment
leaves it at a complete checkpoint. Reading one checks state.json and every file's sha256 (older checkpoints are
unverified); an unreadable file is a :class:`DamagedError`. In an exported policy export.json stands in for last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from robovla import finetune
from robovla.errors import ConfigError, RobovlaError

CHECKPOINTS, LAST, STATE, OPTIMIZER, FULL = "checkpoints", "last", "state.json", "optimizer.pt", "model.safetensors"
SHARDED = "sharded"  # FSDP and DeepSpeed: Fabric's own sharded checkpoint of model and optimizer
CONFIG, STATS, EXPORTED = "config.toml", "action_stats.json", "export.json"  # EXPORTED: robovla.sharing
STEP_NAME = re.compile(r"step-(\d+)")
SECTIONS = ("backbone", "head", "dataset", "action_space")  # every saved config.toml names one of each


class CheckpointError(RobovlaError, FileNotFoundError):
    """A folder is not the checkpoint a command needs; the message says what it lacks."""


class NotARunError(ConfigError, FileNotFoundError):
    """A folder given as a run folder lacks what ``robo-run`` writes into one."""


class DamagedError(RobovlaError, ValueError):
    """A file of a run is missing, unreadable, or not what robovla wrote; the message names it."""


def run_config(run_dir: str | Path, what: str, header: str = "not a run folder", stats: bool = False) -> Path:
    """The config.toml of run folder ``run_dir`` (and, with ``stats``, a check that its fitted
    action space is there too), or :class:`NotARunError` naming ``what`` and what is missing."""
    run_dir = Path(run_dir).expanduser()
    missing = [name for name in (CONFIG, STATS)[:1 + stats] if not (run_dir / name).is_file()]
    if missing:
        raise NotARunError([f"{what}: no {' or '.join(missing)} there; give a run folder written by robo-run "
                            "(runs/<name>)"], header=header)
    from robovla.registry_file import read_toml

    saved = read_toml(run_dir / CONFIG)  # a damaged file: an error naming it (bounded, regular files only)
    if not all(isinstance(saved.get(s), dict) and "name" in saved[s] for s in SECTIONS):
        raise NotARunError([f"{run_dir / CONFIG}: not the config.toml robo-run saved (it names no backbone, head, "
                            "dataset and action space); restore it from a copy of the run"], header=header)
    return run_dir / CONFIG


# ---------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint ``step`` (the same name in every process)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(run_dir: Path, step: int, tmp: Path, state: dict[str, Any]) -> Path:
    """Add state.json (with every file's sha256), flush, rename ``tmp`` into place, point ``last`` at it."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    files = {}
    for file in sorted(tmp.rglob("*")):
        if file.is_file():
            _fsync(file)
            files[file.relative_to(tmp).as_posix()] = sha256(file)
    stats = Path(run_dir) / STATS
    record = {**state, "step": step, "files": files}
    if stats.is_file():
        record["action_stats_sha256"] = sha256(stats)
    (tmp / STATE).write_text(json.dumps(record, indent=2))
    _fsync(tmp / STATE)
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
    """Write checkpoint ``step`` atomically, point ``last`` at it; returns its folder. Under LoRA the
    weights are :func:`robovla.finetune.save_trainable`'s. One process: its RNG state is rank 0's."""
    from robovla.runs import save_rng

    tmp = begin(run_dir, step)
    save_rng(tmp, 0)
    write_model(tmp, model, optimizer, lora)
    return commit(run_dir, step, tmp, state)


def write_model(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool = False) -> None:
    """The weights (all, or under LoRA the trainable ones) and optimizer state, into a checkpoint's ``tmp``."""
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
    from robovla.runs import remove

    for path in stale:
        remove(path)
    return stale


# ---------------------------------------------------------------------------- reading


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def earlier(folder: Path) -> str:
    """What to do about a damaged checkpoint ``folder``: the checkpoint before it, if any."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.parent.glob("step-*") if p.is_dir() and p.name < folder.name)
    if not names:
        return "no earlier checkpoint is there: restore the file from a copy, or train the run again"
    return (f"fix: use the earlier checkpoint {folder.parent / names[-1]} (serve or eval with --checkpoint "
            f"{names[-1]}; to resume from it, point last at it: ln -sfn {names[-1]} {folder.parent / LAST})")


@contextmanager
def reading(file: Path, what: str, fix: str) -> Iterator[None]:
    """Any error raised while reading ``file`` as ``what`` -> a :class:`DamagedError` naming it."""
    try:
        yield
    except RobovlaError:
        raise
    except FileNotFoundError as exc:
        raise DamagedError(f"{file}: missing; {fix}") from exc
    except Exception as exc:  # safetensors', torch's, pickle's, json's, peft's, numpy's own errors
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DamagedError(f"{file}: cannot be read as {what} ({type(exc).__name__}: {detail}); it is damaged or "
                           f"not the file robovla wrote; {fix}") from exc


def read_json(file: Path, what: str, fix: str) -> Any:
    """The JSON in ``file``, or a :class:`DamagedError` naming it."""
    with reading(file, what, fix):
        return json.loads(Path(file).read_text())


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of checkpoint ``folder``, checked: counts are integers >= 0 and the step is
    the folder's, seconds finite, checksums and config of the right types."""
    folder = Path(folder)
    file, fix = folder / STATE, earlier(folder)
    state = read_json(file, "a checkpoint's state (JSON)", fix)
    if not isinstance(state, dict):
        raise DamagedError(f"{file}: expected a JSON object, got {type(state).__name__}; {fix}")
    problems = []
    for key, low in {"step": 0, "epoch": 0, "batch": 0, "world_size": 1, "steps_per_epoch": 0}.items():
        value = state.get(key)
        if (key in state or key in ("step", "epoch", "batch")) and (type(value) is not int or value < low):
            problems.append(f"{key} is {json.dumps(value)}, expected an integer >= {low}")
    seconds = state.get("train_seconds", 0)
    if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds < 0:
        problems.append(f"train_seconds is {json.dumps(seconds)}, expected a finite number >= 0")
    named = STEP_NAME.fullmatch(folder.name)
    if named and type(state.get("step")) is int and int(named[1]) != state["step"]:
        problems.append(f"step is {state['step']}, but the folder is {folder.name}")
    files = state.get("files", {"-": "0" * 64})  # older checkpoints: none
    if not isinstance(files, dict) or not files or not all(_listed(k, v) for k, v in files.items()):
        problems.append("files is not {relative path: sha256 hex digest}")
    if not _digest(state.get("action_stats_sha256", "0" * 64)):
        problems.append("action_stats_sha256 is not a sha256 hex digest")
    if not isinstance(state.get("config", {}), dict):
        problems.append("config is not a table of sections")
    if problems:
        raise DamagedError(f"{file}: damaged or edited ({'; '.join(problems)}); {fix}")
    return state


def _digest(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _listed(name: str, digest: Any) -> bool:  # a file inside the checkpoint folder, and its sha256
    return bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts and _digest(digest)


def verify(folder: Path, state: dict[str, Any], weights_only: bool = False) -> bool:
    """Check the files state.json lists (with ``weights_only``: all but the optimizer and
    RNG states) and the run's action_stats.json against their sha256; False for a checkpoint
    saved before checksums, which is not verified."""
    folder, fix, files = Path(folder), earlier(folder), state.get("files")
    if files is None:
        return False
    for name, digest in sorted(files.items()):
        path = folder / name
        if weights_only and (name == OPTIMIZER or name.startswith("rng-")):
            continue
        elif not path.is_file():
            raise DamagedError(f"{path}: missing, though {folder / STATE} lists it; {fix}")
        if sha256(path) != digest:
            raise DamagedError(f"{path}: corrupted (its sha256 is not the one {folder / STATE} recorded when it "
                               f"was saved); {fix}")
    stats = folder.parent.parent / STATS
    if "action_stats_sha256" in state and stats.is_file() and sha256(stats) != state["action_stats_sha256"]:
        raise DamagedError(f"{stats}: changed since {folder} was saved (its sha256 is not the one {folder / STATE} "
                           "recorded); restore the file the run was trained with")
    return True


def last(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run folder (``last`` links to a step-N folder
    beside it), or a clear error."""
    root = Path(run_dir) / CHECKPOINTS
    link = root / LAST
    names = sorted(p.name for p in root.glob("step-*") if p.is_dir() and STEP_NAME.fullmatch(p.name))
    relink = f"rm -r {link} && ln -s" if link.is_dir() and not link.is_symlink() else "ln -sfn"  # a copied folder
    fix = f"fix: point it at a checkpoint: {relink} {names[-1]} {link}" if names else "and no step-N folder is there"
    if not link.exists() and not link.is_symlink() and len(names) == 1 and (root.parent / EXPORTED).is_file():
        return root / names[0]  # an exported policy (robovla.sharing) as the hub stores it: without links
    if not link.exists() and not link.is_symlink():
        raise CheckpointError(f"{run_dir}: no complete checkpoint ({link} is missing); the run saved none yet, "
                              "or this is not a run folder" + (f"; {fix}" if names else ""))
    target = os.readlink(link) if link.is_symlink() else None
    try:
        folder = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop
        folder = None
    if target is None or folder is None or folder.parent != root.resolve() or not folder.is_dir() \
            or not STEP_NAME.fullmatch(folder.name):
        raise DamagedError(f"{link}: {f'links to {target}' if target else 'not a symlink'}; it must link to a "
                           f"checkpoint folder (step-N) beside it; {fix}")
    return folder


def weight_files(folder: Path, state: dict[str, Any]) -> str | None:
    """FULL, SHARDED or finetune.TRAINABLE, as ``folder``'s state.json lists them (or its files are); or None."""
    names = state["files"] if "files" in state else [p.name for p in Path(folder).iterdir()]
    return next((kind for kind in (FULL, SHARDED, finetune.TRAINABLE)
                 if kind in names or any(n.startswith(kind + "/") for n in names)), None)


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         verified: bool = False) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``), its state.json and checksums checked (not
    again when ``verified``); returns the state. Sharded weights are gathered in this one process."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state, fix = read_state(folder), earlier(folder)
    if not verified:
        verify(folder, state, weights_only=optimizer is None)
    kind = weight_files(folder, state)
    if kind == FULL:
        with reading(folder / FULL, "safetensors weights", fix):
            weights = load_file(folder / FULL)
        where = f"{folder / FULL} (for the model {folder.parent.parent / CONFIG} describes)"
        model.load_state_dict(checked_state(model, weights, where), strict=False)
    elif kind == SHARDED:
        if optimizer is not None:
            raise RobovlaError(f"{folder}: a sharded optimizer state is restored by the strategy that wrote it "
                               "(robo-run --resume), not in one process")
        model.load_state_dict(checked_state(model, consolidated(folder), str(folder)), strict=False)
    elif kind == finetune.TRAINABLE:
        if (folder / finetune.ADAPTER).exists():
            read_json(folder / finetune.ADAPTER, "a LoRA adapter config (JSON)", fix)
        with reading(folder / finetune.TRAINABLE, "LoRA adapter and trainable weights", fix):
            finetune.load_trainable(model, folder)
    else:
        raise DamagedError(f"{folder}: no weights ({FULL} for full fine-tuning, {finetune.TRAINABLE} for LoRA, or "
                           f"{SHARDED}/); {fix}")
    if optimizer is not None:
        load_optimizer(folder / OPTIMIZER, optimizer, fix)
    return state


def load_optimizer(file: Path, optimizer: torch.optim.Optimizer, fix: str) -> None:
    """``file``'s optimizer state into ``optimizer``, each moment's shape checked against its parameter's."""
    with reading(file, "an optimizer state (torch.load, weights only)", fix), warnings.catch_warnings(action="ignore"):
        optimizer.load_state_dict(torch.load(file, weights_only=True))
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim and value.shape != p.shape:
                    raise DamagedError(f"{file}: {key} has shape {list(value.shape)} for a parameter of shape "
                                       f"{list(p.shape)}; it does not belong to this model; {fix}")


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint (FSDP's, or DeepSpeed's through ``zero_to_fp32``), on the CPU."""
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


def resumable(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` continues from and its state, every file verified, or a clear error."""
    folder = last(run_dir)
    state = read_state(folder)
    verify(folder, state)
    if not (folder / OPTIMIZER).is_file() and weight_files(folder, state) != SHARDED:
        raise CheckpointError(f"{folder} holds weights but no optimizer state (e.g. a converted checkpoint), so "
                              f"there is nothing to resume; start a new run from its weights with --train.init "
                              f"{run_dir}")
    return folder, state


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
    """``weights`` checked against ``model``'s state_dict, every problem (missing and unexpected names,
    shapes) named at once. Names tied to one tensor need to be there once; the copy keeps one."""
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
    lines = [f"  {label} ({len(items)}): " + "".join(f"\n    {i}" for i in items[:10])
             + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else "")
             for label, items in found.items() if items]
    if lines:
        raise RobovlaError(f"{where} does not fit the model:\n" + "\n".join(lines))
    return kept


def init_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load the weights of a run or checkpoint folder into ``model`` (``--train.init``), verified;
    a LoRA checkpoint is rebuilt from its run's config and merged first. Returns the checkpoint folder."""
    from safetensors.torch import load_file

    folder = checkpoint_folder(path)
    state = read_state(folder)
    verify(folder, state, weights_only=True)
    kind = weight_files(folder, state)
    if kind == FULL:
        with reading(folder / FULL, "safetensors weights", earlier(folder)):
            weights = load_file(folder / FULL)
    elif kind == SHARDED:
        weights = consolidated(folder)
    elif kind == finetune.TRAINABLE:
        from robovla import config as cfg
        from robovla.vla import build

        config_file = folder.parent.parent / CONFIG
        if not config_file.is_file():
            raise CheckpointError(f"--train.init {path}: a LoRA checkpoint is read with its run's config.toml, and "
                                  f"{config_file} is missing")
        with torch.random.fork_rng(devices=[]):
            source = build(cfg.resolve(cfg.NONE, config_file, []), init=False)
        load(folder, source, verified=True)
        finetune.merge_lora(source)
        weights = source.state_dict()
    else:
        raise DamagedError(f"--train.init {folder}: no weights ({FULL}, {finetune.TRAINABLE} or {SHARDED}/)")
    model.load_state_dict(checked_state(model, weights, f"--train.init {folder}"), strict=False)
    return folder
