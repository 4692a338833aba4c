"""What a LeRobotDataset v3.0 folder holds, read as data (pyarrow for the parquet files).

    meta/info.json                               schema: fps, features, path templates, totals
    meta/stats.json                              per-feature statistics (min, max, mean, std, count, ...)
    meta/tasks.parquet                           task string -> task_index
    meta/episodes/chunk-000/file-000.parquet     one row per episode: length, tasks, where its rows
                                                 and video frames are (data/*, videos/<key>/*)
    data/chunk-000/file-000.parquet              one row per frame, many episodes per file
    videos/<key>/chunk-000/file-000.mp4          one stream per camera, many episodes per file

Frame ids are the dataset's global ``index`` (``dataset_from_index`` .. ``dataset_to_index - 1``
per episode); an episode's video frames start at ``videos/<key>/from_timestamp`` in its file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robovla.errors import RobovlaError

VERSION = "v3.0"
INFO = "meta/info.json"
STATS = "meta/stats.json"
TASKS = "meta/tasks.parquet"
EPISODES = "meta/episodes"
IMAGE_PREFIX = "observation.images."
INSTALL = "pip install 'robovla[lerobot]' (pyarrow and av)"
EPISODE_COLUMNS = ("episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                   "dataset_to_index")


class LeRobotDataError(RobovlaError, ValueError):
    """A LeRobotDataset folder that cannot be read as one; the message names the file and the key."""


def pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or an error naming the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LeRobotDataError(f"reading a LeRobotDataset needs pyarrow: {INSTALL}") from None
    return pq


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json``, checked for what the reader relies on."""
    file = root / INFO
    try:
        info = json.loads(file.read_text())
    except FileNotFoundError:
        raise LeRobotDataError(f"{file}: missing; a LeRobotDataset folder holds meta/info.json (is {root} the "
                               "dataset's root folder?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LeRobotDataError(f"{file}: not readable as JSON ({exc})") from None
    if not isinstance(info, dict):
        raise LeRobotDataError(f"{file}: expected a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version")
    if version != VERSION:
        hint = (" (convert it with lerobot's convert_dataset_v21_to_v30 script)" if str(version).startswith("v2")
                else "")
        raise LeRobotDataError(f"{file}: codebase_version is {version!r}; robovla reads LeRobotDataset "
                               f"{VERSION}{hint}")
    missing = [k for k in ("fps", "features", "data_path") if k not in info]
    if missing:
        raise LeRobotDataError(f"{file}: no {', '.join(missing)}; a LeRobotDataset {VERSION} info.json has them")
    if not isinstance(info["features"], dict) or not isinstance(info["fps"], (int, float)) or info["fps"] <= 0:
        raise LeRobotDataError(f"{file}: 'features' must be an object and 'fps' a positive number")
    return info


def read_stats(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """``meta/stats.json`` as arrays per feature and statistic; {} when absent or unreadable."""
    try:
        stats = json.loads((root / STATS).read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, values in stats.items() if isinstance(stats, dict) else ():
        if isinstance(values, dict):
            try:
                out[key] = {k: np.asarray(v, np.float64) for k, v in values.items()}
            except (TypeError, ValueError):
                continue
    return out


def read_tasks(root: Path) -> dict[int, str]:
    """``meta/tasks.parquet``: task_index -> task string (the task is the table's index column)."""
    file = root / TASKS
    if not file.is_file():
        raise LeRobotDataError(f"{file}: missing; a LeRobotDataset {VERSION} lists its tasks there")
    table = read_table(file)
    names = [n for n in table.column_names if n != "task_index"]
    if "task_index" not in table.column_names or len(names) != 1:
        raise LeRobotDataError(f"{file}: expected a task_index column and the task strings, got "
                               f"{table.column_names}")
    tasks = table.column(names[0]).to_pylist()
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), tasks)}


