"""REFER (RefCOCO/+/g, RefCLEF) and gRefCOCO readers on fixtures in the exact on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stamp.data.grefer import GReferSegDataset
from stamp.data.io import DataError
from stamp.data.refer import ReferSegDataset
from stamp.model.tokens import SEG_TOKEN
from tests.fixtures_data import COCO_DIR, SAIAPR_DIR, write_playground


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("playground")
    return root, write_playground(root)


def refer(root: Path, dataset: str, split: str, **kw) -> ReferSegDataset:
    split_by = {"refcocog": "umd"}.get(dataset, "unc")
    image_dir = root / (SAIAPR_DIR if dataset == "refclef" else COCO_DIR)
    return ReferSegDataset(root / "refer_seg", dataset, split, image_dir, split_by=split_by, **kw)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        # every sentence of every ref is a sample: (sample id, ann id whose mask it gets)
        (
            "train",
            [
                ("refcoco_unc_0_0", 101),
                ("refcoco_unc_0_1", 101),
                ("refcoco_unc_1_0", 102),
                ("refcoco_unc_2_0", 201),
            ],
        ),
        ("val", [("refcoco_unc_3_0", 202), ("refcoco_unc_3_1", 202), ("refcoco_unc_4_0", 201)]),
        ("testA", [("refcoco_unc_5_0", 101)]),
        ("testB", [("refcoco_unc_6_0", 102)]),
    ],
)
def test_refcoco_samples_and_masks_pixel_exact(playground, split, expected):
    """Polygons (one and two parts), uncompressed RLE and compressed RLE decode exactly."""
    root, masks = playground
    ds = refer(root, "refcoco", split, prompt_choice="fixed")
    assert len(ds) == len(expected)
    for i, (sid, ann) in enumerate(expected):
        s = ds[i]
        assert s.id == sid and s.kind == "refer"
        assert len(s.masks) == 1 and s.masks[0].dtype == bool
        assert s.image.size == (s.masks[0].shape[1], s.masks[0].shape[0])
        np.testing.assert_array_equal(s.masks[0], masks[ann])
        assert s.messages[-1]["content"].count(SEG_TOKEN) == 1 and s.ignore is None


def test_sentences_and_image_file_names(playground):
    root, _ = playground
    ds = refer(root, "refcoco", "train", prompt_choice="fixed")
    texts = [ds[i].messages[0]["content"] for i in range(len(ds))]
    assert texts == [
        f"Please segment the {t} in this image."
        for t in ("man on left", "guy in red", "two part thing", "tall box")
    ]
    # the ref's own file_name (with an _<ann_id> suffix) is not used: the image comes from instances.json
    assert ds.records[0]["image"] == "COCO_train2014_000000000001.jpg"


@pytest.mark.parametrize(
    ("dataset", "counts"),
    [
        ("refcoco+", {"train": 2, "val": 1, "testA": 1, "testB": 1}),
        ("refcocog", {"train": 2, "val": 1, "test": 1}),
        ("refclef", {"train": 3, "val": 2, "testA": 1, "testB": 1}),
    ],
)
def test_other_refer_sets(playground, dataset, counts):
    root, masks = playground
    for split, n in counts.items():
        ds = refer(root, dataset, split)
        assert len(ds) == n, (dataset, split)
        for i in range(n):
            s = ds[i]
            assert s.masks[0].any()
    np.testing.assert_array_equal(refer(root, "refclef", "val")[0].masks[0], masks[7001])
    np.testing.assert_array_equal(refer(root, "refcocog", "test")[0].masks[0], masks[202])


def reference_refer_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """How REFER's getMask decodes an annotation: polygons through frPyObjects, otherwise the RLE
    list handed to pycocotools as is; the pieces summed over the last axis."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg[0], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = [{**r, "counts": r["counts"].encode()} for r in seg]
    m = mask_utils.decode(rle)
    return (m.sum(axis=2) if m.ndim == 3 else m) > 0


