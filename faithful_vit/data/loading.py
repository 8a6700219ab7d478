"""Resumable data loading: an epoch order that is a function of ``(seed, epoch)``, per-sample augmentation seeds,
corrupt images skipped and counted, batches collated into :class:`~faithful_vit.data.sample.Batch`.

* :class:`EpochSampler` shuffles as a pure function of ``(seed, epoch)``, shards over ranks and resumes mid-epoch.
* :class:`SeededSamples` makes every sample's augmentation randomness a pure function of ``(seed, epoch, index)``.
* :func:`make_loader` puts them behind a DataLoader that batches with :func:`~faithful_vit.data.sample.collate`.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from faithful_vit.data.sample import CorruptImageError, collate


class EpochSampler(Sampler[int]):
    """A shuffle that is a pure function of ``(seed, epoch)``, sharded over ranks, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        shuffle: permute each epoch (training) or keep the order (evaluation).
        seed: base seed of the permutation.
        rank, world_size: this process's shard: indices ``rank, rank + world_size, ...`` of the epoch order.
        drop_last: drop the tail so that every rank gets the same number of samples (training); without it the
            shards are uneven and no sample is seen twice (evaluation).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch``'s order, skipping this rank's first ``start`` samples (a mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            order = order[: self.num_samples // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._shard()[self.start :])

    def __len__(self) -> int:
        return max(len(self._shard()) - self.start, 0)


class SeededSamples(Dataset):
    """Wraps a dataset so that each sample's random augmentation depends only on ``(seed, epoch, index)``.

    The global Python, NumPy and torch CPU generators are seeded for the duration of ``dataset[index]`` and then
    restored, so sample loading neither depends on nor disturbs the training RNG, with or without worker processes.
    A sample whose image cannot be decoded (:class:`~faithful_vit.data.sample.CorruptImageError`, the datasets'
    contract, or an ``OSError`` from PIL on a truncated or unidentified file) becomes ``None``:
    :func:`~faithful_vit.data.sample.collate` drops it and counts it. A file that is missing (or a folder) is a
    broken dataset, not a bad image: its error propagates.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**31)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                try:
                    return self.dataset[index]
                except (FileNotFoundError, IsADirectoryError):
                    raise
                except (OSError, CorruptImageError) as error:
                    warnings.warn(f"skipping sample {index}: its image could not be read ({error})", stacklevel=2)
                    return None
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def make_loader(
    dataset: SeededSamples,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    device: torch.device,
) -> DataLoader:
    """A DataLoader of :class:`~faithful_vit.data.sample.Batch` whose iterator creation does not consume the global
    RNG (it has its own generator)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
