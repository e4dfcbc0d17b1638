"""Writes a miniature ``playground/data`` tree in the real on-disk formats, with the masks each
annotation must decode to, drawn by hand (numpy slices) independently of the readers.

    refer_seg/{refcoco,refcoco+,refcocog,refclef}/{refs(unc|umd).p, instances.json}
    refer_seg/grefcoco/{grefs(unc).json, instances.json}
    refer_seg/images/coco_2014/train2014/COCO_train2014_*.jpg, refer_seg/images/saiapr_tc-12/*.jpg
    reason_seg/ReasonSeg/{train,val,test}/*.jpg + .json
    llava_v1_5_mix665k.json + coco/ gqa/ ocr_vqa/ textvqa/ vg/ images
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COCO_DIR = "refer_seg/images/coco_2014/train2014"
SAIAPR_DIR = "refer_seg/images/saiapr_tc-12"

# COCO images: id -> (file name, height, width)
COCO_IMAGES = {1: ("COCO_train2014_000000000001.jpg", 48, 64), 2: ("COCO_train2014_000000000002.jpg", 56, 72)}


def blank(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), dtype=bool)


def box(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Boolean mask with rows[0]..rows[1]-1 x cols[0]..cols[1]-1 set."""
    m = blank(h, w)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with a run of zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def compressed_rle(mask: np.ndarray) -> dict:
    """A JSON-ready compressed COCO RLE of a boolean mask (``counts`` a string)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_image(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, quality=95)


def coco_annotations() -> tuple[list[dict], dict[int, np.ndarray]]:
    """COCO annotations in all three segmentation forms, and the mask each must decode to."""
    h1, w1 = COCO_IMAGES[1][1:]
    h2, w2 = COCO_IMAGES[2][1:]
    expected = {
        # polygon x 8..24, y 8..20 covers pixel columns 8..23 and rows 8..19 (COCO convention)
        101: box(h1, w1, (8, 20), (8, 24)),
        # two polygons = one object in two parts
        102: box(h1, w1, (30, 40), (30, 40)) | box(h1, w1, (5, 15), (50, 60)),
        # uncompressed RLE (counts list, as crowd annotations)
        201: box(h2, w2, (10, 30), (5, 15)),
        # compressed RLE (counts string)
        202: box(h2, w2, (40, 50), (40, 70)),
    }
    anns = [
        {
            "id": 101,
            "image_id": 1,
            "category_id": 1,
            "bbox": [8, 8, 16, 12],
            "iscrowd": 0,
            "segmentation": [[8, 8, 24, 8, 24, 20, 8, 20]],
        },
        {
            "id": 102,
            "image_id": 1,
            "category_id": 2,
            "bbox": [30, 5, 30, 35],
            "iscrowd": 0,
            "segmentation": [[30, 30, 40, 30, 40, 40, 30, 40], [50, 5, 60, 5, 60, 15, 50, 15]],
        },
        {
            "id": 201,
            "image_id": 2,
            "category_id": 1,
            "bbox": [5, 10, 10, 20],
            "iscrowd": 1,
            "segmentation": {"size": [h2, w2], "counts": rle_counts(expected[201])},
        },
        {
            "id": 202,
            "image_id": 2,
            "category_id": 3,
            "bbox": [40, 40, 30, 10],
            "iscrowd": 0,
            "segmentation": compressed_rle(expected[202]),
        },
    ]
    return anns, expected


def instances(images: dict[int, tuple[str, int, int]], anns: list[dict]) -> dict:
    return {
        "info": {"description": "fixture"},
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, (f, h, w) in images.items()],
        "annotations": anns,
        "categories": [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in (1, 2, 3)],
    }


def sentences(texts: list[str], start: int) -> list[dict]:
    return [
        {"sent": t, "raw": t.upper(), "tokens": t.split(), "sent_id": start + k} for k, t in enumerate(texts)
    ]


# (ref_id, ann_id, image_id, split, sentences) per REFER dataset; refcocog uses umd splits
REFER_REFS = {
    "refcoco": [
        (0, 101, 1, "train", ["man on left", "the guy in red"]),
        (1, 102, 1, "train", ["two part thing"]),
        (2, 201, 2, "train", ["tall box"]),
        (3, 202, 2, "val", ["wide box", "bottom right box"]),
        (4, 201, 2, "val", ["the left box"]),
        (5, 101, 1, "testA", ["top left"]),
        (6, 102, 1, "testB", ["both parts"]),
    ],
    "refcoco+": [
        (0, 101, 1, "train", ["red shirt"]),
        (1, 202, 2, "train", ["flat box"]),
        (2, 201, 2, "val", ["narrow box"]),
        (3, 101, 1, "testA", ["small thing"]),
        (4, 102, 1, "testB", ["split thing"]),
    ],
    "refcocog": [
        (0, 102, 1, "train", ["the object that comes in two pieces"]),
        (1, 201, 2, "train", ["a tall narrow box standing on the left side"]),
        (2, 101, 1, "val", ["the rectangle near the top left corner"]),
        (3, 202, 2, "test", ["the wide box at the bottom"]),
    ],
}
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}


def write_refer(root: Path, name: str, refs: list[tuple], split_by: str) -> None:
    d = root / "refer_seg" / name
    d.mkdir(parents=True, exist_ok=True)
    out, sent_id = [], 0
    for ref_id, ann_id, image_id, split, texts in refs:
        file_name = COCO_IMAGES.get(image_id, (f"{image_id}.jpg",))[0]
        stem, ext = file_name.rsplit(".", 1)
        out.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "split": split,
                "sentences": sentences(texts, sent_id),
                "sent_ids": list(range(sent_id, sent_id + len(texts))),
                "category_id": 1,
                "file_name": f"{stem}_{ann_id}.{ext}",
            }
        )  # not a real file, as in REFER
        sent_id += len(texts)
    (d / f"refs({split_by}).p").write_bytes(pickle.dumps(out, protocol=2))


def write_playground(root: Path, broken: bool = False) -> dict:
    """Write the tree under ``root``; return the expected decoded masks and related facts.

    ``broken=True`` adds a refcoco train ref whose image file is missing and one whose image
    is a corrupt file (for the skip-in-training path).
    """
    root = Path(root)
    anns, expected = coco_annotations()
    for image_id, (f, h, w) in COCO_IMAGES.items():
        write_image(root / COCO_DIR / f, h, w, seed=image_id)
    images = dict(COCO_IMAGES)
    refs = {k: list(v) for k, v in REFER_REFS.items()}
    if broken:
        images[3] = ("COCO_train2014_000000000003.jpg", 40, 40)  # never written: a missing image
        images[4] = ("COCO_train2014_000000000004.jpg", 40, 40)  # written as garbage: corrupt
        (root / COCO_DIR / images[4][0]).write_bytes(b"\xff\xd8 not really a jpeg")
        anns = anns + [
            {"id": 301, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
            {"id": 401, "image_id": 4, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
        ]
        refs["refcoco"] += [
            (7, 301, 3, "train", ["the missing one"]),
            (8, 401, 4, "train", ["the corrupt one"]),
        ]
    for name, rs in refs.items():
        write_refer(root, name, rs, SPLIT_BY[name])
        (root / "refer_seg" / name / "instances.json").write_text(json.dumps(instances(images, anns)))

    # RefCLEF as REFER releases it: saiapr_tc-12 images under <folder>/images/<id>.jpg, and every
    # segmentation a LIST of compressed RLE dicts (one or several pieces, united by getMask)
    clef_h, clef_w = 40, 50
    clef_file = "25/images/25386.jpg"
    write_image(root / SAIAPR_DIR / clef_file, clef_h, clef_w, seed=25)
    expected[7001] = box(clef_h, clef_w, (0, 10), (0, 10))
    pieces_7002 = [box(clef_h, clef_w, (20, 30), (5, 15)), box(clef_h, clef_w, (25, 38), (10, 45))]
    expected[7002] = pieces_7002[0] | pieces_7002[1]  # overlapping pieces: their union
    clef_anns = [
        {"id": 7001, "image_id": 25386, "category_id": 1, "segmentation": [compressed_rle(expected[7001])]},
        {
            "id": 7002,
            "image_id": 25386,
            "category_id": 2,
            "segmentation": [compressed_rle(m) for m in pieces_7002],
        },
    ]
    write_refer(
        root,
        "refclef",
        [
            (0, 7001, 25386, "train", ["sky"]),
            (1, 7002, 25386, "train", ["rocks bottom", "the stones"]),
            (2, 7001, 25386, "val", ["top left corner"]),
            (3, 7002, 25386, "val", ["two rocks"]),
            (4, 7001, 25386, "testA", ["corner"]),
            (5, 7002, 25386, "testB", ["square"]),
        ],
        "unc",
    )
    (root / "refer_seg/refclef/instances.json").write_text(
        json.dumps(instances({25386: (clef_file, clef_h, clef_w)}, clef_anns))
    )

    # gRefCOCO: ann_id lists, [-1] = no target
    g = root / "refer_seg/grefcoco"
    g.mkdir(parents=True, exist_ok=True)
    grefs = [
        {
            "ref_id": 10,
            "image_id": 1,
            "ann_id": [101, 102],
            "split": "val",
            "no_target": False,
            "sentences": sentences(["both things", "all objects"], 0),
            "category_id": [1, 2],
            "file_name": "COCO_train2014_000000000001.jpg",
        },
        {
            "ref_id": 11,
            "image_id": 1,
            "ann_id": [-1],
            "split": "val",
            "no_target": True,
            "sentences": sentences(["the purple elephant"], 2),
            "category_id": [-1],
            "file_name": "COCO_train2014_000000000001.jpg",
        },
        {
            "ref_id": 12,
            "image_id": 2,
            "ann_id": [201],
            "split": "val",
            "no_target": False,
            "sentences": sentences(["the tall box"], 3),
            "category_id": [1],
            "file_name": "COCO_train2014_000000000002.jpg",
        },
        {
            "ref_id": 13,
            "image_id": 2,
            "ann_id": [201, 202],
            "split": "train",
            "no_target": False,
            "sentences": sentences(["boxes"], 4),
            "category_id": [1, 3],
            "file_name": "COCO_train2014_000000000002.jpg",
        },
        {
            "ref_id": 14,
            "image_id": 2,
            "ann_id": [-1],
            "split": "testA",
            "no_target": True,
            "sentences": sentences(["a giraffe"], 5),
            "category_id": [-1],
            "file_name": "COCO_train2014_000000000002.jpg",
        },
        {
            "ref_id": 15,
            "image_id": 1,
            "ann_id": [101],
            "split": "testB",
            "no_target": False,
            "sentences": sentences(["the red one"], 6),
            "category_id": [1],
            "file_name": "COCO_train2014_000000000001.jpg",
        },
    ]
    (g / "grefs(unc).json").write_text(json.dumps(grefs))
    (g / "instances.json").write_text(json.dumps(instances(dict(COCO_IMAGES), coco_annotations()[0])))

    # ReasonSeg: labelme-style polygons, an ignore region, a flag shape
    rs = root / "reason_seg/ReasonSeg"
    h, w = 40, 60
    reason = {
        ("val", "img_a"): {
            "text": ["What could you sit on in this room? Explain why.", "Where would a cat sleep?"],
            "is_sentence": True,
            "shapes": [
                {"label": "flag", "points": [[0, 0], [59, 0], [59, 39], [0, 39]], "shape_type": "polygon"},
                {
                    "label": "target",
                    "points": [[5.7, 5.2], [20, 5], [20, 15.9], [5, 15]],
                    "shape_type": "polygon",
                },
                {
                    "label": "ignore",
                    "points": [[10, 8], [14, 8], [14, 12], [10, 12]],
                    "shape_type": "polygon",
                },
                {
                    "label": "target",
                    "points": [[30, 20], [40, 20], [40, 30], [30, 30]],
                    "shape_type": "polygon",
                },
            ],
        },
        ("val", "img_b"): {
            "text": ["the red cup"],
            "is_sentence": False,
            "shapes": [
                {"label": "target", "points": [[0, 0], [9, 0], [9, 9], [0, 9]], "shape_type": "polygon"}
            ],
        },
        ("train", "img_c"): {
            "text": ["Which part holds the water?", "What keeps the plant alive?"],
            "is_sentence": True,
            "shapes": [
                {"label": "target", "points": [[2, 2], [12, 2], [12, 12], [2, 12]], "shape_type": "polygon"}
            ],
        },
        ("test", "img_d"): {
            "text": ["What would you use to cut paper?"],
            "is_sentence": True,
            "shapes": [
                {
                    "label": "target",
                    "points": [[20, 10], [30, 10], [30, 20], [20, 20]],
                    "shape_type": "polygon",
                }
            ],
        },
    }
    for k, ((split, stem), ann) in enumerate(reason.items()):
        write_image(rs / split / f"{stem}.jpg", h, w, seed=100 + k)
        (rs / split / f"{stem}.json").write_text(json.dumps(ann))
    # img_a: target rows 5..15 x cols 5..20 and rows 20..30 x cols 30..40 (boundaries included,
    # 5.7 truncated to 5), minus the ignore square rows 8..12 x cols 10..14 painted on top of it
    ignore_a = box(h, w, (8, 13), (10, 15))
    expected["reason_a"] = (box(h, w, (5, 16), (5, 21)) | box(h, w, (20, 31), (30, 41))) & ~ignore_a
    expected["reason_a_ignore"] = ignore_a
    expected["reason_b"] = box(h, w, (0, 10), (0, 10))

    # LLaVA: image roots per source folder, and a text-only chat
    llava_images = {
        "coco/train2017/000000000042.jpg": (64, 80),
        "gqa/images/n100.jpg": (60, 60),
        "ocr_vqa/images/b0001.jpg": (80, 56),
        "textvqa/train_images/t01.jpg": (64, 64),
        "vg/VG_100K/7.jpg": (56, 72),
    }
    for k, (rel, (ih, iw)) in enumerate(llava_images.items()):
        write_image(root / rel, ih, iw, seed=200 + k)
    convs = [
        {
            "id": "000000000042",
            "image": "coco/train2017/000000000042.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown in the picture?"},
                {"from": "gpt", "value": "Some noise."},
                {"from": "human", "value": "What colour is it?"},
                {"from": "gpt", "value": "Many colours."},
            ],
        },
        {
            "id": "n100",
            "image": "gqa/images/n100.jpg",
            "conversations": [
                {"from": "human", "value": "Is there a cup?\n<image>"},
                {"from": "gpt", "value": "No."},
            ],
        },
        {
            "id": "b0001",
            "image": "ocr_vqa/images/b0001.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWho wrote this book?"},
                {"from": "gpt", "value": "Nobody."},
            ],
        },
        {
            "id": "t01",
            "image": "textvqa/train_images/t01.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat does the sign say?"},
                {"from": "gpt", "value": "Stop."},
            ],
        },
        {
            "id": "vg7",
            "image": "vg/VG_100K/7.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the region."},
                {"from": "gpt", "value": "Grainy."},
            ],
        },
        {
            "id": "text_only_1",
            "conversations": [
                {"from": "human", "value": "Tell me a fact about owls."},
                {"from": "gpt", "value": "Owls can rotate their heads."},
                {"from": "human", "value": "Another one?"},
                {"from": "gpt", "value": "They fly silently."},
            ],
        },
    ]
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(convs))
    return expected
