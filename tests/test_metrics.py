"""SegmentationMetrics against hand-computed values, one rule at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stamp.metrics import SegmentationMetrics


def m(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


P1 = m(["##..", "##..", "....", "...."])  # 4 pixels
G1 = m(["#...", "#...", "#...", "...."])  # 3 pixels; overlap 2, union 5
EMPTY = m(["....", "....", "....", "...."])


def test_targeted_expression():
    metric = SegmentationMetrics()
    metric.update([P1], [G1])
    out = metric.compute()
    assert out["giou"] == pytest.approx(2 / 5) and out["ciou"] == pytest.approx(2 / 5)
    assert out["t_acc"] == 1.0 and math.isnan(out["n_acc"])
    assert out["pr@0.5"] == 0.0


def test_both_empty_scores_one_and_adds_nothing_to_ciou():
    metric = SegmentationMetrics()
    metric.update([P1, EMPTY], [G1, EMPTY])
    out = metric.compute()
    assert out["giou"] == pytest.approx((2 / 5 + 1) / 2)
    assert out["ciou"] == pytest.approx(2 / 5)  # unchanged by the empty pair
    assert out["n_acc"] == 1.0


def test_no_target_predicted_non_empty():
    metric = SegmentationMetrics()
    metric.update([P1, P1], [G1, EMPTY])
    out = metric.compute()
    assert out["giou"] == pytest.approx((2 / 5 + 0) / 2)
    assert out["ciou"] == pytest.approx(2 / (5 + 4))  # the false mask's union (4) enters
    assert out["n_acc"] == 0.0 and out["t_acc"] == 1.0


def test_targeted_predicted_empty():
    metric = SegmentationMetrics()
    metric.update([EMPTY, P1], [G1, G1])
    out = metric.compute()
    assert out["giou"] == pytest.approx(0.2)
    assert out["ciou"] == pytest.approx(2 / (3 + 5))
    assert out["t_acc"] == 0.5


def test_pr_thresholds_and_batched_input():
    metric = SegmentationMetrics()
    exact = torch.from_numpy(G1)
    metric.update(torch.stack([exact, torch.from_numpy(P1)]), torch.stack([exact, exact]))
    out = metric.compute()
    assert out["pr@0.5"] == 0.5 and out["pr@0.9"] == 0.5  # IoU 1.0 counts, 0.4 doesn't
    assert out["count"] == 2


def test_ignore_region_is_left_out():
    ignore = m(["....", "....", "#...", "...."])  # the truth's third pixel
    metric = SegmentationMetrics()
    metric.update([P1], [G1], ignore=[ignore])
    assert metric.compute()["giou"] == pytest.approx(2 / 4)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationMetrics().update([P1], [np.zeros((3, 4), bool)])


def test_scores_do_not_depend_on_how_expressions_are_split_across_processes():
    """DDP sums each process's states: any split of the expressions gives bit-identical scores."""
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(300):
        g = rng.random((13, 17)) > 0.6 if k % 10 else np.zeros((13, 17), dtype=bool)  # some no-target
        noise = rng.random((13, 17)) < (rng.random() * 0.5 if k % 20 else 0.0)  # some exact
        pairs.append((g ^ noise, g))
    whole = SegmentationMetrics()
    for p, g in pairs:
        whole.update([p], [g])
    for world in (2, 3, 7):
        parts = [SegmentationMetrics() for _ in range(world)]
        for i, (p, g) in enumerate(pairs):
            parts[i % world].update([p], [g])
        for other in parts[1:]:
            parts[0].merge_state(other)  # what the sum over processes does
        a, b = whole.compute(), parts[0].compute()
        assert 0 < float(a["n_acc"]) < 1 and 0 < float(a["pr@0.5"]) < 1
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}, world
