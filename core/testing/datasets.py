"""Conformance checks for datasets, run on every registered dataset that can write synthetic data.

A dataset's synthetic data comes from its ``synthesize`` classmethod, the capability that
``robo-run data synth`` uses: ``synthesize(out, episodes, seed)`` writes splits as folders
of ``out`` and returns ``{split: counts}``; each split opens with ``path = out / split``, as
``robo-run data`` opens a folder. A dataset without one is skipped. :data:`EPISODES`
episodes are written once per test session into a temporary folder. Shape letters: T
window, C chunk, A action dim, H/W image size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from robovla.batch import ROBOT_OBS_DIM
from robovla.dataset import Dataset, Frames, Segment
from robovla.registry import Component, create
from robovla.testing import check, name
from robovla.windows import frames_needed, sample_starts

EPISODES, SEED = 2, 0
WINDOW, CHUNK = 4, 3  # T and C of the windows cut for the check


_WRITTEN: dict[tuple[str, str, type], tuple[tempfile.TemporaryDirectory, dict[str, Path]]] = {}


def synthetic(component: Component) -> dict[str, Dataset]:
    """split -> the dataset opened on that split of its synthetic data, written once per
    test session into a temporary folder (removed at exit)."""
    cls = component.load()
    if not callable(getattr(cls, "synthesize", None)):
        pytest.skip(f"{name(component)} has no synthetic data: define a classmethod synthesize(out, episodes, seed) "
                    "(robo-run data synth uses it too) to run the dataset checks")
    key = (component.plugin.name if component.plugin else "", component.name, cls)
    if key not in _WRITTEN:
        tmp = tempfile.TemporaryDirectory(prefix="robovla-check-")
        out = Path(tmp.name) / "data"
        counts = cls.synthesize(out, EPISODES, SEED)
        assert isinstance(counts, dict) and counts, (
            f"{name(component)}: synthesize() returned {counts!r}; return {{split: counts}} naming the folders it wrote")
        missing = [split for split in counts if not (out / split).is_dir()]
        assert not missing, f"{name(component)}: synthesize() reports splits {missing} but wrote no such folders in {out}"
        _WRITTEN[key] = tmp, {split: out / split for split in counts}
    return {split: create("dataset", component.name, {"path": path}) for split, path in _WRITTEN[key][1].items()}


def load(component: Component, dataset: Dataset, start: int, end: int, what: str) -> Frames:
    """Frames start..end, each array holding exactly one row per frame id."""
    try:
        frames = dataset.load(start, end)
    except Exception as exc:
        raise AssertionError(f"{name(component)}: {what} ({start}, {end}) cannot be loaded ({type(exc).__name__}: "
                             f"{exc}); segments must lie within the frames the dataset has") from None
    n = end - start + 1
    assert set(frames.images) == set(dataset.cameras), (
        f"{name(component)}: load gives cameras {sorted(frames.images)}, the dataset declares {list(dataset.cameras)}")
    arrays = {f"images[{cam!r}]": img for cam, img in frames.images.items()}
    arrays.update({"robot_obs": frames.robot_obs}, **{f"actions[{k!r}]": a for k, a in frames.actions.items()})
    short = {key: len(a) for key, a in arrays.items() if len(a) != n}
    assert not short, (f"{name(component)}: {what} ({start}, {end}) spans {n} frame ids, but load gives {short} rows; "
                       "segments must lie within the frames the dataset has (ends are inclusive)")
    for key, img in frames.images.items():
        assert img.dtype == np.uint8 and img.ndim == 4 and img.shape[-1] == 3, (
            f"{name(component)}: images[{key!r}] is {img.dtype} {img.shape}; expected uint8 [n, H, W, 3]")
    assert frames.robot_obs.shape[1:] == (ROBOT_OBS_DIM,), (
        f"{name(component)}: robot_obs is {frames.robot_obs.shape}; expected [n, {ROBOT_OBS_DIM}]")
    assert frames.actions and all(a.ndim == 2 for a in frames.actions.values()), (
        f"{name(component)}: actions must be a non-empty dict of [n, A] arrays")
    return frames


def same_rows(a: Frames, b: Frames, rows: slice) -> bool:
    return (all(np.array_equal(a.images[c][rows], b.images[c]) for c in a.images)
            and np.array_equal(a.robot_obs[rows], b.robot_obs)
            and all(np.array_equal(a.actions[k][rows], b.actions[k]) for k in a.actions))


@check("dataset")
def dataset_checks_its_own_synthetic_data(component: Component) -> None:
    """check() finds no problem in any split of the dataset's own synthetic data."""
    for split, dataset in synthetic(component).items():
        problems = dataset.check()
        listed = "\n".join(f"  {p.file} [{p.key}]: {p.message}" for p in problems[:8])
        assert not problems, (f"{name(component)}: check() reports {len(problems)} problem(s) in the {split} split "
                              f"that synthesize() wrote:\n{listed}\nsynthesize and check must agree on the format")


@check("dataset")
def dataset_windows_lie_within_annotations(component: Component) -> None:
    """Every segment of the synthetic data loads one row per frame id; the windows cut from
    it (first, middle and last of each segment) lie inside it and load as the same rows."""
    for split, dataset in synthetic(component).items():
        segments: list[Segment] = dataset.segments()
        assert segments, f"{name(component)}: the {split} split of its synthetic data has no segments"
        loaded = []
        for i, seg in enumerate(segments):
            assert seg.start <= seg.end, f"{name(component)}: segment {i} ends ({seg.end}) before it starts"
            loaded.append(load(component, dataset, seg.start, seg.end, f"segment {i}"))
        starts = sample_starts(segments, WINDOW)
        assert len(starts), f"{name(component)}: no segment of the {split} split holds a window of {WINDOW} frames"
        for i, seg in enumerate(segments):
            mine = starts[starts[:, 0] == i, 1]
            for s in sorted({int(mine[0]), int(mine[len(mine) // 2]), int(mine[-1])} if len(mine) else ()):
                first, last = frames_needed(s, seg, WINDOW, CHUNK)
                assert seg.start <= first <= s + WINDOW - 1 <= last <= seg.end, (
                    f"{name(component)}: the window at {s} reads frames ({first}, {last}) outside segment {i} "
                    f"({seg.start}, {seg.end})")
                window = load(component, dataset, first, last, f"the window at {s} of segment {i}")
                assert same_rows(loaded[i], window, slice(first - seg.start, last - seg.start + 1)), (
                    f"{name(component)}: frames ({first}, {last}) load differently alone and as part of segment "
                    f"{i} ({seg.start}, {seg.end}); load(start, end) must read frames by their ids")