def test_refclef_release_layout_rle_lists_and_saiapr_names(playground):
    """RefCLEF's instances.json holds lists of compressed RLE dicts (one or several pieces) and
    images named <folder>/images/<id>.jpg: every split loads, each mask equals pycocotools'."""
    root, masks = playground
    instances = json.loads((root / "refer_seg/refclef/instances.json").read_text())
    image = instances["images"][0]
    assert image["file_name"] == "25/images/25386.jpg"
    anns = {a["id"]: a for a in instances["annotations"]}
    assert all(isinstance(a["segmentation"][0], dict) for a in anns.values())
    assert len(anns[7002]["segmentation"]) == 2
    samples = [
        refer(root, "refclef", split, prompt_choice="fixed")[i]
        for split, n in {"train": 3, "val": 2, "testA": 1, "testB": 1}.items()
        for i in range(n)
    ]
    assert [s.id for s in samples] == [
        "refclef_unc_0_0", "refclef_unc_1_0", "refclef_unc_1_1",
        "refclef_unc_2_0", "refclef_unc_3_0", "refclef_unc_4_0", "refclef_unc_5_0",
    ]  # fmt: skip
    for s in samples:
        ann = 7002 if s.id.split("_")[2] in ("1", "3", "5") else 7001
        truth = reference_refer_mask(anns[ann], image["height"], image["width"])
        np.testing.assert_array_equal(truth, masks[ann])  # the fixture is what pycocotools reads
        np.testing.assert_array_equal(s.masks[0], truth)


def test_every_sentence_of_every_ref_is_an_expression(playground, tmp_path):
    """An evaluation split counts what the reference evaluation scores: every sentence of every
    ref of the split, an empty or blank one included."""
    import pickle
    import shutil

    root, _ = playground
    shutil.copytree(root / "refer_seg/refcoco", tmp_path / "refer_seg/refcoco")
    path = tmp_path / "refer_seg/refcoco/refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    blank = [
        {"sent": "", "raw": "", "tokens": [], "sent_id": 90},
        {"sent": "  ", "raw": " ", "tokens": [], "sent_id": 91},
    ]
    refs.append(
        {
            **refs[3],
            "ref_id": 9,
            "sentences": blank + [{"sent": "box", "raw": "Box", "tokens": ["box"], "sent_id": 92}],
        }
    )
    path.write_bytes(pickle.dumps(refs, protocol=2))
    ds = ReferSegDataset(tmp_path / "refer_seg", "refcoco", "val", root / COCO_DIR, prompt_choice="fixed")
    assert len(ds) == sum(len(r["sentences"]) for r in refs if r["split"] == "val") == 6
    assert [ds[i].id for i in range(3, 6)] == ["refcoco_unc_9_0", "refcoco_unc_9_1", "refcoco_unc_9_2"]


def test_repeats_and_seeded_templates(playground):
    root, _ = playground
    one = refer(root, "refcoco", "train", seed=3)
    two = refer(root, "refcoco", "train", seed=3, repeats=2)
    other = refer(root, "refcoco", "train", seed=4, repeats=2)
    assert len(two) == 2 * len(one)
    chats = [two[i].messages for i in range(len(two))]
    assert chats == [refer(root, "refcoco", "train", seed=3, repeats=2)[i].messages for i in range(len(two))]
    assert chats != [other[i].messages for i in range(len(other))]
    # the second copy shows the same expressions with freshly drawn templates
    n = len(one)
    assert [two[i].id for i in range(n)] == [two[n + i].id for i in range(n)]
    assert any(chats[i] != chats[n + i] for i in range(n))
    for i in range(n):
        np.testing.assert_array_equal(two[i].masks[0], two[n + i].masks[0])


def test_unknown_names_list_the_valid_ones(playground):
    root, _ = playground
    with pytest.raises(
        ValueError,
        match=r"unknown REFER dataset 'refcocoz'; valid datasets: \['refclef', 'refcoco', 'refcoco\+', 'refcocog'\]",
    ):
        refer(root, "refcocoz", "val")
    with pytest.raises(ValueError, match=r"unknown split_by 'umd' for refcoco; valid: \['unc', 'google'\]"):
        ReferSegDataset(root / "refer_seg", "refcoco", "val", root, split_by="umd")
    with pytest.raises(
        ValueError,
        match=r"unknown split 'testC' for refcoco \(refs\(unc\)\.p\); valid splits: \['testA', 'testB', 'train', 'val'\]",
    ):
        len(refer(root, "refcoco", "testC"))


def test_missing_annotation_files_are_named(tmp_path):
    ds = ReferSegDataset(tmp_path, "refcoco", "val", tmp_path)
    with pytest.raises(DataError, match=r"file not found: .*refcoco/refs\(unc\)\.p"):
        len(ds)


