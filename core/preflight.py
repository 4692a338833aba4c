"""Checks across fields and against this machine, made before a training run starts any work.

A config model checks each field on its own (bounds, finite numbers, run-name rules below);
what one field cannot know is checked here, once the whole run is resolved and before a
process is launched, a model built or a cache written:

- folders: ``--train.output_dir`` and ``--train.cache`` can be created and written,
  ``--train.val_path`` and ``--train.init`` exist (a hub repo id given to ``--train.init`` is downloaded);
- the machine: ``--fabric.accelerator`` is there (no CUDA device, no GPU run),
  ``--fabric.devices`` fits it (on a CPU every device is a process: at most one per core),
  the strategy's package is installed and fits the accelerator, and a multi-node run has
  the variables that let its machines find each other (else it would wait forever);
- the data: the dataset opens (a task folder given instead of its ``training/`` is named),
  holds every camera the backbone reads and the action array the action space reads, of the
  size it decodes, knows every task ``--dataset.tasks`` names, and gives at least one global
  batch of windows; the validation split opens, has the cameras, and is not the training
  folder itself;
- names and packages: ``--train.eval_env`` is a registered environment, wandb is installed
  for ``--train.wandb_project``.

It also says which process of a launched run speaks for it (:func:`first_process`).

Two conventions let core check components it does not know: a backbone config with a
``cameras`` field reads those cameras, and a dataset config with a ``tasks`` field keeps only
the segments of those tasks (:class:`robovla.dataset.Segment` ``task``). Every problem is
collected and raised once as a :class:`robovla.errors.ConfigError` naming the flag.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robovla.errors import ConfigError, RobovlaError, unknown

if TYPE_CHECKING:
    from robovla.config import FabricConfig, RunConfig

MAX_RUN_NAME = 128
"""Characters in a run name: well under the 255-byte file-name limit of common file systems."""


def check_run_name(name: str | None) -> str | None:
    """A run name is one plain folder name: no path separators, not ``.`` or ``..``, printable,
    valid UTF-8 (no lone surrogates), at most :data:`MAX_RUN_NAME` characters."""
    if name is None:
        return None
    if not name.strip():
        raise ValueError("is empty; give a folder name such as my-run, or none for <backbone>-<head>-<date>-<time>")
    if len(name) > MAX_RUN_NAME:
        raise ValueError(f"is {len(name)} characters long; the limit is {MAX_RUN_NAME}")
    if any(sep in name for sep in "/\\") or name in (".", ".."):
        raise ValueError(f"{name[:40]!r} is not a single folder name (no '/', '\\', '.' or '..'): the run folder "
                         "must stay inside --train.output_dir; use --train.output_dir to choose where it goes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name[:40]!r} is not valid text (it holds a lone surrogate); use plain characters") from None
    bad = sorted({c for c in name if not c.isprintable()})
    if bad:
        raise ValueError(f"{name[:40]!r} holds unprintable characters {bad}; use letters, digits, '-', '_' or '.'")
    return name


def check(run: RunConfig, resuming: bool = False) -> None:
    """Every cross-field and machine check of a training run; raises one ConfigError listing all
    problems. ``resuming``: the run folder exists already (``--resume``), so output_dir is not checked."""
    problems = [] if resuming else folder_problems(run)
    problems += fabric_problems(run.fabric)
    problems += data_problems(run)
    if run.train.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        problems.append(f"--train.wandb_project {run.train.wandb_project}: the wandb package is not installed; "
                        "pip install wandb, or leave --train.wandb_project unset")
    if run.train.eval_env is not None:
        from robovla.registry import get_component

        try:
            get_component("env", run.train.eval_env)
        except RobovlaError as exc:
            problems.append(f"--train.eval_env {run.train.eval_env}: {exc}")
    if problems:
        raise ConfigError(problems, header="cannot start training")


# ---------------------------------------------------------------------------- folders


def writable(path: Path, flag: str) -> str | None:
    """The problem with creating or writing folder ``path`` (given by ``flag``), or None. A
    folder made and removed again in its nearest existing folder is the test; nothing stays."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            return f"{flag} {path}: {existing} is a broken symbolic link; fix it or choose another folder"
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == path else f"would be inside {existing}, which is"
        return f"{flag} {path}: {what} a file, not a folder; choose a folder"
    try:  # a real probe: permission bits say nothing for root, read-only mounts or /proc
        tempfile.TemporaryDirectory(prefix=".robovla-probe-", dir=existing).cleanup()
    except OSError as exc:
        where = "" if existing == path else f" (in its nearest existing folder {existing})"
        return f"{flag} {path}: cannot be written{where}: {exc.strerror or exc}; choose a folder you can write"
    return None


