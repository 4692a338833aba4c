"""``robo-run data export --to lerobot SPLIT OUT``: a robovla dataset written as a LeRobotDataset v3.0.

Each language-annotated segment becomes one episode, its instruction the episode's task;
each camera becomes ``observation.images.<camera>`` (an AV1 MP4 stream, or PNG images in
the parquet files with ``images=True``), robot_obs ``observation.state`` and the chosen
action key ``action``. The files, their schema and their metadata are those lerobot 0.4's
own writer produces (tests/data/lerobot holds datasets it wrote, and a test compares):
the same codec settings (libsvtav1, yuv420p, GOP 2, CRF 30, preset 12), one parquet row
group per episode, per-episode statistics in meta/episodes and the totals in meta/stats.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from robovla_plugins.datasets.lerobot.files import (EPISODES, IMAGE_PREFIX, INFO, STATS, TASKS, VERSION,
                                                    LeRobotDataError, pyarrow_parquet)

CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CODEC = {"name": "libsvtav1", "pix_fmt": "yuv420p", "options": {"g": "2", "crf": "30", "preset": "12"}}
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
IMAGE_SAMPLES = 100  # frames per episode that image statistics are taken from, evenly spaced
ROBOT_OBS_NAMES = ["tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
                   *(f"joint_{i}" for i in range(1, 8)), "gripper_action"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


def _vector(dim: int, names: list[str] | None) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [dim], "names": names if names and len(names) == dim else None}


def features(cameras: dict[str, tuple[int, int]], state_dim: int, action_dim: int, videos: bool, fps: int,
             action_key: str) -> dict[str, Any]:
    """info.json's ``features``, in lerobot's order: cameras, state, action, then the index columns
    (statistics are listed in this order too)."""
    out: dict[str, Any] = {}
    for camera, (h, w) in cameras.items():
        f: dict[str, Any] = {"dtype": "video" if videos else "image", "shape": [h, w, 3],
                             "names": ["height", "width", "channels"]}
        if videos:
            f["info"] = {"video.height": h, "video.width": w, "video.codec": "av1", "video.pix_fmt": CODEC["pix_fmt"],
                         "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}
        out[IMAGE_PREFIX + camera] = f
    out["observation.state"] = _vector(state_dim, ROBOT_OBS_NAMES)
    out["action"] = _vector(action_dim, ACTION_NAMES if action_key == "rel_actions" else None)
    out["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in INDEX_COLUMNS[1:]:
        out[key] = {"dtype": "int64", "shape": [1], "names": None}
    return out


def hf_features(feats: dict[str, Any]) -> dict[str, Any]:
    """The ``huggingface`` schema metadata the datasets library writes beside the columns."""
    out: dict[str, Any] = {}
    for key, f in feats.items():
        if f["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif f["dtype"] == "video":
            continue
        elif key in INDEX_COLUMNS:
            out[key] = {"dtype": f["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": f["shape"][0], "_type": "List"}
    return out


# ------------------------------------------------------------------------------ statistics


def stats_of(values: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """min, max, mean, std, count and quantiles: per dimension of [n, d], or per channel of
    images [n, H, W, 3] scaled to [0, 1] (then each shaped [3, 1, 1], as lerobot stores them)."""
    if image:  # uint8: every statistic from each channel's 256-bin histogram, exactly
        flat = np.moveaxis(np.asarray(values, np.uint8), -1, 0).reshape(3, -1)
        hist = np.stack([np.bincount(c, minlength=256) for c in flat]).astype(np.float64)
        level = np.arange(256) / 255.0
        p = hist / hist.sum(1, keepdims=True)
        mean = p @ level
        cdf = np.cumsum(p, 1)
        per = {"min": level[np.argmax(hist > 0, 1)], "max": level[255 - np.argmax(hist[:, ::-1] > 0, 1)],
               "mean": mean, "std": np.sqrt(np.maximum(p @ level ** 2 - mean ** 2, 0))}
        per.update({f"q{round(q * 100):02d}": level[np.argmax(cdf >= q, 1)] for q in QUANTILES})
        out = {k: v.reshape(3, 1, 1) for k, v in per.items()}
    else:
        v = values.reshape(len(values), -1)
        out = {"min": v.min(0), "max": v.max(0), "mean": v.astype(np.float64).mean(0),
               "std": v.astype(np.float64).std(0)}
        out.update({f"q{round(q * 100):02d}": np.quantile(v.astype(np.float64), q, axis=0) for q in QUANTILES})
    out["count"] = np.asarray([len(values)], np.int64)
    order = ["min", "max", "mean", "std", "count", *(f"q{round(q * 100):02d}" for q in QUANTILES)]
    return {k: out[k] for k in order}


def aggregate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The dataset's statistics from its episodes' (as lerobot combines them): min of the minima,
    max of the maxima, the count-weighted mean, the pooled standard deviation, and quantiles as
    the count-weighted mean of the episodes' quantiles."""
    n = np.asarray([p["count"][0] for p in parts], np.float64)
    w = (n / n.sum()).reshape(-1, *[1] * np.ndim(parts[0]["mean"]))
    mean = (w * np.stack([p["mean"] for p in parts])).sum(0)
    var = (w * (np.stack([p["std"] for p in parts]) ** 2 + (np.stack([p["mean"] for p in parts]) - mean) ** 2)).sum(0)
    out = {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0), "mean": mean,
           "std": np.sqrt(var), "count": np.asarray([int(n.sum())], np.int64)}
    out.update({k: (w * np.stack([p[k] for p in parts])).sum(0) for k in parts[0] if k.startswith("q")})
    return {k: out[k] for k in parts[0]}