def test_grefcoco_multi_and_no_target(playground):
    root, masks = playground
    ds = GReferSegDataset(root / "refer_seg/grefcoco", "val", root / COCO_DIR, prompt_choice="fixed")
    samples = [ds[i] for i in range(len(ds))]
    assert [s.id for s in samples] == [
        "grefcoco_unc_10_0",
        "grefcoco_unc_10_1",
        "grefcoco_unc_11_0",
        "grefcoco_unc_12_0",
    ]
    assert [s.kind for s in samples] == ["multi", "multi", "none", "refer"]
    np.testing.assert_array_equal(samples[0].masks[0], masks[101] | masks[102])  # the union of both targets
    np.testing.assert_array_equal(samples[2].masks[0], np.zeros_like(masks[101]))  # no target: all zero
    np.testing.assert_array_equal(samples[3].masks[0], masks[201])
    for s in samples:
        assert len(s.masks) == 1 and s.messages[-1]["content"].count(SEG_TOKEN) == 1
    # one question family for all kinds (it must not give the answer away); answers say which
    assert [s.messages[0]["content"] for s in samples] == [
        "Please segment both things in this image.",
        "Please segment all objects in this image.",
        "Please segment the purple elephant in this image.",
        "Please segment the tall box in this image.",
    ]
    assert [s.messages[1]["content"] for s in samples[1:]] == [
        f"Sure, here they are: {SEG_TOKEN}",
        f"There is no such object in this image. {SEG_TOKEN}",
        f"Sure, it is {SEG_TOKEN}",
    ]
    train = GReferSegDataset(root / "refer_seg/grefcoco", "train", root / COCO_DIR)
    np.testing.assert_array_equal(train[0].masks[0], masks[201] | masks[202])
    assert [
        len(GReferSegDataset(root / "refer_seg/grefcoco", s, root / COCO_DIR)) for s in ("testA", "testB")
    ] == [1, 1]


def test_grefcoco_pickle_variant_and_contradictions(playground, tmp_path):
    import pickle

    root, masks = playground
    grefs = json.loads((root / "refer_seg/grefcoco/grefs(unc).json").read_text())
    d = tmp_path / "grefcoco"
    d.mkdir()
    (d / "instances.json").write_text((root / "refer_seg/grefcoco/instances.json").read_text())
    grefs[1]["ann_id"] = [101]  # marked no_target but pointing at an object
    (d / "grefs(unc).p").write_bytes(pickle.dumps(grefs, protocol=2))
    ds = GReferSegDataset(d, "val", root / COCO_DIR)
    assert ds.refs_path.name == "grefs(unc).p" and len(ds) == 4
    np.testing.assert_array_equal(ds[0].masks[0], masks[101] | masks[102])
    with pytest.raises(DataError, match="ref 11 is marked no_target but points at annotations"):
        ds[2]


def test_corrupt_masks_and_images_raise_naming_the_file(playground, tmp_path):
    root, _ = playground
    d = tmp_path / "refer_seg/refcoco"
    d.mkdir(parents=True)
    inst = json.loads((root / "refer_seg/refcoco/instances.json").read_text())
    for a in inst["annotations"]:
        if a["id"] == 201:
            a["segmentation"]["size"] = [10, 10]  # RLE of another size than its image
        if a["id"] == 101:
            a["segmentation"] = [[8, 8, 24, 8, 24]]  # odd number of coordinates
    inst["annotations"] = [a for a in inst["annotations"] if a["id"] != 202]  # a missing annotation
    (d / "instances.json").write_text(json.dumps(inst))
    (d / "refs(unc).p").write_bytes((root / "refer_seg/refcoco/refs(unc).p").read_bytes())
    ds = ReferSegDataset(tmp_path / "refer_seg", "refcoco", "val", root / COCO_DIR)
    with pytest.raises(DataError, match=r"instances\.json has no annotation 202 with a segmentation \(ref 3"):
        ds[0]
    with pytest.raises(
        DataError, match=r"ref 4 \(ann 201\): RLE mask is 10x10 \(HxW\) but its image is 56x72"
    ):
        ds[2]
    train = ReferSegDataset(tmp_path / "refer_seg", "refcoco", "train", root / COCO_DIR)
    with pytest.raises(
        DataError,
        match=r"ref 0 \(ann 101\): a segmentation piece must be a polygon \(a flat list of x, y pairs\)",
    ):
        train[0]
    wrong_dir = ReferSegDataset(root / "refer_seg", "refcoco", "val", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"image not found: .*nowhere/COCO_train2014_000000000002\.jpg"):
        wrong_dir[0]