def read_table(file: Path, columns: list[str] | None = None) -> Any:
    """A parquet file (or some of its columns) as a pyarrow Table; an unreadable one is a LeRobotDataError."""
    pq = pyarrow_parquet()
    try:
        return pq.read_table(file, columns=columns)
    except (OSError, ValueError, KeyError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise LeRobotDataError(f"{file}: not readable as parquet ({str(exc).splitlines()[0]})") from None


@dataclass
class Episodes:
    """The episode table, one entry per episode, in episode order."""

    index: np.ndarray  # int64 [E] episode_index
    start: np.ndarray  # int64 [E] first global frame id
    end: np.ndarray  # int64 [E] last global frame id (inclusive)
    data_file: list[tuple[int, int]]  # (chunk, file) of the frame rows
    videos: dict[str, list[tuple[int, int, float]]]  # video key -> (chunk, file, from_timestamp) per episode


def read_episodes(root: Path, video_keys: list[str]) -> Episodes:
    """Every ``meta/episodes/chunk-*/file-*.parquet``, checked for the columns the reader uses."""
    files = sorted((root / EPISODES).glob("chunk-*/file-*.parquet"))
    if not files:
        raise LeRobotDataError(f"{root / EPISODES}: no chunk-*/file-*.parquet; a LeRobotDataset {VERSION} lists "
                               "its episodes there")
    want = [*EPISODE_COLUMNS, *(f"videos/{k}/{c}" for k in video_keys
                                for c in ("chunk_index", "file_index", "from_timestamp"))]
    columns: dict[str, list[Any]] = {c: [] for c in want}
    pq = pyarrow_parquet()
    for file in files:
        have = pq.read_schema(file).names
        missing = [c for c in want if c not in have]
        if missing:
            raise LeRobotDataError(f"{file}: no column(s) {missing}; every LeRobotDataset {VERSION} episode row "
                                   "has them")
        table = read_table(file, want)
        for c in want:
            columns[c].extend(table.column(c).to_pylist())
    order = np.argsort(np.asarray(columns["episode_index"], np.int64), kind="stable")
    col = {c: [v[i] for i in order] for c, v in columns.items()}
    start = np.asarray(col["dataset_from_index"], np.int64)
    end = np.asarray(col["dataset_to_index"], np.int64) - 1
    bad = np.flatnonzero((end < start) | (end - start + 1 != np.asarray(col["length"], np.int64)))
    if len(bad):
        raise LeRobotDataError(f"{root / EPISODES}: episodes {np.asarray(col['episode_index'])[bad][:10].tolist()} "
                               "have dataset_to_index - dataset_from_index != length")
    return Episodes(
        index=np.asarray(col["episode_index"], np.int64), start=start, end=end,
        data_file=list(zip(map(int, col["data/chunk_index"]), map(int, col["data/file_index"]))),
        videos={k: list(zip(map(int, col[f"videos/{k}/chunk_index"]), map(int, col[f"videos/{k}/file_index"]),
                            map(float, col[f"videos/{k}/from_timestamp"]))) for k in video_keys})


def data_file(root: Path, info: dict[str, Any], chunk: int, file: int) -> Path:
    return root / info["data_path"].format(chunk_index=chunk, file_index=file)


def video_file(root: Path, info: dict[str, Any], key: str, chunk: int, file: int) -> Path:
    if "video_path" not in info or not info["video_path"]:
        raise LeRobotDataError(f"{root / INFO}: feature {key!r} is a video, but there is no video_path template")
    return root / info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file)


def image_features(info: dict[str, Any]) -> dict[str, str]:
    """Feature key -> its dtype ("video" or "image") for every camera-like feature."""
    return {k: f.get("dtype") for k, f in info["features"].items()
            if isinstance(f, dict) and f.get("dtype") in ("video", "image")}


def as_array(column: Any) -> np.ndarray:
    """A parquet column as numpy: scalars [n], fixed or variable lists of numbers [n, d]."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type):
        flat = array.flatten().to_numpy(zero_copy_only=False)
        if len(array) and len(flat) % len(array):
            raise ValueError("rows of different lengths")
        return flat.reshape(len(array), -1) if len(array) else flat.reshape(0, 0)
    return array.to_numpy(zero_copy_only=False)
