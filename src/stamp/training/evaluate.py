"""Evaluation on Lightning's test loop: a LightningModule around a loaded STAMP model, and the
callback that writes what it predicted.

``stamp-eval`` runs ``Trainer.test`` once per split with the same trainer configs as training
(``trainer=ddp trainer.devices=8`` on GPUs, ``trainer=ddp_cpu`` on a CPU). Each sample goes to
exactly one process (``UnpaddedDistributedSampler``) and the scores are torchmetrics states summed
over the processes (``SegmentationScoring``), so every figure is the same as in one process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from stamp.data.masks import encode_rle
from stamp.evaluation import normalise_answer, predicted_cells, upsample
from stamp.inference.generate import generate_with_masks, generation_config
from stamp.metrics import SegmentationMetrics
from stamp.utils.overlay import mask_image


class StampEvalModule(L.LightningModule):
    """Generation (answers, then one mask per ``<|seg|>``) for ``Trainer.test`` on a loaded model.

    Args:
        net: a ``StampModel`` (e.g. from ``load_stamp``).
        processor: its processor.
        generation: ``generation.*`` settings (``conf/generation/``); None = the defaults.
    """

    def __init__(self, net, processor, generation: Mapping | None = None) -> None:
        super().__init__()
        self.net, self.processor = net, processor
        self.generation = generation_config(generation, processor.tokenizer)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"rows": generate_with_masks(self.net, batch, self.processor.tokenizer, self.generation)}


def iou(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None) -> float:
    """IoU of two boolean masks over the pixels not ignored (1 when both are empty)."""
    if ignore is not None:
        pred, truth = pred & ~ignore, truth & ~ignore
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


class EvalWriter(L.Callback):
    """Per test sample: the final masks (SAM-refined when a refiner is given), scored for
    ``giou_sam``/``ciou_sam``; the prediction as a JSON line; optionally the masks as PNGs.

    Each process writes ``<parts_dir>/<split>.rank<r>.jsonl`` with the dataset index of every
    sample it scored (rank ``r`` of ``W`` reads indices ``r, r + W, ...``); at the end of the
    split rank 0 merges them in dataset order into ``<parts_dir>/<split>.jsonl``.

    Args:
        parts_dir: where the prediction files go.
        refiner: a ``SamRefiner`` or None.
        masks_dir: write ``<masks_dir>/<split>/<sample id>_<k>.png``; None = no PNGs.
    """

    def __init__(self, parts_dir: str | Path, refiner=None, masks_dir: str | Path | None = None) -> None:
        self.parts_dir, self.refiner = Path(parts_dir), refiner
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.split = "test"
        self.sam = SegmentationMetrics()
        self.sam_results: dict[str, float] = {}
        self._file = None
        self._seen = 0

    def part_path(self, rank: int) -> Path:
        return self.parts_dir / f"{self.split}.rank{rank}.jsonl"

    @property
    def merged_path(self) -> Path:
        return self.parts_dir / f"{self.split}.jsonl"

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part_path(trainer.global_rank), "w", encoding="utf-8")  # noqa: SIM115
        self._seen = 0
        self.sam = self.sam.to(pl_module.device)
        self.sam.reset()
        self.sam_results = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        world, rank = trainer.world_size, trainer.global_rank
        for s, row, grid in zip(batch["samples"], outputs["rows"], batch["grid_hw"], strict=True):
            index = rank + world * self._seen
            self._seen += 1
            record: dict[str, Any] = {
                "index": index,
                "id": s.id,
                "question": s.prompt[-1]["content"],
                "answer": row.text,
            }
            if s.masks:
                coarse = [
                    upsample(predicted_cells(row, k, grid), m.shape).numpy() for k, m in enumerate(s.masks)
                ]
                final = self.refiner.refine(s.image, coarse) if self.refiner is not None else coarse
                if self.refiner is not None:
                    self.sam.update(final, s.masks, None if s.ignore is None else [s.ignore] * len(final))
                record["masks"] = [
                    {"iou": iou(p, t, s.ignore), "rle": encode_rle(p)}
                    for p, t in zip(final, s.masks, strict=True)
                ]
                if self.masks_dir is not None:
                    out = self.masks_dir / self.split
                    out.mkdir(parents=True, exist_ok=True)
                    for k, m in enumerate(final):
                        mask_image([m], m.shape).save(out / f"{s.id}_{k}.png")
            elif s.answer is not None:
                record.update(
                    truth=s.answer, correct=normalise_answer(row.text) == normalise_answer(s.answer)
                )
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._file.close()
        if self.refiner is not None:  # a collective: every process computes
            r = self.sam.compute()
            if r["count"] > 0:
                self.sam_results = {"giou_sam": float(r["giou"]), "ciou_sam": float(r["ciou"])}
        trainer.strategy.barrier()  # every part is complete
        if trainer.is_global_zero:
            parts = [self.part_path(r) for r in range(trainer.world_size)]
            merge_predictions(parts, self.merged_path)
        trainer.strategy.barrier()


def merge_predictions(parts: list[Path], out: Path) -> Path:
    """Merge per-process prediction files into ``out`` in dataset order (atomically); remove the parts."""
    records = []
    for p in parts:
        with open(p, encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    records.sort(key=lambda r: r["index"])
    tmp = out.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    for p in parts:
        p.unlink()
    return out


def read_predictions(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
