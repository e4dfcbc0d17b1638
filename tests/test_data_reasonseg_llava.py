"""ReasonSeg (polygons, ignore regions, flag shapes) and the LLaVA mix (image roots, text-only chats)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stamp.data.io import DataError
from stamp.data.llava import LlavaDataset
from stamp.data.reasonseg import ReasonSegDataset
from stamp.metrics import SegmentationMetrics
from stamp.model.tokens import SEG_TOKEN
from tests.fixtures_data import write_playground


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("playground")
    return root, write_playground(root)


def test_reasonseg_masks_ignore_and_flag(playground):
    root, masks = playground
    ds = ReasonSegDataset(root / "reason_seg/ReasonSeg", "val", prompt_choice="fixed")
    assert len(ds) == 3  # img_a has two queries, img_b one
    a0, a1, b = ds[0], ds[1], ds[2]
    # flag shape skipped (else everything would be target), float points truncated, boundary
    # pixels included, the smaller ignore square painted over the larger target
    np.testing.assert_array_equal(a0.masks[0], masks["reason_a"])
    np.testing.assert_array_equal(a0.ignore, masks["reason_a_ignore"])
    np.testing.assert_array_equal(a1.masks[0], masks["reason_a"])
    np.testing.assert_array_equal(b.masks[0], masks["reason_b"])
    assert b.ignore is None
    assert (a0.kind, b.kind) == ("reason", "refer")
    assert a0.messages[0]["content"] == (
        "What could you sit on in this room? Explain why. Please output the segmentation mask."
    )
    assert a0.messages[1]["content"] == f"Sure, {SEG_TOKEN}"
    assert b.messages[0]["content"] == "Please segment the red cup in this image."


def test_reasonseg_ignore_region_is_left_out_of_the_metrics(playground):
    root, masks = playground
    s = ReasonSegDataset(root / "reason_seg/ReasonSeg", "val")[0]
    pred = s.masks[0] | s.ignore  # predicting the ignored pixels as well costs nothing
    m = SegmentationMetrics()
    m.update([pred], s.masks, [s.ignore])
    assert float(m.compute()["giou"]) == 1.0


def test_reasonseg_eval_uses_first_query_and_splits(playground):
    root, _ = playground
    rs = root / "reason_seg/ReasonSeg"
    assert len(ReasonSegDataset(rs, "val", texts="first")) == 2
    assert len(ReasonSegDataset(rs, "train")) == 2 and len(ReasonSegDataset(rs, "test")) == 1
    with pytest.raises(
        ValueError, match=r"unknown ReasonSeg split 'dev'; valid splits: \['train', 'val', 'test'\]"
    ):
        ReasonSegDataset(rs, "dev")


def test_reasonseg_broken_annotation_is_named(playground, tmp_path):
    root, _ = playground
    split = tmp_path / "val"
    split.mkdir()
    src = root / "reason_seg/ReasonSeg/val"
    for name in ("img_a.jpg", "img_b.jpg"):
        (split / name).write_bytes((src / name).read_bytes())
    (split / "img_a.json").write_text("{not json")
    ann = json.loads((src / "img_b.json").read_text())
    ann["shapes"][0]["points"] = [[3], [4]]
    (split / "img_b.json").write_text(json.dumps(ann))
    ds = ReasonSegDataset(tmp_path, "val")
    with pytest.raises(DataError, match=r"cannot parse JSON file .*val/img_a\.json \(utf-8: .*; cp1252: "):
        ds[0]
    with pytest.raises(DataError, match=r"img_b\.json: shape 'target' needs points as \[\[x, y\], \.\.\.\]"):
        ds[1]


def lisa_reference_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """LISA's get_mask_from_json, written out with OpenCV: areas of the outlined and filled shapes,
    painted in the reversed argsort order of the areas, 1 = target, 255 = ignore."""
    import cv2

    kept = [s for s in ann["shapes"] if s["label"].lower() != "flag"]
    areas = []
    for s in kept:
        alone = np.zeros((h, w), dtype=np.uint8)
        pts = np.array([s["points"]], dtype=np.int32)
        cv2.polylines(alone, pts, True, 1, 1)
        cv2.fillPoly(alone, pts, 1)
        areas.append(alone.sum())
    out = np.zeros((h, w), dtype=np.uint8)
    for k in list(np.argsort(areas)[::-1].astype(np.int32)):
        value = 255 if "ignore" in kept[k]["label"].lower() else 1
        pts = np.array([kept[k]["points"]], dtype=np.int32)
        cv2.polylines(out, pts, True, value, 1)
        cv2.fillPoly(out, pts, value)
    return out


def test_reasonseg_masks_equal_the_reference_opencv_painting(tmp_path):
    """Sloped polygons (where PIL and OpenCV differ by a row of pixels) and nested shapes listed
    smallest first: a target inside an ignore region inside a target, as OpenCV paints them."""
    h, w = 90, 120
    shapes = [  # smallest first: painting in file order would let the big ones cover the small
        {"label": "target", "points": [[52.6, 40.2], [60.9, 37.1], [63.3, 47.8], [54.0, 49.5]]},
        {"label": "ignore", "points": [[40.0, 28.4], [78.7, 31.9], [74.2, 60.6], [43.5, 58.1]]},
        {"label": "target", "points": [[10.3, 5.8], [110.9, 14.2], [97.1, 83.6], [4.4, 71.7]]},
        {"label": "Flag", "points": [[0, 0], [119, 0], [119, 89], [0, 89]]},
        {"label": "target", "points": [[100.2, 60.7], [117.8, 88.1], [85.5, 86.9]]},
    ]
    split = tmp_path / "val"
    split.mkdir()
    from tests.fixtures_data import write_image

    write_image(split / "slopes.jpg", h, w)
    (split / "slopes.json").write_text(
        json.dumps({"text": ["what is sloped?"], "is_sentence": True, "shapes": shapes})
    )
    truth = lisa_reference_mask({"shapes": shapes}, h, w)
    assert set(np.unique(truth)) == {0, 1, 255}
    s = ReasonSegDataset(tmp_path, "val")[0]
    np.testing.assert_array_equal(s.masks[0], truth == 1)
    np.testing.assert_array_equal(s.ignore, truth == 255)
    assert s.masks[0][45, 58] and s.ignore[35, 50]  # the innermost target survives, inside the ignore ring


def test_reasonseg_json_saved_in_cp1252_is_read_as_the_reference_reads_it(playground, tmp_path):
    root, masks = playground
    split = tmp_path / "val"
    split.mkdir()
    src = root / "reason_seg/ReasonSeg/val"
    (split / "img_b.jpg").write_bytes((src / "img_b.jpg").read_bytes())
    ann = json.loads((src / "img_b.json").read_text())
    ann["text"] = ["the dog\u2019s red cup"]  # a curly apostrophe: byte 0x92 in cp1252
    raw = json.dumps(ann, ensure_ascii=False).encode("cp1252")
    assert b"\x92" in raw
    (split / "img_b.json").write_bytes(raw)
    s = ReasonSegDataset(tmp_path, "val", prompt_choice="fixed")[0]
    assert "dog\u2019s red cup" in s.messages[0]["content"]
    np.testing.assert_array_equal(s.masks[0], masks["reason_b"])


def test_llava_conversations_images_and_text_only(playground):
    root, _ = playground
    ds = LlavaDataset(root / "llava_v1_5_mix665k.json", root)
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == 6
    assert [s.kind for s in samples] == ["vqa"] * 5 + ["text"]
    assert [s.image.size if s.image else None for s in samples] == [
        (80, 64),
        (60, 60),
        (56, 80),
        (64, 64),
        (72, 56),
        None,
    ]
    first = samples[0].messages
    assert first == [
        {"role": "user", "content": "What is shown in the picture?"},
        {"role": "assistant", "content": "Some noise."},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "Many colours."},
    ]
    assert samples[1].messages[0]["content"] == "Is there a cup?"
    for s in samples:
        assert not s.masks and s.answer is None
        assert all("<image>" not in m["content"] for m in s.messages)


def test_llava_image_roots_and_bad_entries(playground, tmp_path):
    root, _ = playground
    moved = tmp_path / "gqa_elsewhere"
    (moved / "images").mkdir(parents=True)
    (moved / "images/n100.jpg").write_bytes((root / "gqa/images/n100.jpg").read_bytes())
    ds = LlavaDataset(root / "llava_v1_5_mix665k.json", tmp_path, image_dirs={"gqa": moved})
    assert ds[1].image.size == (60, 60)  # from the gqa root
    with pytest.raises(DataError, match=r"image not found: .*/coco/train2017/000000000042\.jpg"):
        ds[0]  # coco is looked up under image_dir (tmp_path) where it is not
    entries = [
        {"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]},
        {
            "id": "y",
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "unanswered"},
            ],
        },
        {
            "id": "z",
            "conversations": [{"from": "human", "value": "say <|seg|>"}, {"from": "gpt", "value": "no"}],
        },
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(entries))
    bad = LlavaDataset(path, tmp_path)
    with pytest.raises(DataError, match=r"LLaVA entry 'x': turn 0 is from 'gpt' out of turn"):
        bad[0]
    assert bad[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"LLaVA entry 'z': turn 0 contains STAMP's special token"):
        bad[2]
