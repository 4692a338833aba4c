"""Streaming per-dimension statistics, shared by action spaces and `robo-run data stats`."""

from __future__ import annotations

import numpy as np


class RunningStats:
    """Per-dimension count, mean, std, min, max and q01/q99 in one streaming pass.

    Quantiles come from a seeded reservoir of at most ``reservoir`` rows (exact below it).
    """

    def __init__(self, dims: int, reservoir: int = 100_000, seed: int = 0):
        self.n, self.sum, self.sumsq = 0, np.zeros(dims), np.zeros(dims)
        self.min, self.max = np.full(dims, np.inf), np.full(dims, -np.inf)
        self.sample, self.capacity = np.empty((0, dims)), reservoir
        self.rng = np.random.default_rng(seed)

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.sum.shape[0])
        if not len(rows):
            return
        self.sum += rows.sum(0)
        self.sumsq += (rows ** 2).sum(0)
        self.min, self.max = np.minimum(self.min, rows.min(0)), np.maximum(self.max, rows.max(0))
        fill = min(self.capacity - len(self.sample), len(rows))
        self.sample = np.concatenate([self.sample, rows[:fill]])
        rest = rows[fill:]
        if len(rest):  # reservoir sampling (Algorithm R), vectorized: row i replaces slot j < capacity
            seen = self.n + fill + 1 + np.arange(len(rest))
            slot = (self.rng.random(len(rest)) * seen).astype(np.int64)
            keep = slot < self.capacity
            self.sample[slot[keep]] = rest[keep]
        self.n += len(rows)

    def result(self) -> dict[str, list[float]]:
        if self.n == 0:
            raise ValueError("no rows to compute statistics from")
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sumsq / self.n - mean ** 2, 0))
        q01, q99 = np.quantile(self.sample, [0.01, 0.99], axis=0)
        return {"count": [float(self.n)], "mean": mean.tolist(), "std": std.tolist(), "min": self.min.tolist(),
                "max": self.max.tolist(), "q01": q01.tolist(), "q99": q99.tolist()}
