"""A frame cache: the frames a dataset's windows touch, contiguous and memory-mapped.

Reading a CALVIN window costs one compressed npz per frame (18 for T=8, C=10). The cache
decompresses each frame once into plain ``.npy`` arrays (one per camera, robot_obs and
action key) and an index of frame-id ranges, so that a window is a slice. It is rebuilt
when the dataset's fingerprint (taken before reading) changes. Builders take a lock file
beside the folder, so that several processes (e.g. training ranks) build it once, and
write into a private temporary folder that is renamed into place only when complete.

    cache/
      index.json          {"fingerprint", "ranges": [[first_id, last_id, first_row], ...], ...}
      image_static.npy    uint8 [N, H, W, 3]   (one per camera)
      robot_obs.npy       float [N, 15]
      action_rel_actions.npy ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from robovla.dataset import Dataset, Frames, Problem, Segment, SegmentTable
from robovla.errors import RobovlaError

VERSION = 1
CACHE_DIR = "robovla_cache"  # the default cache folder, inside each split folder
BLOCK = 256  # frames read from the source per step while building


class CacheFolderError(RobovlaError, ValueError):
    """The folder given for a frame cache is not one robovla may replace; nothing was changed."""


FIX = ("the frame cache replaces its whole folder, so it writes only into a new or empty folder or over an "
       "earlier robovla frame cache: choose a new or empty folder (robo-run data cache --out DIR, --train.cache DIR)")


def cache_folder(folder: Path | str) -> Path:
    """``folder`` as an absolute path (``.`` and ``..`` resolved by name), checked to be one the
    cache may replace: absent, an empty folder, or a robovla frame cache (an ``index.json`` of
    robovla's format and only the arrays it names). Anything else raises
    :class:`CacheFolderError` naming the folder, before any file is touched."""
    given = folder
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    if not folder.name:
        raise CacheFolderError(f"{given}: the root folder; {FIX}")
    if Path.cwd() == folder or folder in Path.cwd().parents:
        raise CacheFolderError(f"{given}: the current folder (or a folder holding it); {FIX}")
    if folder.is_symlink():
        raise CacheFolderError(f"{given}: a symbolic link; pass the folder it points to, or {FIX}")
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise CacheFolderError(f"{given}: not a folder; {FIX}")
    names = sorted(p.name for p in folder.iterdir())
    if names and not _is_cache(folder, names):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CacheFolderError(f"{given}: not a robovla frame cache (it holds {shown}); {FIX}")
    return folder


def _is_cache(folder: Path, names: list[str]) -> bool:
    """Whether ``folder`` (holding ``names``) is a frame cache robovla wrote: its index.json in
    robovla's format and nothing but the arrays the index names."""
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or not {"version", "fingerprint", "ranges", "frames", "arrays"} <= set(meta):
        return False
    arrays = meta["arrays"]
    if not isinstance(meta["version"], int) or not isinstance(arrays, list) or \
            not all(isinstance(a, str) for a in arrays) or not isinstance(meta["ranges"], list):
        return False
    return set(names) <= {"index.json", *(f"{a}.npy" for a in arrays)}


def merged_ranges(segments: list[Segment]) -> list[tuple[int, int]]:
    """The union of the segments' inclusive frame ranges, as disjoint sorted ranges."""
    out: list[list[int]] = []
    for seg in sorted(segments, key=lambda s: s.start):
        if out and seg.start <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], seg.end)
        else:
            out.append([seg.start, seg.end])
    return [(a, b) for a, b in out]


def frame_blocks(ranges: list[tuple[int, int]], size: int = BLOCK) -> Iterator[tuple[int, int]]:
    """Inclusive (first, last) blocks of at most ``size`` frames covering ``ranges`` in order:
    how the frames are read in bounded memory."""
    for first, last in ranges:
        for a in range(first, last + 1, size):
            yield a, min(a + size - 1, last)


