"""The embedded synthetic dataset: seeded, disjoint splits, every kind well-formed."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from stamp.data.synthetic import (
    COLOURS,
    KINDS,
    NUMBER_WORDS,
    POSITION_MARGIN,
    POSITIONS,
    SHAPES,
    SyntheticScenes,
)
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
    assert ds.kinds == [k for k in KINDS if k != "caption"]  # captions only when asked for
    by_kind = {k: [] for k in ds.kinds}
    for i in range(len(ds)):
        s = ds[i]
        by_kind[s.kind].append(s)
        assert s.image.size == (224, 224)
        n_seg = s.messages[-1]["content"].count(SEG_TOKEN)
        assert n_seg == len(s.masks)
    assert all(len(v) > 10 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    assert all(m.any() for s in by_kind["refer"] + by_kind["multi"] + by_kind["pair"] for m in s.masks)
    assert all(not s.masks[0].any() for s in by_kind["none"])

    # a no-target answer reads like a referring one: only its empty mask says that nothing matches
    def forms(samples):
        return {re.sub(r"the .+ is", "the _ is", s.messages[-1]["content"]) for s in samples}

    assert forms(by_kind["none"]) == forms(by_kind["refer"])
    assert all(len(s.masks) == 2 for s in by_kind["pair"])
    assert all(not s.masks and s.answer for s in by_kind["vqa"])
    # a multi-target mask is the union of at least two separate shapes: larger than one
    multi_area = np.mean([s.masks[0].sum() for s in by_kind["multi"]])
    refer_area = np.mean([s.masks[0].sum() for s in by_kind["refer"]])
    assert multi_area > 1.5 * refer_area


def test_captions_name_every_shape_left_to_right():
    ds = SyntheticScenes("train", size=30, kind_weights={"caption": 1})
    for i in range(len(ds)):
        s = ds[i]
        shapes = ds.scene(ds.rng(i))  # the scene is the first thing drawn from the sample's stream
        answer = s.messages[1]["content"]
        assert not s.masks and s.answer is None and s.kind == "caption"
        named = re.findall(r"an? (\w+) (\w+)", answer)
        assert named == [(t.colour, t.kind) for t in sorted(shapes, key=lambda t: t.cx)], answer
        assert answer.startswith(f"There are {NUMBER_WORDS[len(shapes)]} shapes: "), answer


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
    with pytest.raises(ValueError, match="shared"):
        SyntheticScenes("train", shared=(0.8, 0.5))


def test_curricula_then_the_mixture():
    """Colour warm-up, then kind warm-up (one colour, distinct kinds, named by kind alone, a
    different shape in each turn)."""
    ds = SyntheticScenes("train", size=300, curriculum=100, kind_curriculum=100, turns=(2, 2))
    colour = [ds[i] for i in range(100)]
    kind = [ds[i] for i in range(100, 200)]
    rest = [ds[i] for i in range(200, 300)]
    by_colour = [s for s in colour if len(s.messages) == 2]
    assert len(by_colour) > 55 and all(
        any(f"the {c} shape" in s.messages[0]["content"] for c in COLOURS) for s in by_colour
    )
    for s in kind:
        assert len(s.messages) == 4 and len(s.masks) == 2
        named = []
        for q, mask in zip(s.messages[::2], s.masks, strict=True):
            q = q["content"]
            named += [k for k in SHAPES if f"the {k}" in q]
            assert not any(c in q for c in COLOURS), q
            pixels = np.asarray(s.image)[mask]
            assert len(np.unique(pixels, axis=0)) == 1  # the target is a single colour ...
        assert len(set(named)) == 2, s.messages  # ... another one in each turn
        colours = {tuple(p) for m in s.masks for p in np.unique(np.asarray(s.image)[m], axis=0)}
        assert len(colours) == 1  # both targets have the same colour
    assert all(len(s.messages) == 4 for s in rest)  # afterwards the full mixture


def test_shared_scenes():
    """``shared`` sets how often a scene repeats the first shape's colour or kind."""

    def repeats(shared):
        ds = SyntheticScenes("train", size=1, shared=shared)
        rng = np.random.default_rng(0)
        scenes = [ds.scene(rng) for _ in range(300)]
        same_colour = np.mean([all(s.colour == sc[0].colour for s in sc) for sc in scenes if len(sc) > 1])
        same_kind = np.mean([all(s.kind == sc[0].kind for s in sc) for sc in scenes if len(sc) > 1])
        return same_colour, same_kind

    c, k = repeats((1.0, 0.0))
    assert c == 1.0 and k < 0.1
    c, k = repeats((0.0, 1.0))
    assert k == 1.0 and c < 0.1
    c, k = repeats((0.45, 0.2))
    assert 0.35 < c < 0.6 and 0.12 < k < 0.3


def test_random_shape_baseline_script():
    """The floor printed by scripts/random_shape_baseline.py: well below a text-reading model."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "random_shape_baseline.py"
    out = subprocess.run(
        [sys.executable, str(script), "data.val.size=80"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^\d+ expressions of 80 validation chats", out, re.M), out
    score = float(re.search(r"random-shape cell cIoU: ([0-9.]+)", out).group(1))
    assert 0.1 < score < 0.4


def test_breakdown_script_names_the_words_of_every_request():
    """scripts/synthetic_breakdown.py sorts every synthetic referring question by what names its
    target, and every VQA question by its type."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "synthetic_breakdown.py"
    spec = importlib.util.spec_from_file_location("synthetic_breakdown", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.wording("Segment the red shape.") == "colour"
    assert script.wording("Can you segment the star in this image?") == "kind"
    assert script.wording("Where is the blue circle?") == "colour + kind"
    assert script.wording("Show me the left red shape.") == "position"
    refer = SyntheticScenes("val", size=300, kind_weights={"refer": 1})
    seen = {script.wording(refer[i].messages[0]["content"]) for i in range(len(refer))}
    assert seen == {"colour", "kind", "colour + kind", "position"}
    vqa = SyntheticScenes("val", size=200, kind_weights={"vqa": 1})
    types = {script.question_type(vqa[i].messages[0]["content"]) for i in range(len(vqa))}
    assert types == {name for _, name in script.VQA_TYPES}
