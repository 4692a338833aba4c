"""A run folder across runs: a new run's claim on it (``--overwrite``), the checks before
``--resume`` (its checkpoint whole, saved with the same config and process count), and every
process's RNG states (``rng-<rank>.json`` beside each checkpoint), which make the resumed run
draw the same random numbers as one that never stopped.

A saved RNG state is tried on a fresh generator of each kind before any of this process's
generators changes, so a damaged file is an error naming it, never a half-restored state.
"""

from __future__ import annotations

import base64
import fcntl
import fnmatch
import json
import math
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch

from robovla.checkpoint import CHECKPOINTS, CONFIG, STATE, STATS, earlier, read_json, read_state, reading
from robovla.config import RunConfig
from robovla.errors import RobovlaError

# what --overwrite removes from a run folder: robovla's own files (anything else stays)
OWN = (CHECKPOINTS, CONFIG, STATS, "metrics.csv", "tensorboard", "wandb", "loss.png", "eval.json", "eval")
OWN_INSIDE = {CHECKPOINTS: ("step-*", ".tmp-*", "last"), "eval": ("step-*",)}  # folders a user may add to
ASIDE = ".overwritten"  # an overwritten run's files, until the new run has started
EXTEND = ("train.max_steps", "train.epochs", "train.max_minutes")
"""What ``--resume RUN_DIR`` may change: how long the run trains (its steps or epochs only upwards)."""
# fields a resumed run may change freely: where and how often it logs, saves and evaluates,
# its length and time budget, and worker counts (the data order follows the seed and the epoch only)
BOOKKEEPING = {f"train.{k}" for k in ("run_name", "output_dir", "num_workers", "threads", "log_every",
                                      "checkpoint_every", "max_minutes", "eval_env", "eval_episodes", "eval_seed",
                                      "wandb_project", "cache")} | set(EXTEND)


class RunFolderError(RobovlaError, FileExistsError):
    """A new run's folder already holds a run."""


class DriftError(RobovlaError, ValueError):
    """A run would resume with another config or process count than its checkpoint was saved with."""


def claim(run_dir: Path, overwrite: bool = False) -> list[Path]:
    """Make ``run_dir`` ready for a new run: one that holds anything is refused unless
    ``overwrite``, which moves robovla's own files (:func:`own_entries`) aside into
    :data:`ASIDE` and keeps any other; :func:`finish_overwrite` deletes them once the new run
    has started, :func:`undo_overwrite` puts them back if it fails first. Returns what moved."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder; choose another --train.run_name")
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not held:
        return []
    if not overwrite:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        if not any((run_dir / "checkpoints").glob("step-*")):
            raise RunFolderError(f"{run_dir} holds a run that saved no checkpoint ({shown}): it stopped before its "
                                 "first save. Start it over with --overwrite, or choose another --train.run_name")
        raise RunFolderError(f"{run_dir} already holds a run ({shown}); continue it with `robo-run --resume "
                             f"{run_dir}`, start it over with --overwrite (deletes its checkpoints, logs, plots, "
                             "eval results and config), or choose another --train.run_name")
    aside = run_dir / ASIDE
    if aside.exists():  # an earlier --overwrite killed before its run started: those files were to go anyway
        shutil.rmtree(aside)
    moved = own_entries(run_dir)
    for path in moved:
        target = aside / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
    return moved


def own_entries(folder: Path) -> list[Path]:
    """robovla's files in a run folder (:data:`OWN`; inside checkpoints/ and eval/ only what
    robovla names there, :data:`OWN_INSIDE`), in :data:`OWN`'s order."""
    found = []
    for name in OWN:
        path = Path(folder) / name
        if name in OWN_INSIDE and path.is_dir() and not path.is_symlink():
            found += sorted(p for p in path.iterdir() if any(fnmatch.fnmatch(p.name, w) for w in OWN_INSIDE[name]))
        elif path.exists() or path.is_symlink():
            found.append(path)
    return found


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder with everything in it."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def finish_overwrite(run_dir: Path) -> str | None:
    """The new run has started: delete what :func:`claim` moved aside; returns a note."""
    aside = Path(run_dir) / ASIDE
    if not aside.is_dir():
        return None
    names = list(dict.fromkeys(p.relative_to(aside).parts[0] for p in own_entries(aside)))
    shutil.rmtree(aside)
    return f"--overwrite: removed {', '.join(names)} from {run_dir}"


