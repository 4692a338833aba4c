"""Batch buffers in shared memory that DataLoader workers fill in place and the training
process reuses.

A fresh shared-memory batch costs more than its contents: every page of a new block is
faulted in on both sides (measured on a 2-core machine: 6.7 ms to allocate and fill 19 MB of
shared memory, 1.3 ms in ordinary memory). So each iteration over a loader allocates a few
batch-sized blocks before its workers start. The batch sampler hands every request a free
block, the worker writes the batch into it and sends back only the block's number, and the
training process wraps the block in tensors.

Safety: a block is free again only when nothing in the training process references its
storage any more (torch's storage use count; views and numpy arrays taken from a batch
count too). A batch therefore stays valid for as long as it is held. When every block is
held, the worker writes into a fresh block instead, which is as fast as a plain DataLoader.

The use count is a private torch function (``torch._C._storage_Use_Count``). It is used
only if it is there and counts as reuse needs (:func:`storage_use_count` checks both once);
otherwise every batch is written into fresh memory, like an ordinary DataLoader's.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import torch


def storage_use_count() -> Callable[[int], int] | None:
    """torch's storage use count if this torch has it and it behaves as block reuse needs (a
    view holds a reference, dropping the view releases it); None otherwise."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        block = torch.empty(4)
        uses = lambda: count(block.untyped_storage()._cdata)  # noqa: E731
        alone = uses()
        view = block[:2]
        held = uses()
        del view
        return count if held > alone == uses() else None
    except Exception:  # a changed signature: fall back to fresh batches
        return None


_USE_COUNT = storage_use_count()  # None: blocks are never reused


class Request(NamedTuple):
    """What the batch sampler sends a worker: the sample indices and the block to fill (None: a fresh one)."""

    slot: int | None
    indices: list[int]


class Filled(NamedTuple):
    """What a worker sends back: the block it filled (``tensors`` only when it is a fresh one)."""

    slot: int | None
    size: int
    tensors: dict[str, torch.Tensor] | None
    extra: Any  # whatever does not fit a fixed-shape buffer (e.g. the instruction strings)


class Ring:
    """``slots`` blocks, each a dict key -> tensor [B, *shape] following ``spec`` (key -> (shape, dtype))."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], batch_size: int, slots: int):
        self.spec, self.batch_size = spec, batch_size
        self.blocks = [{key: torch.empty((batch_size, *shape), dtype=dtype).share_memory_()
                        for key, (shape, dtype) in spec.items()} for _ in range(slots if _USE_COUNT else 0)]
        self.base = [self._uses(block) for block in self.blocks]
        self.pending: set[int] = set()  # handed to a worker, not yet back

    @staticmethod
    def _uses(block: dict[str, torch.Tensor]) -> int:
        return sum(_USE_COUNT(t.untyped_storage()._cdata) for t in block.values())

    def claim(self) -> int | None:
        """A block nobody holds (marked pending until :meth:`receive`), or None when all are held."""
        for slot, block in enumerate(self.blocks):
            if slot not in self.pending and self._uses(block) == self.base[slot]:
                self.pending.add(slot)
                return slot
        return None

    def target(self, slot: int | None, size: int) -> dict[str, torch.Tensor]:
        """Where a worker writes a batch of ``size`` samples: the first rows of block ``slot``, or a
        fresh block (moved to shared memory when it is sent)."""
        if slot is None:
            return {key: torch.empty((size, *shape), dtype=dtype) for key, (shape, dtype) in self.spec.items()}
        return {key: t[:size] for key, t in self.blocks[slot].items()}

    def receive(self, filled: Filled) -> dict[str, torch.Tensor]:
        """The tensors of a batch that came back from a worker (in the training process)."""
        if filled.slot is None:
            return filled.tensors
        self.pending.discard(filled.slot)
        return self.target(filled.slot, filled.size)


class RingBatchSampler(torch.utils.data.Sampler):
    """Groups ``sampler``'s indices into batches and gives each a block of :attr:`ring`."""

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.ring: Ring | None = None  # set for each iteration by the loader
        self.skip = 0  # batches of the next iteration to pass over unread (resuming mid-epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Request]:
        batch: list[int] = []
        skip, self.skip = self.skip, 0
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                if skip:
                    skip -= 1
                else:
                    yield Request(self.ring.claim() if self.ring else None, batch)
                batch = []
        if batch and not self.drop_last:
            yield Request(self.ring.claim() if self.ring else None, batch)
