"""Frames of a LeRobotDataset's MP4 files, decoded with PyAV (FFmpeg's decoders, AV1 included).

A v3.0 video file holds many episodes one after the other; an episode's frame ``i`` is at
``from_timestamp + i / fps`` seconds. A read seeks to the key frame at or before the first
wanted frame and decodes forward, matching frames by their presentation time rounded to
the frame grid (as lerobot's own decoder does, within half a frame).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from robovla_plugins.datasets.lerobot.files import INSTALL, LeRobotDataError

OPEN_FILES = 8  # decoders kept open per reader (one per camera and file is the usual pattern)


class VideoReader:
    """Decodes frame ranges of MP4 files, keeping the last few files open; picklable (reopens),
    and safe across fork: a forked process (a DataLoader worker) opens its own decoders, since
    the threads of those it inherited did not come with it."""

    def __init__(self, fps: float):
        self.fps = float(fps)
        self._open: OrderedDict[Path, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"fps": self.fps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["fps"])

    def close(self) -> None:
        for container in self._open.values():
            container.close()
        self._open.clear()

    def _container(self, file: Path) -> Any:
        if self._pid != os.getpid():  # inherited through fork: never touch the parent's decoders
            self._open, self._pid = OrderedDict(), os.getpid()
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        try:
            import av
        except ImportError:
            raise LeRobotDataError(f"{file}: decoding LeRobot videos needs PyAV: {INSTALL}") from None
        if not file.is_file():
            raise LeRobotDataError(f"{file}: missing; meta/episodes names it as this episode's video")
        try:
            container = av.open(str(file))
            container.streams.video[0].thread_type = "AUTO"
        except (av.error.FFmpegError, IndexError) as exc:
            raise LeRobotDataError(f"{file}: not a readable video ({exc})") from None
        self._open[file] = container
        if len(self._open) > OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        return container

    def read(self, file: Path, first: float, count: int) -> np.ndarray:
        """``count`` frames from time ``first`` (seconds) of ``file``: uint8 [count, H, W, 3]."""
        import av

        container = self._container(file)
        stream = container.streams.video[0]
        base = round(first * self.fps)  # the frame grid, in frames since the file's start
        out: list[np.ndarray | None] = [None] * count
        try:
            container.seek(max(0, int((first - 0.5 / self.fps) / stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                k = round(float(frame.pts * stream.time_base) * self.fps) - base
                if k >= count:
                    break
                if k >= 0:
                    out[k] = frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            self._open.pop(file, None)
            raise LeRobotDataError(f"{file}: decoding failed near {first:.3f} s ({exc})") from None
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            raise LeRobotDataError(f"{file}: no frames at {[round((base + i) / self.fps, 4) for i in missing[:5]]} s "
                                   f"({len(missing)} of {count} missing); the file is shorter than meta/episodes says")
        return np.stack(out)  # type: ignore[arg-type]
