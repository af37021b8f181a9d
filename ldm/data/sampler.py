"""Data order: seeded, rank-sharded, bucket-aware and resumable at any batch.

Each epoch is a permutation drawn from ``(seed, epoch)``. The permutation is cut into *global*
batches (per-process batch x number of processes), each from a single bucket; process ``r``
takes slice ``r`` of every global batch. Every example carries its own seed, a function of
``(seed, epoch, index)``, from which all of its randomness (crop, flip, noise, timestep,
caption dropout) is drawn. Hence:

- resuming at ``(epoch, batch)`` replays exactly the examples and random draws of an
  uninterrupted run;
- 2 processes with batch B see the same examples, with the same draws, as 1 process with
  batch 2B, so their averaged gradients are equal.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from ldm.data.images import DataError


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one visit of one example, independent of every other visit."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ResumableBatchSampler(Sampler):
    """Yields lists of ``(index, example_seed)`` for this process, forever (epoch after epoch).

    groups: index lists that may not be mixed within a batch (aspect buckets); one list otherwise.
    start: how many global batches were consumed before (the resume position). The count, not
    the sampler, is what a checkpoint stores: DataLoader workers read ahead of the training loop.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        self.groups = [list(g) for g in groups]
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.start = start
        if self.batches_per_epoch() == 0:
            sizes = [len(g) for g in self.groups]
            raise DataError(f"no group of examples (sizes {sizes}) fills one global batch of "
                            f"{self.global_batch} (train.batch_size x processes); lower train.batch_size "
                            f"or add data")

    def batches_per_epoch(self) -> int:
        return sum(len(g) // self.global_batch for g in self.groups)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, in order (a pure function of seed and epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            whole = len(perm) // self.global_batch * self.global_batch
            batches += [perm[i:i + self.global_batch] for i in range(0, whole, self.global_batch)]
        order = torch.randperm(len(batches), generator=gen).tolist() if len(self.groups) > 1 else range(len(batches))
        return [batches[i] for i in order]

    def __iter__(self):
        epoch, first = divmod(self.start, self.batches_per_epoch())
        while True:
            for batch in self.epoch_batches(epoch)[first:]:
                mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                yield [(i, example_seed(self.seed, epoch, i)) for i in mine]
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the iterator itself never ends
        return self.batches_per_epoch()
