"""The ``lerobot`` dataset: a LeRobotDataset v3.0 folder (or hub id), read with pyarrow and PyAV.

What becomes what is configuration, with defaults read from ``meta/info.json``:

    --dataset.cameras     NAME or NAME=FEATURE, e.g. static=observation.images.top
                          (default: every image or video feature: observation.images.NAME
                          as camera NAME, another key by its last part)
    --dataset.state_key   the robot state (default observation.state; none: zeros)
    --dataset.action_key  the actions (default action), read by --action-space continuous
    instruction           each frame's task string (meta/tasks.parquet)

Every episode is a segment (one per run of frames with the same task, when an episode has
several), so windows and chunks follow CALVIN's rules: every step of every episode, actions
past the end masked. Frame ids are the dataset's global ``index``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from pydantic import Field

import robovla
from robovla.batch import ROBOT_OBS_DIM
from robovla.dataset import Frames, Problem, Segment, SegmentTable
from robovla.errors import missing_folder
from robovla_plugins.datasets.lerobot import files
from robovla_plugins.datasets.lerobot.files import IMAGE_PREFIX, INFO, LeRobotDataError
from robovla_plugins.datasets.lerobot.video import VideoReader


def local_root(path: str, revision: str | None = None) -> Path:
    """``path`` as a local folder: itself when it is one, else a hub dataset id downloaded to the
    Hugging Face cache (the hub is reached only then); anything else is an error naming what to do."""
    from robovla.sharing import download, is_repo_id

    root = Path(path).expanduser()
    if root.is_dir():
        return root
    if not is_repo_id(path):
        raise LeRobotDataError(f"--dataset.path {path}: {missing_folder(root)}; give a LeRobotDataset folder (the one "
                               "holding meta/info.json) or a hub dataset id such as lerobot/pusht")
    return download(path, "--dataset.path", repo_type="dataset", revision=revision)


class LeRobotDataset(robovla.Dataset):
    """A LeRobotDataset v3.0: parquet frames, MP4 or PNG images, tasks as instructions."""

    class Config(robovla.ComponentConfig):
        path: str = Field(description="a LeRobotDataset v3.0 folder (holding meta/info.json), or a hub dataset id")
        cameras: list[str] | None = Field(
            None, min_length=1, description="cameras to read, each NAME (feature observation.images.NAME) or "
            "NAME=FEATURE; none: every image or video feature (observation.images.NAME as NAME, any other by the "
            "last part of its key: observation.image as image)")
        state_key: str | None = Field("observation.state", description="the feature read as the robot state "
                                      f"({ROBOT_OBS_DIM} values); none: zeros")
        action_key: str = Field("action", description="the feature read as the actions (the action key that "
                                "--action-space continuous reads)")
        revision: str | None = Field(None, description="with a hub id: the branch, tag or commit to download")

        @pydantic.field_validator("path", mode="before")
        @classmethod
        def _folder_as_text(cls, value: Any) -> Any:
            return os.fspath(value) if isinstance(value, os.PathLike) else value

        @pydantic.field_validator("cameras")
        @classmethod
        def _once_each(cls, value: list[str] | None) -> list[str] | None:
            names = [v.split("=", 1)[0].strip() for v in value or ()]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"cameras {twice} listed more than once; name each once")
            if any(not n for n in names):
                raise ValueError("a camera needs a name: NAME or NAME=FEATURE")
            return value

    def __init__(self, config: Any):
        super().__init__(config)
        self.root = local_root(config.path, config.revision)
        self.info = files.read_info(self.root)
        self.features: dict[str, Any] = self.info["features"]
        self.fps = float(self.info["fps"])
        self.camera_keys = self._camera_keys()
        self.videos = VideoReader(self.fps)
        self._episodes: files.Episodes | None = None
        self._segments: SegmentTable | None = None
        self._columns: dict[Path, dict[str, np.ndarray]] = {}
        self._images: dict[tuple[Path, str], Any] = {}

    class WriteOptions(robovla.ComponentConfig):
        """``robo-run data export --to lerobot`` options (each a flag: --images, --fps, ...)."""

        images: bool = Field(False, description="store PNG images in the parquet files instead of AV1 videos "
                             "(larger, lossless)")
        fps: int = Field(30, ge=1, le=1000, description="frames per second of the recording (CALVIN's is 30)")
        action_key: str | None = Field(None, description="the source's action array written as `action` "
                                       "(rel_actions when the source loads it, else its first)")
        robot_type: str | None = Field(None, description="info.json's robot_type (default: the source's format)")

    @classmethod
    def write(cls, source: robovla.Dataset, out: Path, options: "LeRobotDataset.WriteOptions",
              source_name: str | None = None) -> dict[str, int]:
        """Write ``source`` (any robovla dataset) as a LeRobotDataset v3.0 into the new folder ``out``."""
        from robovla_plugins.datasets.lerobot.export import export

        return export(source, Path(out), fps=options.fps, robot_type=options.robot_type or source_name or "unknown",
                      action_key=options.action_key, images=options.images)

    @classmethod
    def synthesize(cls, out: Path, episodes: int, seed: int) -> dict[str, Any]:
        """The synthetic reach task (``robo-run data synth``) as LeRobotDatasets: training/ and
        validation/ of ``out``, written in CALVIN's layout first and exported."""
        import tempfile

        from robovla_plugins.datasets.calvin.synthetic import write_task
        from robovla_plugins.datasets.lerobot.export import export

        with tempfile.TemporaryDirectory() as tmp:
            splits = write_task(Path(tmp), episodes, seed)
            return {split: export(robovla.create("dataset", "calvin", {"path": str(Path(tmp) / split)}),
                                  Path(out) / split, robot_type="synthetic-reach", progress=False)
                    for split in splits}

    def __getstate__(self) -> dict[str, Any]:  # workers re-read lazily
        return {**self.__dict__, "_columns": {}, "_images": {}}

    # ----------------------------------------------------------------------- the mapping

    def _camera_keys(self) -> dict[str, str]:
        images = files.image_features(self.info)
        if self.config.cameras is None:
            found = {k.removeprefix(IMAGE_PREFIX) if k.startswith(IMAGE_PREFIX) else k.rsplit(".", 1)[-1]: k
                     for k in images}
            if not found:
                raise LeRobotDataError(f"{self.root / INFO}: no image or video features; robovla's backbones read "
                                       "cameras")
            return found
        out = {}
        for entry in self.config.cameras:
            name, _, key = (p.strip() for p in entry.partition("="))
            key = key or IMAGE_PREFIX + name
            if key not in images:
                raise LeRobotDataError(f"--dataset.cameras {entry}: {key!r} is not an image or video feature of "
                                       f"{self.root / INFO}; it has {sorted(images)}")
            out[name] = key
        return out

    def _vector(self, key: str, flag: str) -> int:
        feature = self.features.get(key)
        if not isinstance(feature, dict):
            vectors = sorted(k for k, f in self.features.items() if isinstance(f, dict)
                             and f.get("dtype") in ("float32", "float64") and len(f.get("shape", ())) == 1)
            raise LeRobotDataError(f"--dataset.{flag} {key}: no such feature in {self.root / INFO}; it has "
                                   f"{vectors}")
        shape = feature.get("shape", ())
        if len(shape) != 1:
            raise LeRobotDataError(f"--dataset.{flag} {key}: shape {shape}; expected a vector")
        return int(shape[0])

    def mapping(self) -> dict[str, str]:
        """What robovla reads, from which feature: the report of ``robo-run data check``."""
        out = {}
        for name, key in self.camera_keys.items():
            f = self.features[key]
            out[f"camera {name}"] = f"{key} ({f['dtype']}, {'x'.join(map(str, f.get('shape', ())))})"
        state = self.config.state_key
        out["robot_obs"] = (f"{state} [{self._vector(state, 'state_key')}]" if state
                            else f"zeros [{ROBOT_OBS_DIM}] (--dataset.state_key none)")
        key = self.config.action_key
        out[f"actions[{key!r}]"] = f"{key} [{self._vector(key, 'action_key')}]"
        out["instruction"] = "task (meta/tasks.parquet)"
        return out

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.camera_keys)

    # ----------------------------------------------------------------------- listing

    def episodes(self) -> files.Episodes:
        if self._episodes is None:
            videos = [k for k in self.camera_keys.values() if self.features[k]["dtype"] == "video"]
            self._episodes = files.read_episodes(self.root, videos)
        return self._episodes

    def _file_columns(self, file: Path) -> dict[str, np.ndarray]:
        """The non-image columns of one data file, read once: index, timestamp, task, state, action."""
        if file not in self._columns:
            if not file.is_file():
                raise LeRobotDataError(f"{file}: missing; meta/episodes names it as holding frames")
            wanted = ["index", "timestamp", "task_index", self.config.action_key]
            if self.config.state_key:  # none (the config reads "none" as None): zeros
                wanted.append(self.config.state_key)
            wanted = list(dict.fromkeys(wanted))  # the state may be read from the action column too
            names = files.pyarrow_parquet().read_schema(file).names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise LeRobotDataError(f"{file}: no column(s) {missing}; it has {names}")
            table = files.read_table(file, wanted)
            cols = {}
            for c in wanted:
                try:
                    cols[c] = files.as_array(table.column(c))
                except (ValueError, TypeError) as exc:
                    raise LeRobotDataError(f"{file}: column {c!r} ({table.column(c).type}) is not numeric "
                                           f"({exc})") from None
            if cols["index"].size and np.any(np.diff(cols["index"]) != 1):
                raise LeRobotDataError(f"{file}: the index column is not consecutive; frames must be stored in order")
            self._columns[file] = cols
        return self._columns[file]

    def segment_table(self) -> SegmentTable:
        """One segment per run of equal task_index in each episode (read once)."""
        if self._segments is None:
            self._segments = self._segment_table()
        return self._segments

    def _segment_table(self) -> SegmentTable:
        tasks = files.read_tasks(self.root)
        ep = self.episodes()
        bounds, texts = [], []
        for e in range(len(ep.index)):
            cols = self._file_columns(files.data_file(self.root, self.info, *ep.data_file[e]))
            rows = self._rows(cols, int(ep.start[e]), int(ep.end[e]))
            task = cols["task_index"][rows].astype(np.int64)
            cuts = np.flatnonzero(np.diff(task)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(task)]):
                if int(task[a]) not in tasks:
                    raise LeRobotDataError(f"{self.root / files.TASKS}: no task_index {int(task[a])}, which episode "
                                           f"{int(ep.index[e])} uses")
                bounds.append((int(ep.start[e]) + int(a), int(ep.start[e]) + int(b) - 1))
                texts.append(tasks[int(task[a])])
        return SegmentTable(np.asarray(bounds, np.int64).reshape(-1, 2), texts, texts)

    def segments(self) -> list[Segment]:
        return list(self.segment_table())

    def _rows(self, cols: dict[str, np.ndarray], start: int, end: int) -> slice:
        index = cols["index"]
        if not len(index) or start < index[0] or end > index[-1]:
            span = f"{index[0]}..{index[-1]}" if len(index) else "nothing"
            raise LeRobotDataError(f"frames {start}..{end} are not in their data file (it holds {span}); "
                                   "meta/episodes and data/ disagree")
        a = int(start - index[0])
        return slice(a, a + end - start + 1)

    def _episode_of(self, frame: int) -> int:
        ep = self.episodes()
        e = int(np.searchsorted(ep.start, frame, side="right")) - 1
        if e < 0 or frame > ep.end[e]:
            raise KeyError(f"frame {frame} is in no episode of {self.root}")
        return e

    # ----------------------------------------------------------------------- reading

    def load(self, start: int, end: int) -> Frames:
        """Frames start..end; a range over several episodes (the frame cache reads adjacent
        segments in one block) is read episode by episode and joined."""
        ep = self.episodes()
        parts = []
        while True:
            e = self._episode_of(start)
            parts.append(self._load(e, start, min(end, int(ep.end[e]))))
            if end <= ep.end[e]:
                break
            start = int(ep.end[e]) + 1
        if len(parts) == 1:
            return parts[0]
        return Frames(images={c: np.concatenate([p.images[c] for p in parts]) for c in parts[0].images},
                      robot_obs=np.concatenate([p.robot_obs for p in parts]),
                      actions={k: np.concatenate([p.actions[k] for p in parts]) for k in parts[0].actions})

    def _load(self, e: int, start: int, end: int) -> Frames:
        ep = self.episodes()
        file = files.data_file(self.root, self.info, *ep.data_file[e])
        cols = self._file_columns(file)
        rows = self._rows(cols, start, end)
        n = end - start + 1
        state = self.config.state_key
        if state:
            robot_obs = np.asarray(cols[state][rows], np.float64).reshape(n, -1)
            if robot_obs.shape[1] != ROBOT_OBS_DIM:
                raise LeRobotDataError(f"--dataset.state_key {state}: {robot_obs.shape[1]} values per frame, but "
                                       f"robovla's robot state has {ROBOT_OBS_DIM} (CALVIN's robot_obs); pass "
                                       "--dataset.state_key none (zeros: no built-in backbone or head reads it, "
                                       "and --action-space continuous does not either)")
        else:
            robot_obs = np.zeros((n, ROBOT_OBS_DIM))
        action = np.asarray(cols[self.config.action_key][rows], np.float64).reshape(n, -1)
        images = {}
        for name, key in self.camera_keys.items():
            if self.features[key]["dtype"] == "video":
                chunk, number, offset = ep.videos[key][e]
                video = files.video_file(self.root, self.info, key, chunk, number)
                images[name] = self.videos.read(video, offset + float(cols["timestamp"][rows][0]), n)
            else:
                images[name] = self._decoded_images(file, key, rows)
        return Frames(images=images, robot_obs=robot_obs, actions={self.config.action_key: action})

    def _decoded_images(self, file: Path, key: str, rows: slice) -> np.ndarray:
        """Images stored in the parquet file (PNG bytes in a struct of bytes and path)."""
        import io

        from PIL import Image

        if (file, key) not in self._images:
            self._images[(file, key)] = files.read_table(file, [key]).column(key)
        column = self._images[(file, key)]
        out = []
        for value in column.slice(rows.start, rows.stop - rows.start).to_pylist():
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                raise LeRobotDataError(f"{file}: column {key!r} holds no image bytes at a row (images stored by path "
                                       "only are not read)")
            with Image.open(io.BytesIO(data)) as img:
                out.append(np.asarray(img.convert("RGB")))
        return np.stack(out)

    # ----------------------------------------------------------------------- checks

    def check(self) -> list[Problem]:
        from robovla_plugins.datasets.lerobot.checks import problems

        return problems(self)

    def fingerprint(self) -> str:
        """Changes with the options, the metadata, and any data or video file's size or time."""
        h = hashlib.sha256(self.config.model_dump_json(exclude={"path"}).encode())
        listing = []
        for top in ("meta", "data", "videos"):
            for folder, _, names in os.walk(self.root / top):
                for name in names:
                    st = os.stat(os.path.join(folder, name))
                    listing.append((os.path.relpath(os.path.join(folder, name), self.root), st.st_size,
                                    st.st_mtime_ns, st.st_ctime_ns))
        h.update(repr(sorted(listing)).encode())
        return h.hexdigest()

    def statistics(self, key: str) -> dict[str, list[float]] | None:
        """``meta/stats.json``'s statistics of feature ``key`` (min, max, mean, std, ...), or None."""
        stats = files.read_stats(self.root).get(key)
        return {k: np.ravel(v).tolist() for k, v in stats.items()} if stats else None

    def describe(self) -> dict[str, int]:
        ep = self.episodes()
        return {"frames": int((ep.end - ep.start + 1).sum()), "episodes": len(ep.index),
                "segments": len(self.segment_table()), "annotations": len(self.segment_table())}