def _jsonable(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {key: {k: v.tolist() for k, v in s.items()} for key, s in stats.items()}


# ------------------------------------------------------------------------------ writing


class _Videos:
    """One AV1 stream per camera in one file, episodes appended one after another."""

    def __init__(self, out: Path, cameras: dict[str, tuple[int, int]], fps: int):
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1's banner and settings on stderr: errors only
        import av

        self.streams: dict[str, tuple[Any, Any]] = {}
        for camera, (h, w) in cameras.items():
            file = out / VIDEO_PATH.format(video_key=IMAGE_PREFIX + camera, chunk_index=0, file_index=0)
            file.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(file), "w")
            stream = container.add_stream(CODEC["name"], fps, options=dict(CODEC["options"]))
            stream.pix_fmt, stream.width, stream.height = CODEC["pix_fmt"], w, h
            self.streams[camera] = (container, stream)

    def add(self, camera: str, images: np.ndarray) -> None:
        """Append one episode; its first frame is a key frame (as in lerobot's files, where each
        episode is encoded alone and the files joined), so that an episode decodes on its own."""
        import av

        container, stream = self.streams[camera]
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I
            for packet in stream.encode(frame):
                container.mux(packet)

    def close(self) -> None:
        for container, stream in self.streams.values():
            for packet in stream.encode():
                container.mux(packet)
            container.close()


def _png(image: np.ndarray, frame: int) -> dict[str, Any]:
    """An image as lerobot stores one in parquet: PNG bytes and its staging file's name."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"frame-{frame:06d}.png"}


def export(dataset: Any, out: Path, *, fps: int = 30, robot_type: str = "calvin", action_key: str | None = None,
           images: bool = False, progress: bool = True) -> dict[str, int]:
    """Write ``dataset`` (any robovla Dataset) into the new folder ``out`` as a LeRobotDataset
    v3.0; returns the counts. Written into a temporary folder beside ``out``, renamed when complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeRobotDataError(f"{out}: {'a folder that is not empty' if out.is_dir() else 'not a folder'}; export "
                               "writes a new dataset there: pass a new or empty folder")
    segments = list(dataset.segment_table())
    if not segments:
        raise LeRobotDataError(f"{getattr(dataset, 'root', 'the dataset')}: no annotated segments to export")
    first = dataset.load(segments[0].start, segments[0].start)
    keys = list(first.actions)
    key = action_key or ("rel_actions" if "rel_actions" in keys else keys[0])
    if key not in keys:
        raise LeRobotDataError(f"--action-key {key}: the dataset loads actions {keys}; pass one of them")
    cameras = {c: tuple(first.images[c].shape[1:3]) for c in dataset.cameras}
    feats = features(cameras, first.robot_obs.shape[1], first.actions[key].shape[1], not images, fps, key)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = _write(dataset, segments, tmp, feats, cameras, key, fps, robot_type, images, progress)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _write(dataset, segments, tmp, feats, cameras, key, fps, robot_type, images, progress) -> dict[str, int]:
    import pyarrow as pa
    from tqdm import tqdm

    pq = pyarrow_parquet()
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    videos = None if images else _Videos(tmp, cameras, fps)
    data_file = tmp / DATA_PATH.format(chunk_index=0, file_index=0)
    data_file.parent.mkdir(parents=True)
    schema = _data_schema(pa, feats, images)
    writer = pq.ParquetWriter(data_file, schema)
    index = 0
    try:
        for e, seg in enumerate(tqdm(segments, unit="episode", desc="export", file=sys.stderr, disable=not progress)):
            frames = dataset.load(seg.start, seg.end)
            n = seg.end - seg.start + 1
            task = tasks.setdefault(seg.instruction, len(tasks))
            columns = {"observation.state": frames.robot_obs.astype(np.float32),
                       "action": frames.actions[key].astype(np.float32),
                       "timestamp": (np.arange(n) / fps).astype(np.float32), "frame_index": np.arange(n),
                       "episode_index": np.full(n, e), "index": np.arange(index, index + n),
                       "task_index": np.full(n, task)}
            row: dict[str, Any] = {"episode_index": e, "tasks": [seg.instruction], "length": n, "data/chunk_index": 0,
                                   "data/file_index": 0, "dataset_from_index": index, "dataset_to_index": index + n}
            stats = {k: stats_of(v) for k, v in columns.items()}
            for camera, (h, w) in cameras.items():
                picked = frames.images[camera][np.unique(np.linspace(0, n - 1, min(n, IMAGE_SAMPLES)).astype(int))]
                stats[IMAGE_PREFIX + camera] = stats_of(picked, image=True)
                if videos is not None:
                    videos.add(camera, frames.images[camera])
                    start = index / fps  # the frames written so far, one after another in the file
                    row.update({f"videos/{IMAGE_PREFIX}{camera}/chunk_index": 0,
                                f"videos/{IMAGE_PREFIX}{camera}/file_index": 0,
                                f"videos/{IMAGE_PREFIX}{camera}/from_timestamp": start,
                                f"videos/{IMAGE_PREFIX}{camera}/to_timestamp": start + n / fps})
                else:
                    columns[IMAGE_PREFIX + camera] = [_png(img, i) for i, img in enumerate(frames.images[camera])]
            writer.write_table(pa.table({name: _column(pa, columns[name], schema.field(name).type)
                                         for name in schema.names}, schema=schema))
            episodes.append({**row, "stats": stats})
            index += n
    finally:
        writer.close()
        if videos is not None:
            videos.close()
    _write_meta(pa, pq, tmp, feats, episodes, tasks, fps, robot_type, index)
    return {"episodes": len(episodes), "frames": index, "tasks": len(tasks)}


