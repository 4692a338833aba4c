"""The ``calvin`` dataset: one CALVIN split folder, read exactly as CALVIN stores it.

A split folder (``training/`` or ``validation/`` of task_D_D, task_ABC_D, task_ABCD_D or
calvin_debug_dataset) holds one ``episode_%07d.npz`` per 30 Hz frame, named by global frame
id (a folder does not start at 0), ``ep_start_end_ids.npy`` (inclusive recording ranges)
``lang_annotations/auto_lang_ann.npy`` (a pickled dict: language.ann, language.task,
info.indx) and, in training splits only, ``scene_info.npy`` (a pickled dict: scene name ->
inclusive frame-id range). Vectors are stored as float64. Pickle is read for those two
annotation files only, and only plain data is unpickled (:mod:`.files`): a split is data
from elsewhere, and checking one (``robo-run data check``) must not run code from it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
from pydantic import Field

import robovla
from robovla.dataset import Frames, Problem, Segment, SegmentTable
from robovla.errors import missing_folder
from robovla.safe_read import NpzReader, UnsafeFileError, load_npy, open_regular
from robovla_plugins.datasets.calvin.files import (ANNOTATIONS, ANNOTATIONS_FORMAT, CAMERA_KEYS, FRAME_CHECKS, SCENES,
                                                   SCENES_FORMAT, SHAPES, CalvinDataError, as_pairs, frame_file,
                                                   frame_ids, pairs_at, read_pickled_dict, texts_at)
from robovla_plugins.datasets.calvin.synthetic import validation_episodes, write_task

MB_PER_EPISODE = 1.25  # the synthetic task on disk, per episode (training/ and validation/ alike)

__all__ = ["CAMERA_KEYS", "SHAPES", "CalvinDataError", "CalvinDataset", "frame_file"]


class CalvinDataset(robovla.Dataset):
    """One CALVIN split folder, read exactly as CALVIN stores it."""

    class Config(robovla.ComponentConfig):
        path: Path = Field(description="the split folder (training/ or validation/ of a CALVIN task)")
        cameras: list[Literal["static", "gripper"]] = Field(["static", "gripper"], min_length=1,
                                                            description="cameras to read")
        action_keys: list[Literal["rel_actions", "actions"]] = Field(
            ["rel_actions", "actions"], min_length=1, description="action arrays to read (rel_actions, actions)")
        tasks: list[str] | None = Field(None, description="keep only annotations of these tasks; none: all")
        synthesize: int | None = Field(
            None, ge=1, le=100_000, json_schema_extra={"same_source_as": "path"},
            description="when path does not exist yet, first write the synthetic reach task there (this many "
            "training episodes; path must end in training/ or validation/); applies only to a path set by the same "
            "source (a preset's own location) or a later one; none: never write")
        synthesize_seed: int = Field(0, ge=0, lt=2**32, description="seed of the synthetic task written by synthesize")
        scenes: list[str] | None = Field(None, description="keep only annotations inside these scenes of "
                                         "scene_info.npy (training splits have it), e.g. calvin_scene_A; none: all")

        @pydantic.field_validator("cameras", "action_keys")
        @classmethod
        def _once_each(cls, value: list[str]) -> list[str]:
            twice = sorted({v for v in value if value.count(v) > 1})
            if twice:
                raise ValueError(f"{', '.join(twice)} listed more than once; name each once")
            return value

    def __init__(self, config: Any):
        super().__init__(config)
        self.root = Path(config.path).expanduser()
        if not self.root.is_dir() and config.synthesize:
            self._write_synthetic(config.synthesize, config.synthesize_seed)
        if not self.root.is_dir():
            raise CalvinDataError(f"--dataset.path {self.root}: {missing_folder(self.root)}; point it at a CALVIN "
                                  "split folder, e.g. task_D_D/training (--dataset.synthesize N writes the synthetic "
                                  "task there)")

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
            size = (episodes + validation_episodes(episodes)) * MB_PER_EPISODE
            print(f"--dataset.synthesize {episodes}: writing the synthetic reach task into {task} (training/ and "
                  f"validation/, about {size:.0f} MB; once)", file=sys.stderr, flush=True)
            tmp = task.with_name(f".{task.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            write_task(tmp, episodes, seed)
            os.replace(tmp, task)

    # -------------------------------------------------------------- listing and reading

    def recordings(self) -> np.ndarray:
        """``ep_start_end_ids.npy``: int64 [n, 2], inclusive frame-id ranges."""
        file = self.root / "ep_start_end_ids.npy"
        try:
            ids = load_npy(file)
        except UnsafeFileError as exc:  # missing, empty, truncated, pickled, not .npy at all, not a file
            raise CalvinDataError(f"{file}: cannot read ({exc.detail})") from None
        if ids.ndim != 2 or ids.shape[1] != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise CalvinDataError(f"{file}: expected an integer array [n, 2], got {ids.dtype} {ids.shape}")
        bad = np.flatnonzero(ids[:, 0] > ids[:, 1])
        if len(bad):
            raise CalvinDataError(f"{file}: rows {bad[:20].tolist()}{' ...' * (len(bad) > 20)} end before they "
                                  "start (ranges are [start, end], inclusive)")
        return ids.astype(np.int64)

    def annotations(self) -> dict[str, Any]:
        """The annotation dict as stored (CALVIN pickles it; only plain data is unpickled),
        checked for its keys: language.ann and language.task as lists of str, info.indx as
        int64 [n, 2]."""
        file = self.root / ANNOTATIONS
        ann = read_pickled_dict(file, ANNOTATIONS_FORMAT)
        if ann is None:
            raise CalvinDataError(f"{file}: missing; a CALVIN split has lang_annotations/auto_lang_ann.npy")
        problems: list[str] = []
        texts = texts_at(ann, ("language", "ann"), problems)
        tasks = texts_at(ann, ("language", "task"), problems)
        indx = pairs_at(ann, ("info", "indx"), problems)
        if problems:
            raise CalvinDataError(f"{file}: " + "; ".join(problems) + f" (expected {ANNOTATIONS_FORMAT})")
        if not len(texts) == len(tasks) == len(indx):
            raise CalvinDataError(f"{file}: language.ann ({len(texts)}), language.task ({len(tasks)}) and "
                                  f"info.indx ({len(indx)}) differ in length")
        return {"language": {"ann": texts, "task": tasks}, "info": {"indx": indx}}

    def scene_ranges(self) -> dict[str, tuple[int, int]]:
        """``scene_info.npy``: scene name -> inclusive frame-id range; {} when the split has none
        (CALVIN's validation splits do not)."""
        file = self.root / SCENES
        info = read_pickled_dict(file, SCENES_FORMAT)
        if info is None:
            return {}
        problems: list[str] = []
        scenes = {}
        for name, value in info.items():
            pair = as_pairs([value], f"scene {name!r}", problems, rows=1)
            if not isinstance(name, str):
                problems.append(f"scene name {name!r} is of type {type(name).__name__}, not text")
            elif len(pair):
                scenes[name] = (int(pair[0, 0]), int(pair[0, 1]))
        if problems:
            raise CalvinDataError(f"{file}: " + "; ".join(problems[:5]) + f" (expected {SCENES_FORMAT})")
        bad = [name for name, (first, last) in scenes.items() if first > last]
        if bad:
            raise CalvinDataError(f"{file}: scenes {bad} end before they start (ranges are inclusive)")
        return scenes

    def segments(self) -> list[Segment]:
        return list(self.segment_table())

    def segment_table(self) -> SegmentTable:
        """The annotations kept by --dataset.tasks and --dataset.scenes, as arrays."""
        ann = self.annotations()
        bounds, texts, tasks = ann["info"]["indx"], ann["language"]["ann"], ann["language"]["task"]
        keep = np.ones(len(bounds), bool)
        if self.config.tasks is not None:
            wanted = set(self.config.tasks)
            keep &= np.fromiter((task in wanted for task in tasks), bool, len(tasks))
        if self.config.scenes is not None:
            scenes = self.scene_ranges()
            unknown = [name for name in self.config.scenes if name not in scenes]
            if unknown:
                have = f"it has {sorted(scenes)}" if scenes else "the split has none (validation splits never do)"
                raise CalvinDataError(f"--dataset.scenes: {unknown} not in {self.root / SCENES}: {have}; "
                                      "pick from those, or leave --dataset.scenes unset")
            keep &= _covered(bounds, np.asarray([scenes[name] for name in self.config.scenes], np.int64))
        if keep.all():
            return SegmentTable(bounds, texts, tasks)
        kept = np.flatnonzero(keep).tolist()
        return SegmentTable(bounds[kept], [texts[i] for i in kept], [tasks[i] for i in kept])

    def load(self, start: int, end: int) -> Frames:
        keys = [CAMERA_KEYS[c] for c in self.cameras] + ["robot_obs", *self.config.action_keys]
        data: dict[str, np.ndarray] = {}
        for row, frame in enumerate(range(start, end + 1)):
            try:
                with NpzReader(frame_file(self.root, frame)) as npz:
                    for k in keys:
                        value = npz.read(k, FRAME_CHECKS[k])
                        if k not in data:
                            data[k] = np.empty((end - start + 1, *value.shape), value.dtype)
                        data[k][row] = value
            except UnsafeFileError as exc:  # missing, not a file, truncated, corrupt, a key missing, a wrong shape
                raise CalvinDataError(f"{exc}; run `robo-run data check {self.root}` for every problem") from None
        return Frames(images={c: data[CAMERA_KEYS[c]] for c in self.cameras}, robot_obs=data["robot_obs"],
                      actions={k: data[k] for k in self.config.action_keys})

    # ------------------------------------------------------------------------ checking

    def fingerprint(self) -> str:
        """Changes with the options, the index files, and any frame file's size or time."""
        h = hashlib.sha256(self.config.model_dump_json(exclude={"path"}).encode())
        for name in ("ep_start_end_ids.npy", ANNOTATIONS, SCENES):
            try:
                with open_regular(self.root / name) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except UnsafeFileError as exc:
                if not exc.missing:
                    raise CalvinDataError(str(exc)) from None
                h.update(b"-")
        listing = []
        with os.scandir(self.root) as entries:
            for e in entries:
                if e.name.endswith(".npz"):
                    try:
                        st = e.stat()
                    except OSError:  # a dangling link or a loop: the link itself; reading it reports the problem
                        st = e.stat(follow_symlinks=False)
                    listing.append((e.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        # ctime moves on every write or rename and, unlike mtime, cannot be set back (cp -p, rsync -t)
        h.update(repr(sorted(listing)).encode())
        return h.hexdigest()

    def mapping(self) -> dict[str, str]:
        """What each part of a batch is read from, in every episode_%07d.npz."""
        return {**{f"camera {c}": CAMERA_KEYS[c] for c in self.cameras}, "robot_obs": "robot_obs [15]",
                **{f"actions[{k!r}]": f"{k} [7]" for k in self.config.action_keys},
                "instruction": f"language.ann ({ANNOTATIONS})"}

    def describe(self) -> dict[str, int]:
        ranges = self.recordings()
        return {"frames": int((ranges[:, 1] - ranges[:, 0] + 1).sum()), "segments": len(ranges),
                "annotations": len(self.segments()), "scenes": len(self.scene_ranges())}

    def check(self) -> list[Problem]:
        try:
            ranges = self.recordings()
        except CalvinDataError as exc:
            return [Problem(str(self.root / "ep_start_end_ids.npy"), "", str(exc))]
        problems: list[Problem] = []
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
        problems += annotation_problems(self.root, segments, ranges, scenes)
        keys = [CAMERA_KEYS[c] for c in self.cameras] + ["robot_obs", *self.config.action_keys]
        present = frame_ids(self.root)
        runs: list[Problem] = []
        for first, last in merged(ranges):
            inside = present[np.searchsorted(present, first):np.searchsorted(present, last, side="right")]
            runs += missing_runs(self.root, first, last, inside)
            for frame in inside.tolist():
                problems += self.check_frame(frame_file(self.root, frame), keys)
        return problems + capped(runs, "missing frame ranges")

    @staticmethod
    def check_frame(file: Path, keys: list[str]) -> list[Problem]:
        """Every problem of one frame file: missing, not a file, unreadable, keys, shapes, dtypes,
        NaN. Shapes and dtypes are checked from each member's header, before its data is read."""
        found: list[Problem] = []
        try:
            npz = NpzReader(file)
        except UnsafeFileError as exc:
            if exc.missing:
                return [Problem(str(file), "", "frame missing inside a recording range of ep_start_end_ids.npy")]
            truncated = exc.detail.startswith("not an npz")  # FIFOs, loops and the like say what they are
            return [Problem(str(file), "", f"unreadable or truncated npz ({exc.detail})" if truncated else exc.detail)]
        with npz:
            for key in keys:
                try:
                    value = npz.read(key, FRAME_CHECKS[key])
                except UnsafeFileError as exc:  # one bad member: report it, go on with the others
                    found.append(Problem(str(file), key, exc.detail))
                    continue
                if not key.startswith("rgb_") and not np.isfinite(value).all():
                    found.append(Problem(str(file), key, f"non-finite values at "
                                                         f"{np.flatnonzero(~np.isfinite(value)).tolist()}"))
        return found


LIMIT = 100  # problems of one kind listed one by one; past it, one line counts the rest


def capped(problems: list[Problem], what: str) -> list[Problem]:
    if len(problems) <= LIMIT:
        return problems
    rest = len(problems) - LIMIT
    return problems[:LIMIT] + [Problem(problems[LIMIT].file, "", f"... and {rest} more {what} like the above")]


def merged(ranges: np.ndarray) -> list[tuple[int, int]]:
    """The union of inclusive ranges, sorted and disjoint."""
    out: list[list[int]] = []
    for a, b in sorted(ranges.tolist()):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def missing_runs(root: Path, first: int, last: int, present: np.ndarray) -> list[Problem]:
    """One problem per run of missing frames in first..last (``present``: the sorted ids there)."""
    edges = np.concatenate([[first - 1], present, [last + 1]])
    gaps = np.flatnonzero(np.diff(edges) > 1)
    out = []
    for a, b in zip((edges[gaps] + 1).tolist(), (edges[gaps + 1] - 1).tolist()):
        if a == b:
            out.append(Problem(str(frame_file(root, a)), "",
                               "frame missing inside a recording range of ep_start_end_ids.npy"))
        else:
            out.append(Problem(str(frame_file(root, a)), "",
                               f"frames {a}..{b} missing ({b - a + 1} files, {frame_file(root, a).name} to "
                               f"{frame_file(root, b).name}) inside a recording range of ep_start_end_ids.npy"))
    return out


def annotation_problems(root: Path, segments: list[Segment], ranges: np.ndarray,
                        scenes: list[tuple[int, int]]) -> list[Problem]:
    """Annotations outside every recording range, or (when the split has scenes) every scene."""
    bounds = np.fromiter((v for seg in segments for v in (seg.start, seg.end)), np.int64,
                         2 * len(segments)).reshape(-1, 2)
    outside = ~_covered(bounds, ranges) | (bounds[:, 0] > bounds[:, 1])
    problems = capped([Problem(str(root / ANNOTATIONS), f"info.indx[{i}]", f"annotation ({bounds[i, 0]}, "
                               f"{bounds[i, 1]}) is not inside one recording range of ep_start_end_ids.npy")
                       for i in np.flatnonzero(outside).tolist()], "annotations outside the recordings")
    if scenes:
        homeless = ~outside & ~_covered(bounds, np.asarray(scenes, dtype=np.int64).reshape(-1, 2))
        problems += capped([Problem(str(root / SCENES), f"info.indx[{i}]", f"annotation ({bounds[i, 0]}, "
                                    f"{bounds[i, 1]}) lies in no scene of scene_info.npy")
                            for i in np.flatnonzero(homeless).tolist()], "annotations outside the scenes")
    return problems


def _covered(bounds: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Per row (start, end) of ``bounds``: whether one inclusive range of ``ranges`` holds it."""
    if not len(ranges):
        return np.zeros(len(bounds), bool)
    order = np.argsort(ranges[:, 0], kind="stable")
    starts, reach = ranges[order, 0], np.maximum.accumulate(ranges[order, 1])  # reach: the furthest end so far
    i = np.searchsorted(starts, bounds[:, 0], side="right") - 1  # the last range starting at or before each start
    return (i >= 0) & (reach[np.maximum(i, 0)] >= bounds[:, 1])
