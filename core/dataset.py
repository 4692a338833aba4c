"""The Dataset interface: episodes on disk, listed and read frame ranges at a time.

Frame ids are the dataset's own (global) ids; ranges are inclusive at both ends, as
CALVIN's annotations are. The core cuts windows of T frames and chunks of C actions from
what a dataset lists, so windows, padding and masks are written once.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from robovla.config import ComponentConfig


@dataclass(frozen=True, slots=True)  # slots: a split can list millions
class Segment:
    """A language-annotated stretch of one episode: frames start..end, both inclusive."""

    start: int
    end: int
    instruction: str
    task: str | None = None


class SegmentTable(Sequence[Segment]):
    """Segments held as arrays (16 bytes of bounds and 8 of text codes each, every distinct text
    once) instead of one object each: a split can list millions. Indexing gives a Segment."""

    def __init__(self, bounds: np.ndarray, instructions: Sequence[str], tasks: Sequence[str | None]):
        """``bounds`` int [S, 2] (start, end), and each segment's instruction and task."""
        codes: dict[str | None, int] = {}
        self.bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
        self.text_codes = np.fromiter((codes.setdefault(t, len(codes)) for t in instructions), np.int32,
                                      len(self.bounds))
        self.texts = list(codes)
        codes = {}
        self.task_codes = np.fromiter((codes.setdefault(t, len(codes)) for t in tasks), np.int32, len(self.bounds))
        self.tasks = list(codes)

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> "SegmentTable":
        bounds = np.fromiter((v for s in segments for v in (s.start, s.end)), np.int64, 2 * len(segments))
        return cls(bounds, [s.instruction for s in segments], [s.task for s in segments])

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start, end = self.bounds[i].tolist()
        return Segment(start, end, self.texts[self.text_codes[i]], self.tasks[self.task_codes[i]])


@dataclass
class Frames:
    """Frames start..end of one episode, n of them."""

    images: dict[str, np.ndarray]  # camera -> uint8 [n, H, W, 3]
    robot_obs: np.ndarray  # float [n, 15]
    actions: dict[str, np.ndarray]  # action key -> float [n, A], raw (the action space picks its key)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the files: where (file, key) and what."""

    file: str
    key: str
    message: str


class Dataset(abc.ABC):
    """A split of episodes (e.g. CALVIN's ``training/`` folder)."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def cameras(self) -> tuple[str, ...]:
        """Cameras this dataset provides (``static``, ``gripper``, ...)."""

    @abc.abstractmethod
    def segments(self) -> list[Segment]:
        """Every language-annotated segment, in file order."""

    @abc.abstractmethod
    def load(self, start: int, end: int) -> Frames:
        """Frames start..end (inclusive) of one episode."""

    @abc.abstractmethod
    def check(self) -> list[Problem]:
        """Validate the files; every problem, each with its file and key. Empty when clean."""

    def segment_table(self) -> SegmentTable:
        """:meth:`segments` as a :class:`SegmentTable` (what windows are cut from); datasets with
        many segments may build it without a Segment object each."""
        return SegmentTable.of(self.segments())

    def fingerprint(self) -> str | None:
        """A value that changes whenever the files change (the frame cache compares it);
        None means unknown, and a cache is then rebuilt every time."""
        return None

    def describe(self) -> dict[str, int]:
        """Counts for reports (``robo-run data check``); datasets add their own (frames, ...)."""
        return {"annotations": len(self.segments())}

    def mapping(self) -> dict[str, str]:
        """What each part of a batch is read from (``robo-run data check`` prints it), e.g.
        ``{"camera static": "observation.images.top (video, 480x640x3)"}``; {} when fixed by the format."""
        return {}

    def statistics(self, key: str) -> dict[str, list[float]] | None:
        """Statistics the dataset ships for action key ``key`` (per dimension: min, max, mean,
        std, q01, q99, ...), which an action space may take instead of fitting; None: none."""
        return None
