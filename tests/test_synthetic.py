"""The embedded synthetic dataset: seeded, disjoint splits, every kind well-formed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from stamp.data.synthetic import COLOURS, KINDS, POSITION_MARGIN, POSITIONS, SyntheticScenes
from stamp.model.tokens import SEG_TOKEN


def _digest(sample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def test_deterministic_and_seeded():
    a, b = SyntheticScenes("train", size=20, seed=3), SyntheticScenes("train", size=20, seed=3)
    c = SyntheticScenes("train", size=20, seed=4)
    for i in range(20):
        assert _digest(a[i]) == _digest(b[i]) and a[i].messages == b[i].messages
    assert sum(_digest(a[i]) != _digest(c[i]) for i in range(20)) == 20


def test_splits_are_disjoint():
    seen = {
        split: {_digest(SyntheticScenes(split, size=150)[i]) for i in range(150)}
        for split in ("train", "val", "test")
    }
    assert (
        not (seen["train"] & seen["val"])
        and not (seen["train"] & seen["test"])
        and not (seen["val"] & seen["test"])
    )


def test_kinds_and_masks():
    ds = SyntheticScenes("train", size=400, image_size=224)
    by_kind = {k: [] for k in KINDS}
    for i in range(len(ds)):
        s = ds[i]
        by_kind[s.kind].append(s)
        assert s.image.size == (224, 224)
        n_seg = s.messages[-1]["content"].count(SEG_TOKEN)
        assert n_seg == len(s.masks)
    assert all(len(v) > 10 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    assert all(m.any() for s in by_kind["refer"] + by_kind["multi"] + by_kind["pair"] for m in s.masks)
    assert all(not s.masks[0].any() for s in by_kind["none"])
    assert all(len(s.masks) == 2 for s in by_kind["pair"])
    assert all(not s.masks and s.answer for s in by_kind["vqa"])
    # a multi-target mask is the union of at least two separate shapes: larger than one
    multi_area = np.mean([s.masks[0].sum() for s in by_kind["multi"]])
    refer_area = np.mean([s.masks[0].sum() for s in by_kind["refer"]])
    assert multi_area > 1.5 * refer_area


def test_referring_needs_the_text():
    """Expressions of every type occur, and position words really single out their target."""
    ds = SyntheticScenes("train", size=600)
    questions = [ds[i].messages[0]["content"] for i in range(600) if ds[i].kind == "refer"]
    assert any(any(f"the {w} " in q for w in POSITIONS) for q in questions)
    assert any(any(f"the {c} shape" in q for c in COLOURS) for q in questions)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        shapes = ds.scene(rng)
        for idx in range(len(shapes)):
            expr = ds._position(rng, shapes, idx)
            if expr is None:
                continue
            word, base = expr.split(" ", 1)
            if base == "shape":
                group = shapes
            elif base.endswith(" shape"):
                group = [s for s in shapes if s.colour == base.split()[0]]
            else:
                group = [s for s in shapes if s.kind == base]
            assert shapes[idx] in group and len(group) >= 2
            key = POSITIONS[word]
            others = [key(s) for s in group if s is not shapes[idx]]
            # the named shape is the extreme one of its group, by a clear margin
            assert min(others) - key(shapes[idx]) >= POSITION_MARGIN, (expr, shapes)
            checked += 1
    assert checked > 50


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticScenes("dev")
    with pytest.raises(ValueError, match="smaller than one 28x28 cell"):
        SyntheticScenes("train", image_size=20)
    with pytest.raises(ValueError, match="unknown sample kind"):
        SyntheticScenes("train", kind_weights={"refer": 1, "riddle": 1})