def _data_schema(pa: Any, feats: dict[str, Any], images: bool) -> Any:
    fields = []
    for name, f in feats.items():
        if f["dtype"] == "video":
            continue
        if f["dtype"] == "image":
            fields.append(pa.field(name, pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
        elif name in INDEX_COLUMNS:
            fields.append(pa.field(name, pa.float32() if f["dtype"] == "float32" else pa.int64()))
        else:
            fields.append(pa.field(name, pa.list_(pa.float32(), f["shape"][0])))
    meta = {"info": {"features": hf_features(feats)}}
    meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return pa.schema(fields, metadata={"huggingface": json.dumps(meta)})


def _column(pa: Any, values: Any, type_: Any) -> Any:
    if pa.types.is_fixed_size_list(type_):
        flat = np.ascontiguousarray(values, np.float32).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), type_.list_size)
    return pa.array(values, type_)


def _write_meta(pa, pq, tmp, feats, episodes, tasks, fps, robot_type, frames) -> None:
    (tmp / "meta").mkdir()
    rows = []
    for ep in episodes:
        row = {k: v for k, v in ep.items() if k != "stats"}
        for feature, s in ep["stats"].items():
            row.update({f"stats/{feature}/{k}": v.tolist() for k, v in s.items()})
        rows.append({**row, "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    order = [*(c for c in rows[0] if not c.startswith(("stats/", "meta/"))),
             *(f"stats/{f}/{k}" for f in feats for k in episodes[0]["stats"][f]),
             "meta/episodes/chunk_index", "meta/episodes/file_index"]
    table = pa.Table.from_pylist([{c: r[c] for c in order} for r in rows])
    file = tmp / EPISODES / "chunk-000" / "file-000.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(table, file)
    names = list(tasks)
    pandas = {"index_columns": ["__index_level_0__"], "column_indexes": [
        {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str",
         "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "object", "numpy_type": "str",
                     "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}}
    task_table = pa.table({"task_index": pa.array([tasks[t] for t in names], pa.int64()),
                           "__index_level_0__": pa.array(names, pa.large_string())})
    pq.write_table(task_table.replace_schema_metadata({"pandas": json.dumps(pandas)}), tmp / TASKS)
    stats = {f: aggregate([ep["stats"][f] for ep in episodes]) for f in feats}
    (tmp / STATS).write_text(json.dumps(_jsonable(stats), indent=4))
    info = {"codebase_version": VERSION, "robot_type": robot_type, "total_episodes": len(episodes),
            "total_frames": frames, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
            "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if any(f["dtype"] == "video" for f in feats.values()) else None,
            "features": feats}
    (tmp / INFO).write_text(json.dumps(info, indent=4))
