"""Question/answer templates: several of each, seeded choice, the first one for evaluation."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stamp.data.prompts import ANSWERS, QUESTIONS, segmentation_chat
from stamp.data.refer import ReferSegDataset
from stamp.model.tokens import SEG_TOKEN
from tests.fixtures_data import COCO_DIR, write_playground


def template_index(templates: tuple[str, ...], text: str) -> int:
    """Which template produced ``text`` (the placeholder matches anything)."""
    hits = [
        k
        for k, t in enumerate(templates)
        if re.fullmatch(re.escape(t).replace(re.escape("{text}"), ".+"), text)
    ]
    assert len(hits) == 1, (text, hits)
    return hits[0]


@pytest.mark.parametrize(
    ("family", "kind"), [("refer", "refer"), ("gref", "multi"), ("gref", "none"), ("reason", "reason")]
)
def test_templates_are_used_evenly_and_end_with_seg(family, kind):
    assert len(QUESTIONS[family]) >= 4 and len(ANSWERS[kind]) >= 4
    qs, ans = Counter(), Counter()
    rng = np.random.default_rng(0)
    text = "Which thing keeps you dry in the rain?" if family == "reason" else "the man on the left"
    for _ in range(2000):
        q, a = segmentation_chat(family, kind, text, rng)
        assert a.endswith(SEG_TOKEN) and a.count(SEG_TOKEN) == 1 and SEG_TOKEN not in q
        qs[template_index(QUESTIONS[family], q)] += 1
        ans[template_index(ANSWERS[kind], a)] += 1
    for counts, n in ((qs, len(QUESTIONS[family])), (ans, len(ANSWERS[kind]))):
        assert set(counts) == set(range(n))
        assert all(abs(c / 2000 - 1 / n) < 0.05 for c in counts.values()), counts


def test_fixed_prompts_and_seeded_choice():
    assert segmentation_chat("refer", "refer", "The cat.", None) == (
        "Please segment the cat in this image.",
        f"Sure, it is {SEG_TOKEN}",
    )
    a = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([1, i])) for i in range(50)]
    b = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([1, i])) for i in range(50)]
    c = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([2, i])) for i in range(50)]
    assert a == b and a != c
    with pytest.raises(
        ValueError, match=r"unknown prompt family 'vqa'; valid families: \['gref', 'reason', 'refer'\]"
    ):
        segmentation_chat("vqa", "refer", "x", None)


def test_dataset_uses_the_templates(tmp_path):
    root: Path = tmp_path
    write_playground(root)
    ds = ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR, repeats=50, seed=0)
    used = Counter(template_index(QUESTIONS["refer"], ds[i].messages[0]["content"]) for i in range(len(ds)))
    assert set(used) == set(range(len(QUESTIONS["refer"])))
    fixed = ReferSegDataset(
        root / "refer_seg", "refcoco", "train", root / COCO_DIR, repeats=3, prompts="fixed"
    )
    assert {fixed[i].messages[0]["content"].split(" the ")[0] for i in range(len(fixed))} == {
        "Please segment"
    }
