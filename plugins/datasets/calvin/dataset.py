"""The ``calvin`` dataset: one CALVIN split folder, read exactly as CALVIN stores it.

A split folder (``training/`` or ``validation/`` of task_D_D, task_ABC_D, task_ABCD_D or
calvin_debug_dataset) holds one ``episode_%07d.npz`` per 30 Hz frame, named by global frame
id (a folder does not start at 0), ``ep_start_end_ids.npy`` (inclusive recording ranges)
``lang_annotations/auto_lang_ann.npy`` (a pickled dict: language.ann, language.task,
info.indx) and, in training splits only, ``scene_info.npy`` (a pickled dict: scene name ->
inclusive frame-id range). Vectors are stored as float64. Pickle is read for those two
annotation files only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

import robovla
from robovla.batch import ROBOT_OBS_DIM
from robovla.dataset import Frames, Problem, Segment
from robovla_plugins.datasets.calvin.synthetic import write_task

CAMERA_KEYS = {"static": "rgb_static", "gripper": "rgb_gripper"}
SHAPES = {"rgb_static": (200, 200, 3), "rgb_gripper": (84, 84, 3), "robot_obs": (ROBOT_OBS_DIM,), "actions": (7,),
          "rel_actions": (7,)}
ANNOTATIONS = "lang_annotations/auto_lang_ann.npy"
SCENES = "scene_info.npy"


class CalvinDataError(robovla.RobovlaError, ValueError):
    """A CALVIN split cannot be read; the message names the file and key."""


def frame_file(root: Path, frame: int) -> Path:
    return root / f"episode_{frame:07d}.npz"


class CalvinDataset(robovla.Dataset):
    """One CALVIN split folder, read exactly as CALVIN stores it."""

    class Config(robovla.ComponentConfig):
        path: Path = Field(description="the split folder (training/ or validation/ of a CALVIN task)")
        cameras: list[Literal["static", "gripper"]] = Field(["static", "gripper"], min_length=1,
                                                            description="cameras to read")
        action_keys: list[Literal["rel_actions", "actions"]] = Field(
            ["rel_actions", "actions"], min_length=1, description="action arrays to read (rel_actions, actions)")
        tasks: list[str] | None = Field(None, description="keep only annotations of these tasks; none: all")
        synthesize: int | None = Field(None, ge=1, description="when path does not exist yet, first write the "
                                       "synthetic reach task there (this many training episodes; path must end in "
                                       "training/ or validation/); none: never write")
        synthesize_seed: int = Field(0, description="seed of the synthetic task written by synthesize")
        scenes: list[str] | None = Field(None, description="keep only annotations inside these scenes of "
                                         "scene_info.npy (training splits have it), e.g. calvin_scene_A; none: all")

    def __init__(self, config: Any):
        super().__init__(config)
        self.root = Path(config.path).expanduser()
        if not self.root.is_dir() and config.synthesize:
            self._write_synthetic(config.synthesize, config.synthesize_seed)
        if not self.root.is_dir():
            raise CalvinDataError(f"--dataset.path {self.root}: no such folder; point it at a CALVIN split "
                                  "folder, e.g. task_D_D/training")

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.config.cameras)

    @classmethod
    def synthesize(cls, out: Path, episodes: int, seed: int) -> dict[str, Any]:
        """Write the synthetic reach task (training/ and validation/) in CALVIN's layout."""
        return write_task(Path(out), episodes, seed)

    def _write_synthetic(self, episodes: int, seed: int) -> None:
        """Write the synthetic task into the parent of ``path``, once, even with several processes."""
        import shutil

        from robovla.frame_cache import locked

        task = self.root.parent
        if self.root.name not in ("training", "validation"):
            raise CalvinDataError(f"--dataset.synthesize: --dataset.path {self.root} must end in training/ or "
                                  "validation/ (the task folder holds both)")
        with locked(task):
            if task.exists():
                return
            tmp = task.with_name(f".{task.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            write_task(tmp, episodes, seed)
            os.replace(tmp, task)

    # -------------------------------------------------------------- listing and reading

    def recordings(self) -> np.ndarray:
        """``ep_start_end_ids.npy``: int64 [n, 2], inclusive frame-id ranges."""
        file = self.root / "ep_start_end_ids.npy"
        try:
            ids = np.load(file, allow_pickle=False)
        except Exception as exc:  # missing, empty, truncated, pickled, not .npy at all
            raise CalvinDataError(f"{file}: cannot read ({type(exc).__name__}: {exc})") from None
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.shape[1] != 2 or \
                not np.issubdtype(ids.dtype, np.integer):
            raise CalvinDataError(f"{file}: expected an integer array [n, 2], got "
                                  f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        bad = np.flatnonzero(ids[:, 0] > ids[:, 1])
        if len(bad):
            raise CalvinDataError(f"{file}: rows {bad.tolist()} end before they start (ranges are [start, end], "
                                  "inclusive)")
        return ids.astype(np.int64)

    def annotations(self) -> dict[str, Any]:
        """The annotation dict as stored (pickle: CALVIN's format), checked for its keys."""
        file = self.root / ANNOTATIONS
        if not file.is_file():
            raise CalvinDataError(f"{file}: missing; a CALVIN split has lang_annotations/auto_lang_ann.npy")
        try:
            ann = np.load(file, allow_pickle=True).item()
            texts, tasks = [str(t) for t in ann["language"]["ann"]], [str(t) for t in ann["language"]["task"]]
            indx = [(int(a), int(b)) for a, b in ann["info"]["indx"]]
        except Exception as exc:  # empty, truncated, not a dict, wrong shapes inside
            raise CalvinDataError(f"{file}: expected a pickled dict with language.ann, language.task (lists of "
                                  f"str) and info.indx (list of (start, end)) ({type(exc).__name__}: {exc})") from None
        if not len(texts) == len(tasks) == len(indx):
            raise CalvinDataError(f"{file}: language.ann ({len(texts)}), language.task ({len(tasks)}) and "
                                  f"info.indx ({len(indx)}) differ in length")
        return {"language": {"ann": texts, "task": tasks}, "info": {"indx": indx}}

    def scene_ranges(self) -> dict[str, tuple[int, int]]:
        """``scene_info.npy``: scene name -> inclusive frame-id range; {} when the split has none
        (CALVIN's validation splits do not)."""
        file = self.root / SCENES
        if not file.is_file():
            return {}
        try:
            info = np.load(file, allow_pickle=True).item()
            scenes = {str(name): (int(first), int(last)) for name, (first, last) in info.items()}
        except Exception as exc:  # empty, truncated, not a dict, wrong values
            raise CalvinDataError(f"{file}: expected a pickled dict {{scene name: [first id, last id]}} "
                                  f"({type(exc).__name__}: {exc})") from None
        bad = [name for name, (first, last) in scenes.items() if first > last]
        if bad:
            raise CalvinDataError(f"{file}: scenes {bad} end before they start (ranges are inclusive)")
        return scenes

    def segments(self) -> list[Segment]:
        ann = self.annotations()
        wanted = None if self.config.tasks is None else set(self.config.tasks)
        segments = [Segment(s, e, text, task)
                    for text, task, (s, e) in zip(ann["language"]["ann"], ann["language"]["task"], ann["info"]["indx"])
                    if wanted is None or task in wanted]
        if self.config.scenes is None:
            return segments
        scenes = self.scene_ranges()
        unknown = [name for name in self.config.scenes if name not in scenes]
        if unknown:
            have = f"it has {sorted(scenes)}" if scenes else "the split has none (validation splits never do)"
            raise CalvinDataError(f"--dataset.scenes: {unknown} not in {self.root / SCENES}: {have}; "
                                  "pick from those, or leave --dataset.scenes unset")
        kept = [scenes[name] for name in self.config.scenes]
        return [seg for seg in segments if any(first <= seg.start and seg.end <= last for first, last in kept)]

    def load(self, start: int, end: int) -> Frames:
        keys = [CAMERA_KEYS[c] for c in self.cameras] + ["robot_obs", *self.config.action_keys]
        data: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for frame in range(start, end + 1):
            file = frame_file(self.root, frame)
            try:
                with _open_npz(file) as npz:
                    for k in keys:
                        data[k].append(npz[k])
            except Exception as exc:  # missing, truncated, corrupt, a key missing
                raise CalvinDataError(f"{file}: cannot read ({type(exc).__name__}: {exc}); run "
                                      f"`robo-run data check {self.root}` for every problem") from None
        return Frames(images={c: np.stack(data[CAMERA_KEYS[c]]) for c in self.cameras},
                      robot_obs=np.stack(data["robot_obs"]),
                      actions={k: np.stack(data[k]) for k in self.config.action_keys})

    # ------------------------------------------------------------------------ checking

    def fingerprint(self) -> str:
        """Changes with the options, the index files, and any frame file's size or time."""
        h = hashlib.sha256(self.config.model_dump_json(exclude={"path"}).encode())
        for name in ("ep_start_end_ids.npy", ANNOTATIONS, SCENES):
            file = self.root / name
            h.update(file.read_bytes() if file.is_file() else b"-")
        with os.scandir(self.root) as entries:
            listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ctime_ns) for e in entries
                             if e.name.endswith(".npz"))
        # ctime moves on every write or rename and, unlike mtime, cannot be set back (cp -p, rsync -t)
        h.update(repr(listing).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, int]:
        ranges = self.recordings()
        return {"frames": int((ranges[:, 1] - ranges[:, 0] + 1).sum()), "segments": len(ranges),
                "annotations": len(self.segments()), "scenes": len(self.scene_ranges())}

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        try:
            ranges = self.recordings()
        except CalvinDataError as exc:
            return [Problem(str(self.root / "ep_start_end_ids.npy"), "", str(exc))]
        try:
            segments = self.segments()
        except CalvinDataError as exc:
            problems.append(Problem(str(self.root / ANNOTATIONS), "", str(exc)))
            segments = []
        try:
            scenes = list(self.scene_ranges().values())
        except CalvinDataError as exc:
            problems.append(Problem(str(self.root / SCENES), "", str(exc)))
            scenes = []
        for i, seg in enumerate(segments):
            inside = (ranges[:, 0] <= seg.start) & (seg.end <= ranges[:, 1])
            if seg.start > seg.end or not inside.any():
                problems.append(Problem(str(self.root / ANNOTATIONS), f"info.indx[{i}]",
                                        f"annotation ({seg.start}, {seg.end}) is not inside one recording range "
                                        f"of ep_start_end_ids.npy"))
            elif scenes and not any(first <= seg.start and seg.end <= last for first, last in scenes):
                problems.append(Problem(str(self.root / SCENES), f"info.indx[{i}]",
                                        f"annotation ({seg.start}, {seg.end}) lies in no scene of scene_info.npy"))
        keys = [CAMERA_KEYS[c] for c in self.cameras] + ["robot_obs", *self.config.action_keys]
        for start, end in ranges:
            for frame in range(int(start), int(end) + 1):
                problems += self.check_frame(frame_file(self.root, frame), keys)
        return problems

    @staticmethod
    def check_frame(file: Path, keys: list[str]) -> list[Problem]:
        """Every problem of one frame file: missing, unreadable, keys, shapes, dtypes, NaN."""
        if not file.is_file():
            return [Problem(str(file), "", "frame missing inside a recording range of ep_start_end_ids.npy")]
        found: list[Problem] = []
        try:
            with _open_npz(file) as npz:
                for key in keys:
                    if key not in npz.files:
                        found.append(Problem(str(file), key, f"missing key (has {sorted(npz.files)})"))
                        continue
                    try:
                        value = npz[key]
                    except Exception as exc:  # one corrupt member: report it, go on with the others
                        found.append(Problem(str(file), key, f"unreadable ({type(exc).__name__}: {exc})"))
                        continue
                    if value.shape != SHAPES[key]:
                        found.append(Problem(str(file), key, f"shape {value.shape}, expected {SHAPES[key]}"))
                    if key.startswith("rgb_"):
                        if value.dtype != np.uint8:
                            found.append(Problem(str(file), key, f"dtype {value.dtype}, expected uint8"))
                    elif not np.issubdtype(value.dtype, np.floating):
                        found.append(Problem(str(file), key, f"dtype {value.dtype}, expected float64"))
                    elif not np.isfinite(value).all():
                        found.append(Problem(str(file), key, f"non-finite values at {np.flatnonzero(~np.isfinite(value)).tolist()}"))
        except Exception as exc:  # not a zip at all, truncated directory, ...
            found.append(Problem(str(file), "", f"unreadable or truncated npz ({type(exc).__name__}: {exc})"))
        return found


def _open_npz(file: Path) -> np.lib.npyio.NpzFile:
    """np.load for a frame file, refusing anything that is not an npz archive."""
    data = np.load(file, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"not an npz archive (np.load gave {type(data).__name__})")
    return data