def undo_overwrite(run_dir: Path) -> str | None:
    """The new run failed before it started: remove what it wrote and put the earlier run's
    files back where they were; returns a note (None when nothing was moved aside)."""
    aside = Path(run_dir) / ASIDE
    if not aside.is_dir():
        return None
    for path in own_entries(run_dir):
        remove(path)
    for path in own_entries(aside):
        target = Path(run_dir) / path.relative_to(aside)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
    shutil.rmtree(aside)
    return f"--overwrite: the new run failed before it started; the earlier run in {run_dir} is as it was"


@contextmanager
def holding(run_dir: Path, first: bool, overwrite: bool, new: bool = True) -> Iterator[Any]:
    """A run's hold on its folder, in the ``first`` process only: :func:`locked`, and on a
    failure: an overwritten run's files put back if the new run had not started, and the files
    of a ``new`` run that saved no checkpoint removed (:func:`discard_unsaved`), once the caller
    has set ``claimed`` on what this yields (after :func:`claim`: a refused folder keeps its files)."""
    hold = SimpleNamespace(claimed=False)
    if not first:
        yield hold
        return
    with locked(run_dir):
        try:
            yield hold
        except BaseException:
            note = undo_overwrite(run_dir) if overwrite else None
            note = note or (discard_unsaved(run_dir) if new and hold.claimed else None)
            if note:
                print(note, file=sys.stderr)
            raise


