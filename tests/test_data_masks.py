"""One COCO segmentation decoder for every reader: each layout of the public releases, pixel for
pixel against pycocotools' own decoding (``COCO.annToMask``; REFER's ``getMask`` for RLE lists)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stamp.data.io import DataError
from stamp.data.masks import union_mask
from tests.fixtures_data import box, compressed_rle, rle_counts

H, W = 30, 40
A = box(H, W, (2, 12), (3, 20))
B = box(H, W, (8, 25), (15, 35))  # overlaps A
POLY = [[30.5, 2.0, 38.0, 4.5, 36.2, 14.7, 29.0, 12.0]]  # sloped edges
COMPRESSED_BYTES = {
    "size": [H, W],
    "counts": mask_utils.encode(np.asfortranarray(A.astype(np.uint8)))["counts"],
}


def ann_to_mask(seg) -> np.ndarray:
    """pycocotools' COCO API decoding one annotation (polygon list or one RLE dict)."""
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": H, "width": W}], "annotations": [], "categories": []}
    coco.createIndex()
    return coco.annToMask({"image_id": 1, "segmentation": seg}).astype(bool)


def refer_get_mask(rles: list[dict]) -> np.ndarray:
    """REFER's getMask on a list of RLE dicts: decode the list, sum the pieces."""
    rles = [
        {**r, "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]} for r in rles
    ]
    return mask_utils.decode(rles).sum(axis=2) > 0


@pytest.mark.parametrize(
    ("layout", "seg", "truth"),
    [
        ("polygon list", POLY, lambda: ann_to_mask(POLY)),
        ("one RLE, compressed string", compressed_rle(A), lambda: ann_to_mask(compressed_rle(A))),
        ("one RLE, compressed bytes", COMPRESSED_BYTES, lambda: A),
        ("one RLE, uncompressed", {"size": [H, W], "counts": rle_counts(A)}, lambda: ann_to_mask({"size": [H, W], "counts": rle_counts(A)})),
        ("RLE list, one piece", [compressed_rle(A)], lambda: refer_get_mask([compressed_rle(A)])),
        ("RLE list, two pieces", [compressed_rle(A), compressed_rle(B)], lambda: refer_get_mask([compressed_rle(A), compressed_rle(B)])),
        (
            "RLE list, uncompressed pieces",
            [{"size": [H, W], "counts": rle_counts(A)}, {"size": [H, W], "counts": rle_counts(B)}],
            lambda: ann_to_mask({"size": [H, W], "counts": rle_counts(A)}) | ann_to_mask({"size": [H, W], "counts": rle_counts(B)}),
        ),
        (
            "mixed: polygon, compressed and uncompressed RLE",
            [POLY[0], compressed_rle(A), {"size": [H, W], "counts": rle_counts(B)}],
            lambda: ann_to_mask(POLY) | ann_to_mask(compressed_rle(A)) | ann_to_mask({"size": [H, W], "counts": rle_counts(B)}),
        ),
    ],
)  # fmt: skip
def test_every_coco_layout_decodes_as_pycocotools(layout, seg, truth):
    expected = truth()
    assert expected.any()
    np.testing.assert_array_equal(union_mask([seg], H, W, layout), expected)


def test_union_over_segmentations_and_no_target():
    np.testing.assert_array_equal(union_mask([POLY, [compressed_rle(B)]], H, W), ann_to_mask(POLY) | B)
    assert not union_mask([], H, W).any()


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        ([compressed_rle(box(10, 10, (0, 2), (0, 2)))], r"ann 5: RLE mask is 10x10 \(HxW\) but its image is 30x40"),
        ([{"size": [H, W], "counts": [1, 2, 3]}], r"ann 5: RLE counts cover 6 pixels, the image has 1200"),
        ([[1, 2, 3]], r"ann 5: a segmentation piece must be a polygon .* got \[1, 2, 3\]"),
        ("abc", r"ann 5: not a COCO segmentation"),
        ([{"size": [H, W], "counts": 7}], r"ann 5: RLE 'counts' must be a list or a string, got int"),
    ],
)  # fmt: skip
def test_malformed_segmentations_name_the_annotation(seg, message):
    with pytest.raises(DataError, match=message):
        union_mask([seg], H, W, "ann 5")
