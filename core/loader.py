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

from robovla.batch import Batch
from robovla.batch_ring import Filled, Request, Ring, RingBatchSampler
from robovla.windows import Window, WindowDataset


def shift_into(out: np.ndarray, image: np.ndarray, oy: int, ox: int) -> None:
    """out[y, x] = image[clip(y + oy), clip(x + ox)] for one [H, W, 3] frame: the crop at offset
    (pad + oy, pad + ox) of the edge-padded frame, written in place without the padded copy."""
    h, w = image.shape[:2]
    if not (abs(oy) < h and abs(ox) < w):
        raise ValueError(f"a shift of ({oy}, {ox}) px does not fit a {h}x{w} image; use a pad below the image size")
    y0, y1 = max(0, -oy), min(h, h - oy)  # rows whose source lies inside
    x0, x1 = max(0, -ox), min(w, w - ox)
    out[y0:y1, x0:x1] = image[y0 + oy: y1 + oy, x0 + ox: x1 + ox]
    out[:y0, x0:x1] = out[y0, x0:x1]  # replicate the first and last real rows, then columns
    out[y1:, x0:x1] = out[y1 - 1, x0:x1]
    out[:, :x0] = out[:, x0: x0 + 1]
    out[:, x1:] = out[:, x1 - 1: x1]


RESIZE_FILTERS = ("bilinear", "bicubic")


