"""Rollout videos: the first chains (episodes) of a closed-loop evaluation as MP4 files.

One frame per env step, the observation after it: the cameras side by side (static, then
gripper, each scaled to :data:`HEIGHT` pixels high) above a band with the chain's number,
the current subtask and its instruction, and one box per subtask (green: done, orange:
under way, red: failed, grey: not reached). Encoded with PyAV (FFmpeg's libraries in one
wheel; ``pip install "robovla[video]"``), H.264 where the build has it. A file appears
under its name only once it is complete; a chain that is re-run is filmed again.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from robovla.errors import RobovlaError

HEIGHT = 200  # pixels; CALVIN's static camera
BAND = 44  # pixels of text under the images
MIN_WIDTH = 400
FPS = 30  # CALVIN's control rate: one second of video is one second of robot time
COLOURS = {"done": (85, 168, 104), "running": (221, 132, 82), "failed": (196, 78, 82), "pending": (150, 150, 150)}
INSTALL = 'pip install "robovla[video]" (PyAV, which brings its own FFmpeg)'


class VideoError(RobovlaError, RuntimeError):
    """Videos cannot be written (PyAV is missing); the message says how to fix it."""


def require_av(flag: str = "--record") -> Any:
    """The ``av`` module, or a VideoError with the install command."""
    try:
        import av
    except ImportError as exc:
        raise VideoError(f"{flag}: writing videos needs PyAV, which is not installed ({exc}); {INSTALL}") from None
    return av


def video_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:04d}.mp4"


class Recorder:
    """Films the jobs at positions below ``count`` into ``folder`` (see the module docstring);
    the evaluation loop calls :meth:`begin`, :meth:`frame`, :meth:`end` and :meth:`discard`."""

    def __init__(self, folder: Path, count: int, prefix: str, fps: int = FPS):
        self.av = require_av()
        self.folder, self.count, self.prefix, self.fps = Path(folder), count, prefix, fps
        self.folder.mkdir(parents=True, exist_ok=True)
        self.open: dict[int, tuple[Any, Any, Path]] = {}  # job index -> (container, stream, partial path)
        self.bands: dict[int, tuple[Any, Any]] = {}  # job index -> (what it shows, its text band drawn)
        from PIL import ImageFont

        try:
            self.font = ImageFont.load_default(size=12)
        except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
            self.font = ImageFont.load_default()

    def wants(self, job: Any) -> bool:
        return job.position < self.count

    def begin(self, job: Any) -> None:
        self.discard(job)  # a re-run starts its film over
        if self.wants(job):
            self.open[job.index] = None  # opened at the first frame, when its size is known

    def frame(self, job: Any, observation: Any, instruction: str, marks: list[tuple[str, str]]) -> None:
        if job.index not in self.open:
            return
        image = self.compose(observation, job.index, instruction, marks)
        if self.open[job.index] is None:
            partial = self.folder / f".{video_name(self.prefix, job.index)}.partial.mp4"
            container = self.av.open(str(partial), "w")
            x264 = "libx264" in self.av.codecs_available
            # veryfast: measured on CALVIN frames, 1.5 ms a frame and 9% smaller files than x264's default (2.7 ms)
            stream = container.add_stream("libx264" if x264 else "mpeg4", rate=self.fps,
                                          options={"preset": "veryfast"} if x264 else {})
            stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
            self.open[job.index] = (container, stream, partial)
        container, stream, _ = self.open[job.index]
        for packet in stream.encode(self.av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)

    def end(self, job: Any, result: dict[str, Any]) -> None:
        self.bands.pop(job.index, None)
        entry = self.open.pop(job.index, None)
        if entry is None:
            return
        container, stream, partial = entry
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        os.replace(partial, self.folder / video_name(self.prefix, job.index))

    def discard(self, job: Any) -> None:
        self.bands.pop(job.index, None)
        entry = self.open.pop(job.index, None)
        if entry:
            entry[0].close()
            entry[2].unlink(missing_ok=True)

    def close(self) -> None:
        """Drop the films of jobs that did not end (an interrupted evaluation)."""
        for index in list(self.open):
            self.discard(SimpleNamespace(index=index))

    def clear(self, indices: list[int]) -> None:
        """Remove the videos (and unfinished ones) of these chains left by an earlier evaluation,
        so that a new one lists only its own."""
        for index in indices:
            name = video_name(self.prefix, index)
            for file in (self.folder / name, self.folder / f".{name}.partial.mp4"):
                file.unlink(missing_ok=True)

    def compose(self, observation: Any, index: int, instruction: str, marks: list[tuple[str, str]]) -> np.ndarray:
        """One frame, uint8 [H, W, 3], both sides even."""
        from PIL import Image

        cameras = sorted(observation.images, key=lambda c: ({"static": 0, "gripper": 1}.get(c, 2), c))
        tiles = []
        for camera in cameras:
            tile = Image.fromarray(np.asarray(observation.images[camera], dtype=np.uint8))
            tiles.append(tile.resize((max(1, round(tile.width * HEIGHT / tile.height)), HEIGHT), Image.BILINEAR))
        width = max(MIN_WIDTH, sum(t.width for t in tiles))
        width += width % 2
        canvas = Image.new("RGB", (width, HEIGHT), (24, 24, 24))
        x = (width - sum(t.width for t in tiles)) // 2
        for tile in tiles:
            canvas.paste(tile, (x, 0))
            x += tile.width
        key = (width, instruction, tuple(marks))
        if self.bands.get(index, (None,))[0] != key:  # it changes once per subtask: drawn then, reused
            self.bands[index] = (key, self.draw_band(width, index, instruction, marks))
        return np.concatenate([np.asarray(canvas), self.bands[index][1]])

    def draw_band(self, width: int, index: int, instruction: str, marks: list[tuple[str, str]]) -> np.ndarray:
        """The text band under the images: uint8 [BAND, width, 3]."""
        from PIL import Image, ImageDraw

        band = Image.new("RGB", (width, BAND), (24, 24, 24))
        draw = ImageDraw.Draw(band)
        current = next((i for i, (_, state) in enumerate(marks) if state in ("running", "failed")), len(marks) - 1)
        head = f"{self.prefix.replace('_', '-')} {index}  {current + 1}/{len(marks)}: {instruction}"
        draw.text((6, 4), self._fit(draw, head, width - 12), fill=(235, 235, 235), font=self.font)
        x = 6
        for i, (task, state) in enumerate(marks):
            draw.rectangle((x, 24, x + 15, 39), fill=COLOURS[state])
            draw.text((x + 4, 25), str(i + 1), fill=(255, 255, 255), font=self.font)
            x += 20
        task, state = marks[current]
        draw.text((x + 6, 25), self._fit(draw, f"{task}: {state}", width - x - 12), fill=COLOURS[state],
                  font=self.font)
        return np.asarray(band)

    def _fit(self, draw: Any, text: str, width: int) -> str:
        """``text``, cut with an ellipsis to fit ``width`` pixels."""
        if draw.textlength(text, font=self.font) <= width:
            return text
        while text and draw.textlength(text + "...", font=self.font) > width:
            text = text[:-1]
        return text + "..."


def index(results: list[dict[str, Any]], folder: Path, count: int, prefix: str, relative_to: Path) -> list[dict]:
    """The report's video index: per filmed chain (the first ``count`` results) its file, frames
    and outcome; results whose file is missing are left out."""
    out = []
    for result in results[:count]:
        file = Path(folder) / video_name(prefix, result["index"])
        if not file.is_file():
            continue
        if "completed" in result:
            frames, outcome = sum(result["steps"]), f"{result['completed']}/{len(result['tasks'])} subtasks"
        else:
            frames, outcome = result["steps"], "success" if result["success"] else "failed"
        if result.get("error"):
            outcome += ", error"
        out.append({"index": result["index"], "file": os.path.relpath(file, relative_to), "frames": frames,
                    "outcome": outcome})
    return out