@contextlib.contextmanager
def locked(folder: Path):
    """An exclusive lock on ``<folder>.lock`` for as long as the block runs (any OS: filelock)."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        yield


def ensure(dataset: Dataset, folder: Path, progress: bool = True) -> bool:
    """Build the cache unless a current one is there; safe to call from many processes at once.
    Returns whether it was built."""
    folder = cache_folder(folder)  # before the lock file or anything else is written
    with locked(folder):
        fingerprint = dataset.fingerprint()  # one scan of the files serves the check and the build
        if _is_current(folder, fingerprint):
            return False
        build(dataset, folder, progress, fingerprint)
        return True


def build(dataset: Dataset, folder: Path, progress: bool = True, fingerprint: Any = None) -> Path:
    """Write the cache of ``dataset`` into ``folder``, replacing an old one (callers hold the
    lock: use :func:`ensure`). ``fingerprint`` must be taken before reading (a change during
    the build then leaves the cache stale, not wrong); None takes it now."""
    from tqdm import tqdm

    if fingerprint is None:
        fingerprint = dataset.fingerprint()
    ranges = merged_ranges(dataset.segments())
    total = sum(b - a + 1 for a, b in ranges)
    if total == 0:
        raise ValueError(f"{type(dataset).__name__} lists no annotated frames to cache")
    folder = cache_folder(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    starts = np.cumsum([0] + [b - a + 1 for a, b in ranges])  # first cache row of each range
    index = [[a, b, int(row)] for (a, b), row in zip(ranges, starts)]
    row = 0
    with tqdm(total=total, unit="frame", desc=f"caching {folder.name}", file=sys.stderr, disable=not progress) as bar:
        for a, b in frame_blocks(ranges):
            frames = dataset.load(a, b)
            parts = {**{f"image_{c}": v for c, v in frames.images.items()}, "robot_obs": frames.robot_obs,
                     **{f"action_{k}": v for k, v in frames.actions.items()}}
            for name, value in parts.items():
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=value.dtype,
                                                             shape=(total, *value.shape[1:]))
                arrays[name][row: row + len(value)] = value
            row += b - a + 1
            bar.update(b - a + 1)
    for array in arrays.values():
        array.flush()
    meta = {"version": VERSION, "fingerprint": fingerprint, "ranges": index, "frames": total,
            "arrays": sorted(arrays)}
    (tmp / "index.json").write_text(json.dumps(meta))
    cache_folder(folder)  # still empty or an old cache (checked again: the build took a while)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def is_current(dataset: Dataset, folder: Path) -> bool:
    """Whether ``folder`` holds a complete cache of ``dataset`` as it is now."""
    return _is_current(Path(folder), dataset.fingerprint())


def _is_current(folder: Path, fingerprint: Any) -> bool:
    try:
        meta = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return fingerprint is not None and meta.get("version") == VERSION and meta.get("fingerprint") == fingerprint


class CachedDataset(Dataset):
    """A dataset read from its frame cache; same segments, same frames, no decompression."""

    def __init__(self, source: Dataset, folder: Path, rebuild: bool = True):
        super().__init__(source.config)
        self.source, self.folder = source, cache_folder(folder)
        self.built = False  # whether opening it had to build it
        if rebuild:
            self.built = ensure(source, self.folder)
        elif not is_current(source, self.folder):
            raise FileNotFoundError(f"{self.folder}: no current frame cache; build it with `robo-run data cache`")
        self._open()

    def _open(self) -> None:
        meta = json.loads((self.folder / "index.json").read_text())
        self.ranges = np.asarray(meta["ranges"], dtype=np.int64).reshape(-1, 3)
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the maps instead of pickling their contents
        return {k: v for k, v in self.__dict__.items() if k not in ("arrays", "ranges")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(n.removeprefix("image_") for n in self.arrays if n.startswith("image_"))

    def segments(self) -> list[Segment]:
        return self.source.segments()

    def segment_table(self) -> SegmentTable:
        return self.source.segment_table()

    def check(self) -> list[Problem]:
        return self.source.check()

    def describe(self) -> dict[str, int]:
        return self.source.describe()

    def mapping(self) -> dict[str, str]:
        return self.source.mapping()

    def statistics(self, key: str) -> dict[str, list[float]] | None:
        return self.source.statistics(key)

    def fingerprint(self) -> Any:
        return self.source.fingerprint()

    def load(self, start: int, end: int) -> Frames:
        i = int(np.searchsorted(self.ranges[:, 0], start, side="right")) - 1
        if i < 0 or end > self.ranges[i, 1]:
            raise KeyError(f"frames {start}..{end} are not in the frame cache {self.folder} (it holds the "
                           "annotated ranges); rebuild it with `robo-run data cache`")
        a = int(self.ranges[i, 2] + start - self.ranges[i, 0])
        rows = slice(a, a + end - start + 1)
        return Frames(images={n.removeprefix("image_"): np.asarray(v[rows]) for n, v in self.arrays.items()
                              if n.startswith("image_")},
                      robot_obs=np.asarray(self.arrays["robot_obs"][rows]),
                      actions={n.removeprefix("action_"): np.asarray(v[rows]) for n, v in self.arrays.items()
                               if n.startswith("action_")})
