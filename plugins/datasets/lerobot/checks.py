"""``robo-run data check`` on a LeRobotDataset: every problem, each with its file and key.

It reads the metadata and every data file's non-image columns, and decodes (or unpacks) the
first and last frame of every episode for each camera, which opens every video file the
episodes name and finds one that is shorter than they say.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robovla.batch import ROBOT_OBS_DIM
from robovla.dataset import Problem
from robovla_plugins.datasets.lerobot import files
from robovla_plugins.datasets.lerobot.files import INFO, LeRobotDataError

FIRST_PROBLEMS = 50  # problems listed before the rest are only counted


def problems(dataset: Any) -> list[Problem]:
    root = dataset.root
    found: list[Problem] = []
    try:
        mapping = dataset.mapping()
        ep = dataset.episodes()
        tables = files.read_tasks(root)
    except (LeRobotDataError, KeyError) as exc:
        return [Problem(str(root / INFO), "", str(exc).strip("'\""))]
    state = dataset.config.state_key
    if state and dataset._vector(state, "state_key") != ROBOT_OBS_DIM:
        found.append(Problem(str(root / INFO), state, mapping["robot_obs"] + f": robovla's robot state has "
                             f"{ROBOT_OBS_DIM} values; pass --dataset.state_key none"))
    total = int(dataset.info.get("total_frames", -1))
    if total >= 0 and total != int((ep.end - ep.start + 1).sum()):
        found.append(Problem(str(root / INFO), "total_frames", f"{total}, but meta/episodes lists "
                             f"{int((ep.end - ep.start + 1).sum())} frames"))
    for e in range(len(ep.index)):
        if len(found) >= FIRST_PROBLEMS:
            break
        found += _episode(dataset, ep, e, tables)
    return found


def _episode(dataset: Any, ep: Any, e: int, tasks: dict[int, str]) -> list[Problem]:
    root = dataset.root
    name = f"episode {int(ep.index[e])}"
    file = files.data_file(root, dataset.info, *ep.data_file[e])
    try:
        cols = dataset._file_columns(file)
        rows = dataset._rows(cols, int(ep.start[e]), int(ep.end[e]))
    except LeRobotDataError as exc:
        return [Problem(str(file), name, str(exc))]
    out = []
    unknown = sorted(set(cols["task_index"][rows].astype(int).tolist()) - set(tasks))
    if unknown:
        out.append(Problem(str(file), "task_index", f"{name}: task_index {unknown} not in meta/tasks.parquet"))
    for key in (dataset.config.action_key, dataset.config.state_key):
        if key in cols and not np.isfinite(np.asarray(cols[key][rows], np.float64)).all():
            out.append(Problem(str(file), key, f"{name}: non-finite values"))
    for frame in sorted({int(ep.start[e]), int(ep.end[e])}):
        try:
            frames = dataset.load(frame, frame)
        except (LeRobotDataError, KeyError) as exc:
            out.append(Problem(str(file), name, f"frame {frame}: {str(exc).strip(chr(39))}"))
            break
        for camera, image in frames.images.items():
            want = tuple(dataset.features[dataset.camera_keys[camera]].get("shape", ()))
            if want and image.shape[1:] != want:
                out.append(Problem(str(file), dataset.camera_keys[camera], f"{name}: images are "
                                   f"{list(image.shape[1:])}, meta/info.json says {list(want)}"))
    return out
