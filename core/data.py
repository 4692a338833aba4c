"""A run's data: its dataset splits (behind the frame cache) and its action space, fitted.

Training, evaluation and the benches open data the same way, from a resolved
:class:`robovla.config.RunConfig`:

    train = open_dataset(run, "train")       # --dataset.path
    val = open_dataset(run, "val")           # --train.val_path (auto: the sibling validation/)
    space = action_space(run, train)         # fitted on the training frames
    space = saved_action_space(run, run_dir) # as a run saved it (action_stats.json)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from robovla.config import RunConfig
from robovla.errors import ConfigError
from robovla.frame_cache import CACHE_DIR, CachedDataset, frame_blocks, merged_ranges


def split_path(run: RunConfig, split: str) -> Path | None:
    """The folder of ``split`` ("train" or "val"); None when the run has no validation split."""
    path = dict(run.dataset.config).get("path")
    if split == "train" or path is None:
        return None if path is None else Path(path).expanduser()
    val = run.train.val_path
    if val == "none":
        return None
    if val == "auto":
        sibling = Path(path).expanduser().parent / "validation"
        return sibling if sibling.is_dir() else None
    if not Path(val).expanduser().is_dir():
        raise ConfigError([f"--train.val_path {val}: no such folder; point it at a validation split, or pass "
                           "--train.val_path none (no validation)"])
    return Path(val).expanduser()


def open_dataset(run: RunConfig, split: str = "train") -> Any:
    """The training split, or the validation split (None when there is none), behind the
    frame cache unless ``--train.cache none``."""
    import robovla

    config = dict(run.dataset.config)
    path = split_path(run, split)
    if split == "val":
        if path is None:
            return None
        config["path"] = str(path)
    source = robovla.create("dataset", run.dataset.name, config)
    if run.train.cache == "none":
        return source
    root = Path(getattr(source, "root", None) or Path(config["path"]).expanduser())  # a hub id's local copy
    folder = root / CACHE_DIR if run.train.cache == "auto" else Path(run.train.cache).expanduser() / split
    return CachedDataset(source, folder)


def fit_action_space(space: Any, dataset: Any) -> None:
    """The dataset's own statistics when the space takes them, else one streaming pass over the
    annotated frames, block by block."""
    shipped = getattr(dataset, "statistics", lambda key: None)(space.source)
    if shipped is not None and getattr(space, "fit_statistics", lambda stats: False)(shipped):
        return

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a, b in frame_blocks(merged_ranges(dataset.segments())):
            frames = dataset.load(a, b)
            yield frames.actions[space.source], frames.robot_obs

    space.fit(blocks())


def action_space(run: RunConfig, dataset: Any) -> Any:
    """The run's action space, fitted on ``dataset``."""
    import robovla

    space = robovla.create("action_space", run.action_space.name, run.action_space.config)
    fit_action_space(space, dataset)
    return space


def saved_action_space(run: RunConfig, run_dir: Path) -> Any:
    """The run's action space with the statistics it was fitted to (``run_dir``'s action_stats.json),
    checked: a JSON object of finite numbers that the space loads and decodes with."""
    import robovla
    from robovla.checkpoint import STATS, DamagedError, read_json, reading

    file = Path(run_dir) / STATS
    fix = "it is written when the run starts and read with every checkpoint: restore it from a copy of the run"
    state = read_json(file, "the fitted action space (JSON)", fix)
    try:
        plain = isinstance(state, dict) and _finite(state)
    except RecursionError:
        plain = False
    if not plain:
        raise DamagedError(f"{file}: expected a JSON object of finite numbers (the fitted action space), got "
                           f"{json.dumps(state)[:200]}; {fix}")
    space = robovla.create("action_space", run.action_space.name, run.action_space.config)
    with reading(file, f"the fitted state of action space {run.action_space.name!r}", fix):
        space.load_state_dict(state)
        space.decode(np.zeros((1, space.action_dim)), np.zeros((1, 15)))  # statistics of the wrong shape fail here
    return space


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return isinstance(value, str | bool) or value is None or (isinstance(value, int | float) and np.isfinite(value))
