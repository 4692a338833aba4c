"""Training batches: image augmentation as the recipe runs it, seeded shuffling split across
ranks, and a DataLoader whose workers do the reading, augmenting and resizing.

Shape letters: T window, H/W image size, S the size the backbone asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from robovla.windows import Window, WindowDataset, collate


def random_shift(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, H, W, 3] -> the same shape: each frame padded by ``pad`` (edge replicate) and
    cropped back at a random offset in [0, 2 pad], drawn per frame. (RoboVLMs draws from
    [1, 2 pad], a one-pixel bias that is not reproduced.)"""
    if pad <= 0:
        return images
    t, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, t))
    return np.stack([padded[i, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(t)])


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3] (bilinear, antialiased when shrinking).

    Stays in uint8 and channels-last, torch's fast path (10x the float route here, within
    one grey level of it).
    """
    if images.shape[1:3] == (size, size):
        return images
    if not (images.flags.writeable and images.flags.c_contiguous):  # e.g. a read-only cache slice
        images = np.array(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # [T, 3, H, W] view, channels-last
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # already contiguous: no copy


@dataclass
class Preprocess:
    """What the workers do to every window: resize, then shift (training only), as the recipe
    does: its pads (10 px static, 4 px gripper) are in pixels of the resized image."""

    image_size: int | None = None  # S; None keeps the dataset's sizes
    shift: dict[str, int] = field(default_factory=lambda: {"static": 10, "gripper": 4})  # pad per camera
    train: bool = True

    def __call__(self, window: Window, rng: np.random.Generator) -> Window:
        images = {}
        for cam, img in window.images.items():
            img = resize(img, self.image_size) if self.image_size else img
            images[cam] = random_shift(img, self.shift.get(cam, 0), rng) if self.train else img
        return replace(window, images=images)


class ShardedSampler(torch.utils.data.Sampler):
    """Seeded shuffling, the same on every rank, split so that each rank sees its share.

    The order depends on (seed, epoch) only; the last indices are repeated so that every rank
    gets the same number of samples (as torch's DistributedSampler with drop_last=False).
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 dataset: Any = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.epoch, self.dataset = 0, dataset

    def set_epoch(self, epoch: int) -> None:
        """Next epoch's order; also the dataset's augmentation draws (``dataset.epoch``)."""
        self.epoch = epoch
        if self.dataset is not None:
            self.dataset.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        total = len(self) * self.world
        order = np.resize(order, total)  # repeats from the start as often as needed
        return iter(order[self.rank: total: self.world].tolist())


class AugmentedWindows(torch.utils.data.Dataset):
    """A WindowDataset with :class:`Preprocess` applied; randomness seeded per (seed, epoch, index)."""

    def __init__(self, windows: WindowDataset, preprocess: Preprocess, seed: int = 0):
        self.windows, self.preprocess, self.seed, self.epoch = windows, preprocess, seed, 0

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Window:
        return self.preprocess(self.windows[i], np.random.default_rng([self.seed, self.epoch, i]))


def make_loader(windows: WindowDataset, batch_size: int, *, preprocess: Preprocess | None = None, shuffle: bool = True,
                seed: int = 0, num_workers: int = 2, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, drop_last: bool = True, **kwargs: Any) -> torch.utils.data.DataLoader:
    """The DataLoader for training or validation: workers read and preprocess, batches are :class:`Batch`."""
    data = AugmentedWindows(windows, preprocess or Preprocess(), seed)
    sampler = ShardedSampler(len(data), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, dataset=data)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                                       persistent_workers=False, **kwargs)