def folder_problems(run: RunConfig) -> list[str]:
    t = run.train
    found = [writable(t.output_dir, "--train.output_dir")]
    if t.run_name is not None and (Path(t.output_dir).expanduser() / t.run_name).exists() and \
            not (Path(t.output_dir).expanduser() / t.run_name).is_dir():
        found.append(f"--train.run_name {t.run_name}: {Path(t.output_dir) / t.run_name} is a file, not a folder; "
                     "choose another run name")
    if t.cache not in ("auto", "none"):
        found.append(writable(Path(t.cache), "--train.cache"))
    if t.val_path not in ("auto", "none") and not Path(t.val_path).expanduser().is_dir():
        found.append(f"--train.val_path {t.val_path}: no such folder; give the validation split folder, "
                     "or auto (the dataset path's sibling validation/) or none")
    if t.init is not None and not Path(t.init).expanduser().exists():
        found.append(init_problem(t.init))
    return [p for p in found if p]


def init_problem(init: str) -> str | None:
    """What is wrong with a ``--train.init`` that names no local folder: a Hugging Face repo id that
    cannot be downloaded (robovla.sharing), or neither; None once the repo's files are here."""
    from robovla.sharing import ShareError, is_repo_id, local_folder

    if not is_repo_id(init):
        return (f"--train.init {init}: no such run or checkpoint folder; give runs/<name>, "
                "runs/<name>/checkpoints/step-N or a Hugging Face repo id (owner/name) of an exported policy")
    try:
        local_folder(init, "--train.init")
    except ShareError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------- machine


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def started_rank() -> int:
    """This process's rank when an outside launcher (torchrun, SLURM's srun) started every
    process of the run; 0 otherwise."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if "SLURM_NTASKS" in os.environ else None)
    return int(rank) if rank and rank.isdigit() else 0


def first_process() -> bool:
    """Whether this process speaks for the run: not one of the processes a launcher (torchrun,
    SLURM, Fabric's own) started besides the first."""
    return started_rank() == 0 and os.environ.get("LOCAL_RANK", "0") == "0"


CLUSTER_VARIABLES = ("MASTER_ADDR", "NODE_RANK", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID",
                     "OMPI_COMM_WORLD_SIZE")
"""Any one of these says how the machines of a multi-node run find each other (Lightning reads them)."""


def fabric_problems(f: FabricConfig) -> list[str]:
    """The accelerator, strategy and packages the run needs are there and the device count fits them."""
    import torch

    found = devices_problems(f)
    on_cpu = f.accelerator == "cpu" or (f.accelerator == "auto" and not torch.cuda.is_available())
    if f.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        found.append("--fabric.strategy deepspeed: the deepspeed package is not installed; pip install deepspeed, "
                     "or use --fabric.strategy fsdp or ddp")
    if f.strategy == "fsdp" and on_cpu:
        found.append("--fabric.strategy fsdp: FSDP runs on GPUs only; use --fabric.strategy ddp (or auto) on the CPU")
    if f.precision == "16-mixed" and on_cpu:
        found.append("--fabric.precision 16-mixed: float16 mixed precision runs on GPUs only; use bf16-mixed or "
                     "32-true on the CPU")
    if f.num_nodes > 1 and not any(v in os.environ for v in CLUSTER_VARIABLES):
        found.append(f"--fabric.num_nodes {f.num_nodes}: none of {', '.join(CLUSTER_VARIABLES)} is set, so this "
                     "process cannot find the other machines and would wait for them; start it on every machine "
                     "with torchrun or SLURM (or set MASTER_ADDR, MASTER_PORT and NODE_RANK), or use one node")
    return found


def devices_problems(f: FabricConfig) -> list[str]:
    """The accelerator is there and the device count fits it."""
    import torch

    accelerator = f.accelerator
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        return [f"--fabric.accelerator {accelerator}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                "False); use --fabric.accelerator cpu or auto"]
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "mps" and not (mps is not None and mps.is_available()):
        return ["--fabric.accelerator mps: no Apple MPS device is available here; use --fabric.accelerator cpu or auto"]
    if f.devices == "auto":
        return []
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        cores = cpu_cores()
        if f.devices > cores:
            return [f"--fabric.devices {f.devices}: on the CPU every device is a separate training process, and this "
                    f"machine gives this process {cores} core{'s' * (cores != 1)}; use at most {cores} (or auto)"]
    elif f.devices > torch.cuda.device_count():
        return [f"--fabric.devices {f.devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                "use at most that many (or auto)"]
    return []


def world_size(f: FabricConfig) -> int:
    """Processes the run will have, where the config fixes it (``auto`` devices count as one)."""
    return (f.devices if isinstance(f.devices, int) else 1) * f.num_nodes


# ------------------------------------------------------------------------------- data


def data_problems(run: RunConfig) -> list[str]:
    """The training split opens, has the backbone's cameras and the named tasks, and yields a batch."""
    import numpy as np

    import robovla
    from robovla.windows import counts

    name, config = run.dataset.name, run.dataset.config
    path = dict(config).get("path")
    try:
        dataset = robovla.create("dataset", name, config)
        bounds = np.asarray(dataset.segment_table().bounds, dtype=np.int64).reshape(-1, 2)  # (start, end) [S, 2]
    except (RobovlaError, OSError) as exc:
        from robovla.registry import summary

        return [f"--dataset {name}: {summary(str(exc))}{task_folder_hint(path)}"]
    found = split_problems(run, path) + action_problems(run, dataset, bounds)
    if run.train.cache == "auto" and path is not None:
        from robovla.frame_cache import CACHE_DIR

        problem = writable(Path(path).expanduser() / CACHE_DIR, "--train.cache auto: the frame cache folder")
        found += [f"{problem}, or pass --train.cache DIR (a folder you can write) or --train.cache none"] if problem \
            else []
    wanted = getattr(run.backbone.config, "cameras", None)
    missing = [cam for cam in wanted or () if cam not in dataset.cameras]
    if missing:
        found.append(f"--backbone.cameras: backbone {run.backbone.name!r} reads {list(wanted)}, but dataset "
                     f"{name!r} provides only {list(dataset.cameras)} (no {missing}); add them with "
                     f"--dataset.cameras, or read only {list(dataset.cameras)} with --backbone.cameras")
    tasks = getattr(config, "tasks", None)
    if tasks:
        found += _task_problems(name, config, tasks)
    found += validation_problems(run, wanted or ())
    if not len(bounds):
        return found + ([] if tasks else [f"--dataset {name}: the split lists no annotated segments to train on"])
    t = run.train
    windows = int(counts(bounds, t.window).sum())  # as robovla.windows cuts them
    batch = t.batch_size * world_size(run.fabric)
    if windows < batch:
        longest = int((bounds[:, 1] - bounds[:, 0]).max()) + 1
        found.append(f"--train.batch_size {t.batch_size}, --train.window {t.window}: the training split gives "
                     f"{windows} windows of {t.window} frames (its longest segment has {longest} frames), fewer than "
                     f"one global batch of {batch}; lower --train.batch_size or --train.window")
    return found


def _task_problems(name: str, config: Any, tasks: list[str]) -> list[str]:
    """The tasks ``--dataset.tasks`` names that the split does not have, listed with the valid ones."""
    import robovla

    try:
        have = set(robovla.create("dataset", name, config.model_copy(update={"tasks": None})).segment_table().tasks)
    except (RobovlaError, OSError) as exc:
        return [f"--dataset.tasks: cannot list the split's tasks: {exc}"]
    have.discard(None)
    return [f"--dataset.tasks: {unknown('task', task, have)}" for task in tasks if task not in have]


def task_folder_hint(path: Any) -> str:
    """For a dataset path that does not open: the split to pass when it is a task folder."""
    if path is None:
        return ""
    inside = [s for s in ("training", "validation") if (Path(path).expanduser() / s).is_dir()]
    if "training" in inside:
        return f" ({path} is a task folder holding {' and '.join(s + '/' for s in inside)}: pass --dataset.path " \
               f"{Path(path) / 'training'})"
    return f" ({path} is a task folder holding only validation/: train on a training split)" if inside else ""


def split_problems(run: RunConfig, path: Any) -> list[str]:
    """A validation split given as the training data, while validation would read the same folder."""
    if path is None or Path(path).expanduser().name != "validation" or run.train.val_path != "auto":
        return []
    training = Path(path).parent / "training"
    where = f"train on {training}" if training.expanduser().is_dir() else "train on a training split"
    return [f"--dataset.path {path}: is a validation split, and --train.val_path auto would validate on that same "
            f"folder; {where}, or pass --train.val_path none to train on it without validation"]


def validation_problems(run: RunConfig, cameras: Any) -> list[str]:
    """The validation split (``--train.val_path``, or auto: the sibling validation/) opens and has the cameras."""
    import robovla
    from robovla.data import split_path

    try:
        path = split_path(run, "val")
        if path is None:
            return []
        dataset = robovla.create("dataset", run.dataset.name, {**dict(run.dataset.config), "path": str(path)})
        dataset.segment_table()
    except (RobovlaError, OSError) as exc:
        from robovla.registry import summary

        return [f"--train.val_path {run.train.val_path}: the validation split does not open: {summary(str(exc))}; "
                "fix it, or pass --train.val_path none (no validation)"]
    missing = [cam for cam in cameras if cam not in dataset.cameras]
    return [f"--train.val_path {run.train.val_path}: the validation split {path} has no cameras {missing}, which the "
            "backbone reads"] if missing else []


def action_problems(run: RunConfig, dataset: Any, bounds: Any) -> list[str]:
    """The action space reads an action array the dataset loads, of the size the space decodes."""
    import numpy as np

    import robovla

    if not len(bounds):
        return []
    try:
        space = robovla.create("action_space", run.action_space.name, run.action_space.config)
        frames = dataset.load(int(bounds[0, 0]), int(bounds[0, 0]))
    except (RobovlaError, OSError) as exc:
        return [f"--action-space {run.action_space.name}: cannot check it against the data: {exc}"]
    have = {k: np.shape(v)[-1] for k, v in frames.actions.items()}
    if space.source not in have:
        return [f"--action-space {run.action_space.name}: reads the dataset's {space.source!r} actions, but dataset "
                f"{run.dataset.name!r} loads only {sorted(have)}; load them (e.g. --dataset.action_keys "
                f"{space.source}) or choose an action space that reads {sorted(have)}"]
    size = space.command_dim or space.action_dim
    if have[space.source] != size:
        fix = (f"pass --action-space.dim {have[space.source]}" if "dim" in type(space).Config.model_fields
               else "choose an action space of that size")
        return [f"--action-space {run.action_space.name}: decodes {size} action dimensions, but the "
                f"dataset's {space.source!r} actions have {have[space.source]}; {fix}"]
    return []
