"""Mixing datasets, and skipping broken samples during training.

``MixedDataset`` concatenates named datasets (each in proportion to its length, so a source's
``repeats`` sets its share), or, given ``weights``, draws every sample's source by weight. Both
are pure functions of ``(seed, index)``: the same config gives the same data in any process.

``SkipBadSamples`` is the training-time guard: a sample whose image or mask is missing or
corrupt is replaced by the next good one and counted on the sample that stands in for it
(``Sample.skipped``), which the collator sums into ``batch["skipped"]`` - a count that survives
data-loader worker processes. Evaluation never wraps its datasets: there a ``DataError`` stops
the run, naming the file.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
from torch.utils.data import Dataset

from stamp.data.io import DataError
from stamp.data.sample import Sample

log = logging.getLogger(__name__)


class MixedDataset(Dataset):
    """Named datasets served as one.

    Args:
        datasets: name -> dataset (e.g. instantiated ``RecordDataset``s with their own ``repeats``).
        weights: None = concatenate; else name -> sampling weight (normalised), and sample i
            comes from a source drawn with probability proportional to its weight and a
            uniformly drawn item of it, both from ``default_rng([seed, i])``.
        size: number of samples when ``weights`` are given (default: the sum of the lengths).
        seed: seeds the weighted draws.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        weights: Mapping[str, float] | None = None,
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.datasets = dict(datasets.items())
        if not self.datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        self.names = list(self.datasets)
        self.seed, self.size = int(seed), size
        self.p = None
        if weights is not None:
            weights = dict(weights.items())
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise ValueError(f"weights name unknown dataset(s) {unknown}; valid names: {self.names}")
            w = np.array([float(weights.get(n, 0.0)) for n in self.names])
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be non-negative and not all zero, got {weights}")
            self.p = w / w.sum()
        self._ends: list[int] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(d) for d in self.datasets.values()]

    def __len__(self) -> int:
        if self.p is not None and self.size is not None:
            return int(self.size)
        return sum(self.lengths)

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, index in that source) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mix of {len(self)} samples")
        if self.p is None:
            if self._ends is None:
                self._ends = np.cumsum(self.lengths).tolist()
            k = bisect.bisect_right(self._ends, index)
            return self.names[k], index - (self._ends[k - 1] if k else 0)
        rng = np.random.default_rng([self.seed, index])
        k = int(rng.choice(len(self.names), p=self.p))
        n = len(self.datasets[self.names[k]])
        if n == 0:
            raise DataError(f"mixed dataset {self.names[k]!r} has weight {self.p[k]:.3f} but no samples")
        return self.names[k], int(rng.integers(n))

    def __getitem__(self, index: int) -> Sample:
        name, i = self.locate(index)
        return self.datasets[name][i]


class SkipBadSamples(Dataset):
    """Serve ``dataset`` but replace samples that raise ``DataError`` (training only).

    A failed sample i is replaced by the first good one among i+1, i+2, ... (wrapping); the
    replacement carries the failure in ``Sample.skipped``. ``max_tries`` consecutive failures
    mean a wrong path rather than a few bad files, and raise.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 32) -> None:
        self.dataset, self.max_tries = dataset, int(max_tries)
        self.skipped = 0  # failures seen in this process (workers keep their own)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        n, errors = len(self.dataset), []
        for k in range(min(self.max_tries, n)):
            try:
                sample = self.dataset[(index + k) % n]
            except DataError as e:
                errors.append(str(e))
                continue
            if errors:
                # only the requested sample counts as skipped; later failures count when requested
                self.skipped += 1
                log.warning("data/skipped: sample %d: %s", index, errors[0])
                sample = dataclasses.replace(sample, skipped=(errors[0],))
            return sample
        raise DataError(
            f"{len(errors)} consecutive samples from index {index} could not be loaded; "
            f"check the data paths. Last error: {errors[-1]}"
        )