def discard_unsaved(run_dir: Path) -> str | None:
    """A new run failed before its first checkpoint: remove robovla's files from its folder
    (the folder itself goes when nothing else is left in it), so that the next try starts in a
    clean one. Returns a note; None when a checkpoint was saved (the run can be resumed)."""
    run_dir = Path(run_dir)
    if any((run_dir / CHECKPOINTS).glob("step-*")):
        return None
    entries = own_entries(run_dir)
    for path in entries:
        remove(path)
    folder = run_dir / CHECKPOINTS
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return f"the run failed before its first checkpoint; removed {', '.join(p.name for p in entries)} from " \
           f"{run_dir}" if entries else None


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for one robo-run at a time (an exclusive flock on the folder itself:
    no lock file, released when the process ends however it ends). A folder created here and
    left empty is removed again."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"{run_dir}: another robo-run is using this run folder (training or resuming it) "
                                 "right now; wait for it to end or stop it, or choose another --train.run_name") \
                from None
        try:
            yield
        finally:
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()
    finally:
        os.close(fd)  # releases the lock


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``section.field: saved -> now`` for every field but :data:`BOOKKEEPING` that differs
    between two resolved configs (:meth:`robovla.config.RunConfig.to_dict`)."""
    def flat(config: dict[str, Any]) -> dict[str, str]:
        return {f"{s}.{k}": json.dumps(v) for s, body in config.items() if isinstance(body, dict)
                for k, v in body.items()}

    a, b = flat(saved), flat(json.loads(json.dumps(now)))
    return [f"{key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and key not in BOOKKEEPING]


MODEL = ("backbone.", "head.", "action_space.", "lora.", "train.window:", "train.chunk:", "train.lrn_tokens:",
         "train.ablate:")
"""What changes the policy a checkpoint serves: its components, adapters, window, chunk, [LRN] and ablation."""


def model_changes(run: RunConfig, run_dir: Path, folder: Path, state: dict[str, Any]) -> None:
    """Refuse to serve or evaluate ``folder`` when config.toml now describes another policy
    than the one its weights were trained as (e.g. an edited action-space bound, which no
    shape would catch). Checkpoints saved without their config are not compared."""
    found = [c for c in changes(state.get("config") or {}, run.to_dict()) if c.startswith(MODEL)] \
        if "config" in state else []
    if found:
        raise DriftError(f"{Path(run_dir) / CONFIG} no longer describes the policy {folder} was trained as "
                         "(saved -> now):\n" + "".join(f"  {c}\n" for c in found)
                         + f"fix: restore the saved values in {Path(run_dir) / CONFIG} (the checkpoint's own are in "
                         f"{folder / 'state.json'} under \"config\")")


def check_resume(run: RunConfig, run_dir: Path, world_size: int, accept_changes: bool = False) -> list[str]:
    """Before any process starts, what ``--resume run_dir`` needs: its last checkpoint whole
    (state, checksums, every process's RNG states), its action_stats.json and metrics.csv
    readable, and the config and process count the checkpoint was saved with unchanged (with
    ``accept_changes``: changes allowed). Returns notes to print."""
    from robovla import checkpoint, logs
    from robovla.data import saved_action_space

    folder, state = checkpoint.resumable(run_dir)
    saved_action_space(run, run_dir)
    for rank in range(world_size):
        read_rng(folder, rank)
    logs.rows(Path(run_dir) / logs.METRICS)
    if "config" not in state:
        return [f"note: {folder} was saved before robovla recorded a checkpoint's config and process count; "
                "resuming without comparing them"]
    found = changes(state["config"], run.to_dict())
    if state.get("world_size", world_size) != world_size:
        found.append(f"processes (--fabric.devices x --fabric.num_nodes): {state['world_size']} -> {world_size}")
    if found and not accept_changes:
        where = f"{Path(run_dir) / CONFIG}" + (f" and run on {state['world_size']} processes" if found[-1]
                                               .startswith("processes") else "")
        raise DriftError(f"cannot resume {run_dir}: {folder.name} was saved with another config or process count, "
                         "so the resumed run would not be exact:\n" + "".join(f"  {c}\n" for c in found)
                         + f"fix: restore the saved values in {where}, or pass --accept-changes to continue anyway")
    return [f"note: --accept-changes: resuming {folder.name} with a change (saved -> now): {c}" for c in found]


def resumed(run_dir: Path, flags: list[tuple[str, str | None]], accept_changes: bool = False,
            ) -> tuple[RunConfig, str | None]:
    """The run ``--resume run_dir`` continues: its config.toml with ``flags`` (only :data:`EXTEND`,
    each raised, never lowered) on top; and, when its last checkpoint already reached the end
    (and passes :func:`check_resume`), a message saying so: then there is nothing to resume."""
    from robovla import checkpoint
    from robovla import config as cfg
    from robovla.errors import ConfigError

    config = checkpoint.run_config(run_dir, f"--resume {run_dir}", header="cannot resume")
    saved = cfg.resolve(cfg.NONE, config, [])
    run = cfg.resolve(cfg.NONE, config, flags)
    folder, state = checkpoint.resumable(run_dir)  # damaged: an error naming the file, finished or not
    per_epoch = state.get("steps_per_epoch")

    def total(t: Any) -> float:
        return t.max_steps or (math.ceil(t.epochs * per_epoch) if per_epoch else math.inf)

    was, now = saved.train, run.train
    problems = []
    if total(now) < total(was):
        given = ", ".join(f"--{k} {v}" for k, v in flags if k.replace("-", "_") != "train.max_minutes")
        problems.append(f"{given}: the run would stop after {total(now):.0f} steps, before its {total(was):.0f}; "
                        "resuming may only raise its length")
    if now.epochs != was.epochs and now.max_steps is not None:
        problems.append(f"--train.epochs {now.epochs}: this run stops at --train.max_steps {now.max_steps}, which "
                        "overrides epochs; raise --train.max_steps instead")
    if problems:
        raise ConfigError(problems, header="cannot resume")
    if state["step"] >= total(now):
        from robovla.preflight import world_size

        processes = state.get("world_size") or world_size(run.fabric)  # devices=auto: as many as it ran on
        check_resume(run, run_dir, processes, accept_changes)  # damaged or edited: say that instead
        longer = f"--train.max_steps {2 * state['step']}" if now.max_steps else f"--train.epochs {2 * now.epochs:g}"
        return run, (f"{run_dir} finished at step {state['step']} of {total(now):.0f} ({folder.name}); "
                     f"nothing to resume. Train it longer with `robo-run --resume {run_dir} {longer}`, or evaluate it "
                     f"with `robo-run eval --run {run_dir}`")
    return run, None


def record_length(run_dir: Path, config_text: str) -> None:
    """A resumed run's config.toml, replaced (atomically) by ``config_text`` when that gives the run
    another length (:data:`EXTEND`); left as it is otherwise."""
    from robovla.registry_file import tomllib  # tomli before Python 3.11

    file = Path(run_dir) / CONFIG
    was, now = (tomllib.loads(text).get("train", {}) for text in (file.read_text(), config_text))
    if any(was.get(k.split(".")[1]) != now.get(k.split(".")[1]) for k in EXTEND):
        tmp = file.with_name(f".{CONFIG}.tmp")
        tmp.write_text(config_text)
        os.replace(tmp, file)


def checked_folder(run: RunConfig, run_dir: Path, resuming: bool, world_size: int, overwrite: bool,
                   accept_changes: bool) -> list[str]:
    """Before any process starts: a resumed run's checkpoint is whole and saved with this config
    (:func:`check_resume`); a new run's folder holds no earlier run (``overwrite``
    moves it aside) and its ``--train.init`` checkpoint is whole. Returns notes to print."""
    if resuming:
        return check_resume(run, run_dir, world_size, accept_changes)
    from robovla import checkpoint
    from robovla.sharing import local_folder

    init = run.train.init and local_folder(run.train.init, "--train.init").resolve()  # a hub repo: downloaded
    if overwrite and init and init.is_relative_to(Path(run_dir).resolve()):
        raise RunFolderError(f"--train.init {run.train.init} is inside {run_dir}, which --overwrite would delete")
    if init:
        folder = checkpoint.checkpoint_folder(init)
        checkpoint.verify(folder, checkpoint.read_state(folder), weights_only=True)
    claim(run_dir, overwrite)  # deleted once the new run has started (setup), restored if it fails first
    return []


# ------------------------------------------------------------------------------ RNG


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


def decoded(state: dict[str, Any]) -> tuple[Any, ...]:
    """:func:`rng_state`'s dict -> (python, numpy, torch, cuda or None) states, each tried on a
    fresh generator: a damaged one raises here, before any of this process's generators changes."""
    def raw(key: str) -> bytearray:
        return bytearray(base64.b64decode(state[key], validate=True))

    version, internal, gauss = json.loads(raw("python"))
    python = (version, tuple(internal), gauss)
    numpy = ("MT19937", np.asarray(json.loads(raw("numpy")), dtype=np.uint32), state["numpy_pos"])
    cpu = torch.frombuffer(raw("torch"), dtype=torch.uint8)
    random.Random().setstate(python)
    np.random.RandomState().set_state(numpy)
    torch.Generator().set_state(cpu)
    return python, numpy, cpu, torch.frombuffer(raw("cuda"), dtype=torch.uint8) if "cuda" in state else None


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    python, numpy, cpu, cuda = decoded(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if device is not None and device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng-{rank}.json"


def save_rng(folder: Path, rank: int, device: torch.device | None = None) -> None:
    """Write process ``rank``'s RNG states into checkpoint folder ``folder`` (every process its own)."""
    rng_file(folder, rank).write_text(json.dumps(rng_state(device)))


def read_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    """Process ``rank``'s RNG states saved in ``folder``, checked; None when it holds none for
    that rank (a run resumed on more processes than it was saved from)."""
    file, fix = rng_file(folder, rank), earlier(folder)
    if file.is_file():
        state = read_json(file, "RNG states (JSON)", fix)
    elif rank == 0 and read_state(folder).get("rng") is not None:  # older checkpoints: one state for all ranks
        file, state = Path(folder) / STATE, read_state(folder)["rng"]
    else:
        return None
    with reading(file, "RNG states", fix):
        decoded(state)
    return state


def load_rng(folder: Path, rank: int, device: torch.device | None = None) -> bool:
    """Restore process ``rank``'s RNG states from ``folder``; False when it holds none for that rank."""
    state = read_rng(folder, rank)
    if state is not None:
        set_rng_state(state, device)
    return state is not None
