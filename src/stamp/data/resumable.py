"""A training data loader that resumes mid-epoch at the right sample.

Lightning restores its loop counters from a checkpoint, but re-reads a plain ``DataLoader``
from the start of the epoch (it only warns that the data will repeat). It saves and restores the
position of loaders that implement ``state_dict``/``load_state_dict``, which
``ResumableDataLoader`` does:

* ``ResumableSampler`` makes the order a pure function of ``(seed, epoch)`` (index order, or a
  seeded permutation) split across ranks like ``DistributedSampler``, and can start an epoch
  after its first ``n`` indices without loading them.
* ``ResumableDataLoader`` counts the batches it has handed to the trainer in this epoch;
  its state is ``(epoch, samples consumed on this rank)``.

The loader also reseeds its own generator from ``(seed, epoch)`` each epoch, so the worker seeds
(and the global random state, which a loader without a generator would draw from) do not depend
on where the run was resumed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Indices of epoch ``e`` in index order or permuted by ``seed + e``, rank ``r`` of ``W``
    taking every ``W``-th (``DistributedSampler``'s split, padded to equal length).

    A ``DistributedSampler`` subclass, so Lightning does not wrap it in one of its own (which
    would also shuffle data whose index order is a curriculum).
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self._skip: tuple[int, int] | None = None  # (epoch, indices of this rank to skip)

    def skip(self, epoch: int, n: int) -> None:
        """Start epoch ``epoch`` (when it is next iterated) after this rank's first ``n`` indices."""
        self.set_epoch(epoch)
        self._skip = (int(epoch), int(n))

    def pending_skip(self) -> int:
        """How many indices the next iteration skips (0 unless resuming this epoch)."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, None
        indices = super().__iter__()
        if skip is not None and skip[0] == self.epoch:
            return itertools.islice(indices, skip[1], None)
        return indices


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose position Lightning saves in checkpoints.

    ``len`` stays the epoch's full number of batches: Lightning counts the restored batches
    itself and stops the epoch after the remaining ones.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()  # reseeded per epoch in __iter__
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch_start = 0  # samples of this rank skipped at the start of the current epoch
        self._yielded = 0  # batches handed out since then

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing (no worker, no sampler) starts before the first batch is asked
        # for, by which time Lightning has set the sampler's epoch.
        sampler = self.sampler
        self._epoch_start, self._yielded = sampler.pending_skip(), 0
        self.generator.manual_seed((sampler.seed * 1_000_003 + sampler.epoch) % (1 << 63))
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": int(self.sampler.epoch),
            # the last batch of an epoch may be short
            "consumed": min(
                self._epoch_start + self._yielded * int(self.batch_size), self.sampler.num_samples
            ),
            "num_replicas": int(self.sampler.num_replicas),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        consumed, replicas = int(state_dict["consumed"]), int(state_dict.get("num_replicas", 1))
        if replicas != self.sampler.num_replicas:
            # same number of samples in total; which rank reads which differs from the first run
            log.warning(
                "resuming on %d processes a run saved on %d: the data order of the rest of "
                "the epoch differs from an uninterrupted run",
                self.sampler.num_replicas,
                replicas,
            )
            consumed = consumed * replicas // self.sampler.num_replicas
        self.sampler.skip(int(state_dict["epoch"]), consumed)
        log.info("data: resuming epoch %d after %d samples per process", state_dict["epoch"], consumed)
