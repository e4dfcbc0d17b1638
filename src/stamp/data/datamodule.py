"""The LightningDataModule: datasets in, collated batches out."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from stamp.data.collate import StampCollator
from stamp.data.mixing import SkipBadSamples

log = logging.getLogger(__name__)


class StampDataModule(L.LightningDataModule):
    """Serves training batches (whole chats) and evaluation batches (prompts to answer).

    Args:
        train, val, test: map-style datasets of ``Sample``s (``test`` optional).
        processor: the model's Qwen2-VL processor (set by the entry point before use).
        batch_size: training batch size per process.
        eval_batch_size: batch size for generation during validation/test.
        num_workers: data-loading worker processes.
        shuffle: shuffle the training set (off for generated data whose order is a curriculum).
        eval_splits, splits: named evaluation splits (``stamp-eval`` reads these from the config).
        seed: seeds the training shuffle (None = torch's global generator, as seeded by the
            entry point).
        skip_bad: in training, replace samples whose image or mask is missing or corrupt and
            count them (``batch["skipped"]``); validation and test always fail on them.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        processor: Any = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        eval_splits: list[str] | None = None,
        splits: dict[str, Dataset] | None = None,
        seed: int | None = None,
        skip_bad: bool = True,
    ) -> None:
        super().__init__()
        self.eval_splits, self.splits = list(eval_splits or []), dict(splits or {})
        self.train_set, self.val_set, self.test_set = train, val, test
        self.processor = processor
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.shuffle, self.seed, self.skip_bad = shuffle, seed, skip_bad

    def setup(self, stage: str | None = None) -> None:
        # Datasets that read their files lazily do it here, in the main process, once - not
        # in every data-loader worker.
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for name in wanted:
            ds = getattr(self, f"{name}_set")
            if ds is not None:
                log.info("data %s: %d samples (%s)", name, len(ds), type(ds).__name__)

    def _loader(self, dataset, batch_size, shuffle, collate, generator=None) -> DataLoader:
        if self.processor is None:
            raise RuntimeError("StampDataModule.processor is not set; the entry point passes the model's processor")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("no training dataset configured (data.train)")
        dataset = SkipBadSamples(self.train_set) if self.skip_bad else self.train_set
        generator = torch.Generator().manual_seed(int(self.seed)) if self.shuffle and self.seed is not None else None
        return self._loader(dataset, self.batch_size, self.shuffle, StampCollator(self.processor, "train"), generator)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []  # no validation (e.g. dialogue-only data)
        return self._loader(self.val_set, self.eval_batch_size, False, StampCollator(self.processor, "generate"))

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("no test dataset configured (data.test)")
        return self._loader(self.test_set, self.eval_batch_size, False, StampCollator(self.processor, "generate"))
