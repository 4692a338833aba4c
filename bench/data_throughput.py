"""Samples/s of the whole training-sample pipeline: per-frame npz reading against the frame cache.

    python bench/data_throughput.py [--data DIR] [--episodes 200] [--batches 40] [--workers 2]

Window 8, chunk 10, both cameras, random shift, resized to 224, batches of 8 through a
DataLoader with 2 workers; the same files, the same process, the two readers alternating
(npz, cache, npz, cache) so that machine noise hits both alike. Without --data it writes a
synthetic split of --episodes episodes into a temporary folder first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import robovla
from robovla.frame_cache import CachedDataset, build
from robovla.loader import Preprocess, make_loader
from robovla.windows import WindowDataset


def samples_per_second(dataset, args) -> float:
    space = robovla.create("action_space", "rel-world")
    windows = WindowDataset(dataset, space, window=8, chunk=10)
    loader = make_loader(windows, batch_size=8, preprocess=Preprocess(image_size=224), num_workers=args.workers,
                         seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(next(it).instruction)
    return n / (time.perf_counter() - start)


def reads_per_second(dataset, n: int = 200) -> float:
    """Windows read and cut per second in this process, no preprocessing: the reader alone."""
    windows = WindowDataset(dataset, robovla.create("action_space", "rel-world"), window=8, chunk=10)
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
        cached = CachedDataset(source, Path(tmp) / "cache", rebuild=False)
        rates: dict[str, list[float]] = {"npz": [], "cache": []}
        for _ in range(2):
            rates["npz"].append(samples_per_second(source, args))
            rates["cache"].append(samples_per_second(cached, args))
        npz, cache = statistics.median(rates["npz"]), statistics.median(rates["cache"])
        print(f"per-frame npz: {npz:8.1f} samples/s   runs {[round(r, 1) for r in rates['npz']]}")
        print(f"frame cache:   {cache:8.1f} samples/s   runs {[round(r, 1) for r in rates['cache']]}")
        print(f"cache / npz:   {cache / npz:8.2f}x   (the whole pipeline, {args.workers} workers)")
        raw_npz, raw_cache = reads_per_second(source), reads_per_second(cached)
        print(f"reader alone:  npz {raw_npz:.0f} windows/s, cache {raw_cache:.0f} windows/s, "
              f"{raw_cache / raw_npz:.0f}x (one process, no resize or shift)")


if __name__ == "__main__":
    main()
