"""Samples/s of the whole training-sample pipeline: per-frame npz reading against the frame cache,
and the same episodes as a LeRobotDataset: MP4 decoding on every read against the frame cache.

    python bench/data_throughput.py [--data DIR] [--episodes 200] [--batches 40] [--workers 2] [--no-lerobot]

Window 8, chunk 10, both cameras, random shift, resized to 224, batches of 8 through a
DataLoader with 2 workers; the same episodes, the same process, the readers alternating
(npz, cache, mp4, mp4 cache, npz, ...) so that machine noise hits all alike. Without --data
it writes a synthetic split of --episodes episodes into a temporary folder first; the
LeRobot copy is written with ``robo-run data export --to lerobot`` (AV1, lerobot's settings).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import robovla
from robovla.data import fit_action_space
from robovla.frame_cache import CachedDataset, build
from robovla.loader import Preprocess, make_loader
from robovla.windows import WindowDataset


def samples_per_second(dataset, space, args) -> float:
    windows = WindowDataset(dataset, space, window=8, chunk=10)
    loader = make_loader(windows, batch_size=8, preprocess=Preprocess(image_size=224), num_workers=args.workers,
                         seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(next(it).instruction)
    return n / (time.perf_counter() - start)


def reads_per_second(dataset, space, n: int = 200) -> float:
    """Windows read and cut per second in this process, no preprocessing: the reader alone."""
    windows = WindowDataset(dataset, space, window=8, chunk=10)
    step = max(len(windows) // n, 1)
    start = time.perf_counter()
    for i in range(0, step * n, step):
        windows[i % len(windows)]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a CALVIN-format split folder (default: synthetic)")
    parser.add_argument("--episodes", type=int, default=200, help="synthetic episodes when --data is not given")
    parser.add_argument("--batches", type=int, default=40, help="batches of 8 timed per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--no-lerobot", action="store_true", help="skip the LeRobotDataset copy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if path is None:
            t = time.perf_counter()
            robovla.get_component("dataset", "calvin").load().synthesize(Path(tmp), args.episodes, seed=0)
            path = Path(tmp) / "training"
            print(f"wrote {args.episodes} synthetic episodes in {time.perf_counter() - t:.1f} s")
        source = robovla.create("dataset", "calvin", {"path": path})
        t = time.perf_counter()
        build(source, Path(tmp) / "cache", progress=False)
        print(f"built the frame cache in {time.perf_counter() - t:.1f} s")
        clip = robovla.create("action_space", "rel-world")  # rel_actions, clipped: no statistics
        readers = {"npz": (source, clip), "cache": (CachedDataset(source, Path(tmp) / "cache", rebuild=False), clip)}
        if not args.no_lerobot:
            from robovla_plugins.datasets.lerobot.export import export

            t = time.perf_counter()
            export(source, Path(tmp) / "lerobot", progress=False)
            mp4 = robovla.create("dataset", "lerobot", {"path": str(Path(tmp) / "lerobot")})
            print(f"exported it as a LeRobotDataset (AV1) in {time.perf_counter() - t:.1f} s")
            t = time.perf_counter()
            build(mp4, Path(tmp) / "mp4-cache", progress=False)
            print(f"built its frame cache in {time.perf_counter() - t:.1f} s")
            space = robovla.create("action_space", "continuous")  # the LeRobot copy's `action`
            fit_action_space(space, mp4)
            readers.update({"mp4": (mp4, space),
                            "mp4 cache": (CachedDataset(mp4, Path(tmp) / "mp4-cache", rebuild=False), space)})
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(2):
            for name, (reader, space) in readers.items():
                rates[name].append(samples_per_second(reader, space, args))
        median = {name: statistics.median(r) for name, r in rates.items()}
        for name, r in rates.items():
            print(f"{name:<10} {median[name]:8.1f} samples/s   runs {[round(x, 1) for x in r]}")
        print(f"cache / npz:       {median['cache'] / median['npz']:8.2f}x   (the whole pipeline, {args.workers} "
              "workers)")
        if "mp4" in median:
            print(f"mp4 cache / mp4:   {median['mp4 cache'] / median['mp4']:8.2f}x   (decoding once, not per read)")
            print(f"mp4 cache / cache: {median['mp4 cache'] / median['cache']:8.2f}x   (LeRobot path against CALVIN's)")
        raw = {name: reads_per_second(reader, space) for name, (reader, space) in readers.items()}
        print("reader alone:      " + ", ".join(f"{name} {r:.0f}" for name, r in raw.items())
              + " windows/s (one process, no resize or shift)")


if __name__ == "__main__":
    main()
