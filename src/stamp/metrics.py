"""Referring-segmentation metrics (gIoU, cIoU, N-acc, T-acc, Pr@X) as a torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # tenths: compared exactly as integers
IOU_SCALE = 2**40  # an IoU is summed as round(IoU * IOU_SCALE): integer sums are exact in any order


def _as_bool(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).bool()


class SegmentationMetrics(Metric):
    """Scores predicted masks against ground truth, one expression per mask pair.

    Rules (docs/METHOD.md section 7):

    * IoU of an expression = |P & G| / |P | G| over the pixels that are not ignored.
    * gIoU = mean IoU over expressions; cIoU = sum of intersections / sum of unions.
    * No-target expression (G empty) predicted empty: IoU 1; counts as correct for N-acc;
      adds nothing to cIoU (its intersection and union are both 0).
    * No-target expression predicted non-empty: IoU 0; its union (= |P|) enters cIoU.
    * Targeted expression (G non-empty) predicted empty: IoU 0 (its union |G| enters cIoU);
      counts as a miss for T-acc.
    * N-acc = no-target expressions predicted empty / no-target expressions.
      T-acc = targeted expressions predicted non-empty / targeted expressions.
    * Pr@X = fraction of targeted expressions with IoU > X.
    * ``ignore`` pixels (e.g. value 255 regions) are removed from P and G before all of this.

    Rates over an empty set (e.g. N-acc without no-target expressions) are NaN.

    Every state is a count, so the sums are exact and do not depend on their order: the same
    expressions split over any number of processes give bit-identical scores. The per-expression
    IoUs of gIoU are summed in fixed point (``IOU_SCALE``, i.e. to 1e-12 each).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name in (
            "inter",
            "union",
            "count",
            "no_target",
            "no_target_ok",
            "target",
            "target_hit",
        ):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "pr", default=torch.zeros(len(PR_THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(
        self,
        preds: Sequence | torch.Tensor,
        targets: Sequence | torch.Tensor,
        ignore: Sequence | torch.Tensor | None = None,
    ) -> None:
        """``preds`` and ``targets``: sequences (or (N, H, W) batches) of HxW boolean masks;
        ``ignore``: optional matching masks of pixels to leave out (None entries allowed)."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predicted masks but {len(targets)} ground-truth masks")
        ignores = [None] * len(preds) if ignore is None else list(ignore)
        for p, g, ig in zip(preds, targets, ignores, strict=True):
            p, g = _as_bool(p).to(self.device), _as_bool(g).to(self.device)
            if p.shape != g.shape:
                raise ValueError(
                    f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape"
                )
            if ig is not None:
                keep = ~_as_bool(ig).to(self.device)
                p, g = p & keep, g & keep
            inter, union = int((p & g).sum()), int((p | g).sum())
            empty_gt, empty_pred = not bool(g.any()), not bool(p.any())
            # IoU = 1 when both are empty; fixed point with exact integer rounding
            iou_fx = IOU_SCALE if union == 0 else (inter * IOU_SCALE + union // 2) // union
            self.iou_sum += iou_fx
            self.inter += inter
            self.union += union
            self.count += 1
            if empty_gt:
                self.no_target += 1
                self.no_target_ok += float(empty_pred)
            else:
                self.target += 1
                self.target_hit += float(not empty_pred)
                # IoU > x, compared exactly: inter / union > tenths / 10
                above = [float(10 * inter > round(10 * x) * union) for x in PR_THRESHOLDS]
                self.pr += torch.tensor(above, dtype=torch.float64, device=self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)

        def rate(a, b):
            return a / b if b > 0 else nan

        out = {
            "giou": rate(self.iou_sum.double() / IOU_SCALE, self.count),
            "ciou": rate(self.inter, self.union)
            if self.union > 0
            else (nan if self.count == 0 else torch.ones((), dtype=torch.float64, device=self.device)),
            "n_acc": rate(self.no_target_ok, self.no_target),
            "t_acc": rate(self.target_hit, self.target),
        }
        for x, v in zip(PR_THRESHOLDS, self.pr, strict=True):
            out[f"pr@{x}"] = rate(v, self.target)
        out["count"] = self.count
        return out