def resize(images: np.ndarray, size: int, filter: str = "bilinear") -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3] with ``filter``:

    - ``bilinear``: antialiased when shrinking, in uint8 and channels-last, torch's fast
      path (10x the float route here, within one grey level of it);
    - ``bicubic``: PIL's bicubic, which is what the Kosmos-2 and PaLI-Gemma image processors
      and RoboVLMs' loaders do (torch's own bicubic differs from it by up to 2 grey levels).
    """
    if filter not in RESIZE_FILTERS:
        raise ValueError(f"resize filter {filter!r}: use one of {', '.join(RESIZE_FILTERS)}")
    if images.shape[1:3] == (size, size):
        return images
    if filter == "bicubic":
        from PIL import Image

        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BICUBIC))
                         for img in images])
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
    filter: str = "bilinear"  # how images are resized to S (see :func:`resize`)

    @classmethod
    def for_backbone(cls, backbone: Any, train: bool = True) -> Preprocess:
        """Images as ``backbone`` reads them: its image size and resize filter."""
        return cls(image_size=backbone.image_size, train=train, filter=backbone.resize_filter)

    def __call__(self, window: Window, rng: np.random.Generator) -> Window:
        images = {cam: np.empty(self.shape(img), np.uint8) for cam, img in window.images.items()}
        self.write(window, rng, images)
        return replace(window, images=images)

    def shape(self, images: np.ndarray) -> tuple[int, ...]:
        """The shape one camera's [T, H, W, 3] frames have after preprocessing."""
        t, h, w, c = images.shape
        return (t, self.image_size, self.image_size, c) if self.image_size else (t, h, w, c)

    def write(self, window: Window, rng: np.random.Generator, out: dict[str, np.ndarray]) -> None:
        """Preprocess ``window``'s images straight into ``out`` (camera -> uint8 [T, S, S, 3])."""
        for cam, img in window.images.items():
            if out[cam].shape != self.shape(img):
                raise ValueError(f"camera {cam!r}: frames of shape {img.shape} do not fit a batch buffer of "
                                 f"{out[cam].shape}; every sample of a batch needs the same size (set image_size)")
            img = resize(img, self.image_size, self.filter) if self.image_size else img
            pad = self.shift.get(cam, 0) if self.train else 0
            if pad <= 0:
                out[cam][...] = img
                continue
            dy, dx = rng.integers(0, 2 * pad + 1, size=(2, len(img)))
            for t in range(len(img)):
                shift_into(out[cam][t], img[t], int(dy[t]) - pad, int(dx[t]) - pad)


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
    """A WindowDataset with :class:`Preprocess` applied; randomness seeded per (seed, epoch, index).

    Asked for a :class:`Request` (by :class:`Loader`), it writes the whole batch into the
    request's shared block and returns a small :class:`Filled`.
    """

    FIELDS = ("robot_obs", "actions", "action_mask", "frame_mask")

    def __init__(self, windows: WindowDataset, preprocess: Preprocess, seed: int = 0):
        self.windows, self.preprocess, self.seed, self.epoch = windows, preprocess, seed, 0
        self.ring: Ring | None = None  # the loader's buffers for the current iteration
        self._spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> Window:
        return self.preprocess(self.windows[i], self.rng(i))

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Batch buffer layout, key -> (shape without B, dtype), taken from the first sample."""
        if self._spec is None:
            first = self.windows[0]
            spec = {f"images/{cam}": (self.preprocess.shape(img), torch.uint8) for cam, img in first.images.items()}
            for key in self.FIELDS:
                value = getattr(first, key)
                spec[key] = (value.shape, torch.from_numpy(value[:0]).dtype)
            self._spec = spec
        return self._spec

    def __getitems__(self, request: Request | list[int]) -> Filled | list[Window]:
        if not isinstance(request, Request):  # a plain DataLoader's list of indices
            return [self[i] for i in request]
        out = {key: t.numpy() for key, t in self.ring.target(request.slot, len(request.indices)).items()}
        instructions = []
        for row, i in enumerate(request.indices):
            window = self.windows[i]
            self.preprocess.write(window, self.rng(i), {cam: out[f"images/{cam}"][row] for cam in window.images})
            for key in self.FIELDS:
                out[key][row] = getattr(window, key)
            instructions.append(window.instruction)
        tensors = None if request.slot is not None else {key: torch.from_numpy(a) for key, a in out.items()}
        return Filled(request.slot, len(request.indices), tensors, instructions)

    def assemble(self, filled: Filled, ring: Ring) -> Batch:
        """The :class:`Batch` of a filled block, in the training process."""
        t = ring.receive(filled)
        return Batch(images={key.split("/", 1)[1]: v for key, v in t.items() if key.startswith("images/")},
                     instruction=list(filled.extra), **{key: t[key] for key in self.FIELDS})


class Loader(torch.utils.data.DataLoader):
    """A DataLoader of :class:`Batch` whose workers write into reused shared memory
    (:mod:`robovla.batch_ring`): a batch stays valid while it is held, and its memory is
    reused once it is dropped."""

    def __init__(self, data: AugmentedWindows, batch_sampler: RingBatchSampler, *, num_workers: int,
                 pin_memory: bool = False, **kwargs: Any):
        if kwargs.pop("persistent_workers", False):
            raise ValueError("robovla's Loader starts its workers per iteration (each gets fresh buffers); "
                             "persistent_workers is not supported")
        super().__init__(data, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_as_is,
                         pin_memory=False, **kwargs)
        self.pin = pin_memory
        self.fresh_batches = 0  # batches written into fresh memory because every buffer was held
        self._ring: Ring | None = None  # single-process loaders keep one ring

    def set_epoch(self, epoch: int) -> None:
        """The next iteration's shuffling, augmentation draws and worker seeds, all functions of
        (seed, epoch): a run resumed mid-epoch reads what the uninterrupted run read."""
        sampler = self.batch_sampler.sampler
        sampler.set_epoch(epoch)
        self.generator.manual_seed(int(np.random.default_rng([sampler.seed, epoch, 1]).integers(2 ** 62)))

    def __iter__(self) -> Iterator[Batch]:
        ring = self._ring
        if ring is None:  # workers fork per iteration and keep the ring they saw; a new one each time
            # requested from workers, plus the one being returned, the one the caller still holds
            # while asking for the next, and two more that it may keep (e.g. for logging)
            in_flight = (self.prefetch_factor or 1) * max(self.num_workers, 1)
            ring = Ring(self.dataset.spec(), self.batch_sampler.batch_size, in_flight + 4)
            self._ring = ring if self.num_workers == 0 else None
        self.dataset.ring = self.batch_sampler.ring = ring
        for filled in super().__iter__():
            self.fresh_batches += filled.slot is None
            batch = self.dataset.assemble(filled, ring)
            yield batch.pin_memory() if self.pin else batch


def _as_is(item: Any) -> Any:
    return item


def make_loader(windows: WindowDataset, batch_size: int, *, preprocess: Preprocess | None = None, shuffle: bool = True,
                seed: int = 0, num_workers: int = 2, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, drop_last: bool = True, **kwargs: Any) -> Loader:
    """The loader for training or validation: workers read and preprocess, batches are :class:`Batch`."""
    data = AugmentedWindows(windows, preprocess or Preprocess(), seed)
    sampler = ShardedSampler(len(data), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, dataset=data)
    loader = Loader(data, RingBatchSampler(sampler, batch_size, drop_last), num_workers=num_workers,
                    pin_memory=pin_memory, generator=torch.Generator(), **kwargs)
    loader.set_epoch(0)
    return loader
