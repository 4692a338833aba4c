"""Windows and chunks: how every dataset's episodes become training samples (written once).

Shape letters: T window (history frames), C chunk (future actions per step), A action
dim, H/W image size. Frame ids are the dataset's own; segment ends are inclusive.

For an annotated segment (start, end) there is one sample per start frame s with
s >= start and s + T - 1 <= end, i.e. end - start - T + 2 samples. Step t of a sample
(frame s + t) is trained to predict actions s+t .. s+t+C-1, current one first. Actions past
``end`` repeat the action at ``end`` and are masked; the action at ``end`` itself is real
and never masked (RoboVLMs' loader masks it too, an off-by-one not reproduced here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from robovla.dataset import Frames, Segment, SegmentTable


def counts(bounds: np.ndarray, window: int) -> np.ndarray:
    """Samples per segment of (start, end) rows ``bounds`` [S, 2], int64 [S]: end - start - T + 2,
    or 0 when the segment is shorter than T."""
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    return np.maximum(bounds[:, 1] - bounds[:, 0] - window + 2, 0)


def sample_counts(segments: list[Segment], window: int) -> np.ndarray:
    """Samples per segment, int64 [S] (:func:`counts`)."""
    return counts(np.fromiter((v for seg in segments for v in (seg.start, seg.end)), np.int64, 2 * len(segments)),
                  window)


def sample_starts(segments: list[Segment], window: int) -> np.ndarray:
    """All samples as rows (segment index, start frame), in segment order: int64 [n, 2]."""
    counts = sample_counts(segments, window)
    seg = np.repeat(np.arange(len(segments), dtype=np.int64), counts)
    first = np.fromiter((s.start for s in segments), np.int64, len(segments))
    offset = np.arange(len(seg), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([seg, first[seg] + offset], axis=1) if len(seg) else np.empty((0, 2), np.int64)


def frames_needed(start: int, segment: Segment, window: int, chunk: int) -> tuple[int, int]:
    """The inclusive frame range one sample reads: its window plus the chunk's look-ahead,
    cut at the segment end."""
    return start, min(start + window + chunk - 2, segment.end)


@dataclass
class Window:
    """One sample before batching (no batch axis)."""

    images: dict[str, np.ndarray]  # camera -> uint8 [T, H, W, 3]
    instruction: str
    robot_obs: np.ndarray  # float32 [T, 15]
    actions: np.ndarray  # float32 [T, C, A], encoded by the action space
    action_mask: np.ndarray  # bool [T, C]
    frame_mask: np.ndarray  # bool [T]


def make_window(frames: Frames, start: int, segment: Segment, window: int, chunk: int,
                action_space: Any) -> Window:
    """Cut one sample from ``frames`` (ids ``frames_needed(...)``) and encode its actions.

    Each action is encoded with the robot state of its own frame (TCP-frame spaces need it).
    """
    if action_space.source not in frames.actions:
        raise KeyError(f"{type(action_space).__name__} reads action key {action_space.source!r}, but the dataset "
                       f"loaded only {sorted(frames.actions)}; add it to the dataset's action keys")
    raw = frames.actions[action_space.source]
    n = len(raw)
    # index of the frame behind every (t, k): s+t+k, clamped to the last loaded (= segment end)
    idx = np.arange(window)[:, None] + np.arange(chunk)[None, :]
    real = idx + start <= segment.end
    idx = np.minimum(idx, n - 1)
    encoded = action_space.encode(raw, frames.robot_obs)  # [n, A]
    return Window(
        images={cam: img[:window] for cam, img in frames.images.items()},
        instruction=segment.instruction,
        robot_obs=np.asarray(frames.robot_obs[:window], dtype=np.float32),
        actions=np.asarray(encoded[idx], dtype=np.float32),
        action_mask=real,
        frame_mask=np.ones(window, dtype=bool),
    )


class WindowDataset:
    """A map-style dataset of samples over a :class:`robovla.Dataset` (torch DataLoader-ready)."""

    def __init__(self, dataset: Any, action_space: Any, window: int, chunk: int):
        self.dataset, self.action_space = dataset, action_space
        self.window, self.chunk = window, chunk
        table = getattr(dataset, "segment_table", None)  # robovla.Dataset has it; a duck-typed one may not
        self.segments = table() if table else SegmentTable.of(dataset.segments())  # arrays, not objects
        # sample i is start frame first[j] + i of the segment j whose samples hold i:
        # 16 bytes per segment, however many samples there are
        per_segment = counts(self.segments.bounds, window)
        self._ends = np.cumsum(per_segment)  # samples up to and including each segment
        self._first = self.segments.bounds[:, 0] - (self._ends - per_segment)

    @property
    def index(self) -> np.ndarray:
        """Every sample as (segment index, start frame), int64 [n, 2] (built on each call, for reports)."""
        seg = np.repeat(np.arange(len(self._ends), dtype=np.int64), np.diff(self._ends, prepend=0))
        return np.stack([seg, self._first[seg] + np.arange(len(seg), dtype=np.int64)], axis=1)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> Window:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        seg_i = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._first[seg_i]) + i
        segment = self.segments[seg_i]
        first, last = frames_needed(start, segment, self.window, self.chunk)
        return make_window(self.dataset.load(first, last), start, segment, self.window, self.chunk,
                           self.action_space)
