"""Scoring generated answers and masks against samples: the numbers validation and eval report."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from stamp.data.collate import cell_mask
from stamp.data.sample import Sample
from stamp.inference.generate import RowOutput, strip_seg
from stamp.metrics import SegmentationMetrics


def upsample(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a (h, w) cell mask to (H, W) pixels."""
    return F.interpolate(cells[None, None].float(), size=size, mode="nearest")[0, 0].bool()


def normalise_answer(text: str) -> str:
    return strip_seg(text).strip().strip(".!").lower()


def predicted_cells(row: RowOutput, k: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The k-th predicted cell mask of a row; empty if the answer has fewer ``<|seg|>``."""
    if k < len(row.cell_logits):
        return row.cell_logits[k].cpu() > 0
    return torch.zeros(grid_hw, dtype=torch.bool)


class StampScorer(nn.Module):
    """Pixel-level (the paper's protocol), cell-level and oracle segmentation metrics + VQA accuracy.

    * pixel: predicted cells upsampled (nearest) to the image vs the full-resolution truth.
    * cell: predicted cells vs the truth quantised to the cell grid.
    * oracle: the quantised truth itself, upsampled, vs the full-resolution truth (the
      ceiling without refinement).
    The k-th ground-truth mask of a sample is scored against the k-th generated ``<|seg|>``;
    a missing one counts as an empty prediction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pixel = SegmentationMetrics()
        self.cell = SegmentationMetrics()
        self.oracle = SegmentationMetrics()
        self.vqa_correct, self.vqa_total = SumMetric(), SumMetric()

    def update(self, samples: list[Sample], rows: list[RowOutput], grids: list) -> None:
        for s, row, grid in zip(samples, rows, grids, strict=True):
            if s.masks:
                self.update_masks(s, [predicted_cells(row, k, grid) for k in range(len(s.masks))], grid)
            elif s.answer is not None:
                self.vqa_correct.update(float(normalise_answer(row.text) == normalise_answer(s.answer)))
                self.vqa_total.update(1.0)

    def update_masks(self, s: Sample, pred_cells: list[torch.Tensor], grid) -> None:
        h, w = s.masks[0].shape
        truth = [torch.from_numpy(np.asarray(m)) for m in s.masks]
        truth_cells = [cell_mask(m, grid).bool() for m in s.masks]
        ignore = None if s.ignore is None else [s.ignore] * len(truth)
        self.pixel.update([upsample(p, (h, w)) for p in pred_cells], truth, ignore)
        self.cell.update(pred_cells, truth_cells)
        self.oracle.update([upsample(c, (h, w)) for c in truth_cells], truth, ignore)

    def compute(self) -> dict[str, float]:
        """Every metric (synced across processes); keys absent where nothing was scored."""
        out: dict[str, float] = {}
        pixel, cell, oracle = self.pixel.compute(), self.cell.compute(), self.oracle.compute()
        if pixel["count"] > 0:
            out.update({k: float(v) for k, v in pixel.items() if k != "count"})
            out.update(giou_cell=float(cell["giou"]), ciou_cell=float(cell["ciou"]))
            out.update(giou_oracle=float(oracle["giou"]), ciou_oracle=float(oracle["ciou"]))
            out["expressions"] = float(pixel["count"])
        total = float(self.vqa_total.compute())
        if total > 0:
            out["vqa_acc"] = float(self.vqa_correct.compute()) / total
            out["vqa_questions"] = total
        return out

    def reset(self) -> None:
        for m in (self.pixel, self.cell, self.oracle, self.vqa_correct, self.vqa_total):
            m.reset()
