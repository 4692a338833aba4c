"""The Dataset interface: episodes on disk, listed and read frame ranges at a time.

Frame ids are the dataset's own (global) ids; ranges are inclusive at both ends, as
CALVIN's annotations are. The core cuts windows of T frames and chunks of C actions from
what a dataset lists, so windows, padding and masks are written once.
"""

from __future__ import annotations

import abc
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

    def fingerprint(self) -> str | None:
        """A value that changes whenever the files change (the frame cache compares it);
        None means unknown, and a cache is then rebuilt every time."""
        return None

    def describe(self) -> dict[str, int]:
        """Counts for reports (``robo-run data check``); datasets add their own (frames, ...)."""
        return {"annotations": len(self.segments())}
