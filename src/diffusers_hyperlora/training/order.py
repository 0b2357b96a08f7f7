"""Data order and per-sample randomness, as functions of `(seed, epoch, dataset index)` only.

Nothing random in training depends on how the batches are laid out over processes, or on where a run was
resumed: the shuffle of epoch `e` is a permutation seeded by `(seed, e)`, and each sample's draws (caption
dropout, the VAE latent sample, the noise, the timestep, extra references) come from a generator seeded by
`(seed, e, index)`. So 2 processes x batch 1 see exactly the samples and noise of 1 process x batch 2, and a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _seed_of(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1  # a Python int: numpy 1.x refuses uint64 >> int


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of one sample in one epoch.

    Example:
        >>> a, b = sample_generator(0, 1, 7), sample_generator(0, 1, 7)
        >>> torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
        True
    """
    return torch.Generator().manual_seed(_seed_of(seed, epoch, index))


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles the dataset indices with a permutation seeded by `(seed, epoch)`; `set_epoch` picks the epoch.

    Example:
        >>> sampler = EpochSampler(5, seed=0)
        >>> first = list(sampler)
        >>> sampler.set_epoch(1)
        >>> sorted(first) == sorted(sampler) == [0, 1, 2, 3, 4], first == list(EpochSampler(5, seed=0))
        (True, True)
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


class TrainingView(torch.utils.data.Dataset):
    """The dataset as the training loop reads it: items carry their `index`; extra references are seeded.

    Args:
        dataset: a `HyperLoRATrainingDataset` or any dataset of item dicts (see `training.data`).
        num_references: reference images per sample (`HyperLoRATrainingDataset` only).
        seed: seeds the reference draws with the epoch and index.
        with_pixels: `False` leaves the images unread (training on cached latents).
    """

    def __init__(self, dataset: Any, num_references: int, seed: int, with_pixels: bool = True) -> None:
        self.dataset, self.num_references, self.seed = dataset, num_references, seed
        self.with_pixels, self.epoch = with_pixels, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_of = getattr(self.dataset, "item", None)
        if item_of is None:
            item = dict(self.dataset[index])
            if not self.with_pixels:
                for key in ("pixel_values", "original_size", "crop_top_left"):
                    item.pop(key, None)
        else:
            rng = random.Random(_seed_of(self.seed, self.epoch, index, 1))
            item = item_of(index, self.num_references, rng=rng, with_pixels=self.with_pixels)
        item["index"] = index
        return item


__all__ = ["EpochSampler", "TrainingView", "sample_generator"]
