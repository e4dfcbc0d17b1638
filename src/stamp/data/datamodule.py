"""The LightningDataModule: datasets in, collated batches out."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from stamp.data.collate import StampCollator
from stamp.data.mixing import SkipBadSamples
from stamp.data.records import report_unreadable
from stamp.data.resumable import ResumableDataLoader, ResumableSampler
from stamp.training.distributed import UnpaddedDistributedSampler

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
        seed: seeds the training shuffle (None = torch's initial seed, as the entry point set
            it); epoch ``e`` is permuted by ``seed + e``.
        skip_bad: in training, replace samples whose image or mask is missing or corrupt and
            count them (``batch["skipped"]``); validation and test always fail on them.
        prompts: the question/answer template set of the real-data sources (a name in
            ``conf/prompts/`` or a YAML path); the sources read it from the config
            (``${data.prompts}``), the DataModule only names it in its log.
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
        prompts: str | None = None,
    ) -> None:
        super().__init__()
        self.eval_splits, self.splits = list(eval_splits or []), dict(splits or {})
        self.train_set, self.val_set, self.test_set = train, val, test
        self.processor = processor
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.shuffle, self.seed, self.skip_bad, self.prompts = shuffle, seed, skip_bad, prompts

    def setup(self, stage: str | None = None) -> None:
        # Datasets that read their files lazily do it here, in the main process, once - not
        # in every data-loader worker.
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(
            stage, ("train", "val", "test")
        )
        if self.prompts is not None:
            log.info("data prompts: %s", self.prompts)
        for name in wanted:
            ds = getattr(self, f"{name}_set")
            if ds is not None:
                log.info("data %s: %d samples (%s)", name, len(ds), type(ds).__name__)
                report_unreadable(ds, name)

    def _loader(
        self, dataset, batch_size, collate, generator=None, sampler=None, cls=DataLoader
    ) -> DataLoader:
        """A loader over ``dataset`` in the order of ``sampler`` (the index order without one)."""
        if self.processor is None:
            raise RuntimeError(
                "StampDataModule.processor is not set; the entry point passes the model's processor"
            )
        return cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_set is None:
            raise ValueError("no training dataset configured (data.train)")
        dataset = SkipBadSamples(self.train_set) if self.skip_bad else self.train_set
        # The order is a function of (seed, epoch) and the loader's position is saved in
        # checkpoints, so a resumed run reads exactly the samples an uninterrupted one would.
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(self.seed) if self.seed is not None else torch.initial_seed()
        sampler = ResumableSampler(dataset, shuffle=self.shuffle, seed=seed, num_replicas=world, rank=rank)
        collate = StampCollator(self.processor, "train")
        return self._loader(dataset, self.batch_size, collate, sampler=sampler, cls=ResumableDataLoader)

    def _eval_loader(self, dataset) -> DataLoader:
        # Under several processes, each sample goes to exactly one rank (Lightning's default
        # sampler would pad with repeats, and the summed metrics would count them twice).
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        # its own generator: iterating must not draw from the global one that training uses
        collate = StampCollator(self.processor, "generate")
        return self._loader(
            dataset, self.eval_batch_size, collate, generator=torch.Generator(), sampler=sampler
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []  # no validation (e.g. dialogue-only data)
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("no test dataset configured (data.test)")
        return self._eval_loader(self.test_set)
