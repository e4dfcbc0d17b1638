"""COCO segmentations (polygons, RLE) to boolean masks and back, with pycocotools.

Conventions are COCO's: a polygon is a flat ``[x0, y0, x1, y1, ...]`` list in pixel
coordinates whose pixel (row i, column j) is the unit square ``[j, j+1) x [i, i+1)``; an
object's segmentation is a list of such polygons or one RLE dict ``{"size": [h, w], "counts":
...}`` (``counts`` a list = uncompressed, a string = compressed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from stamp.data.io import DataError


def _rles(seg: Any, h: int, w: int, where: str) -> list[dict]:
    """pycocotools RLEs (compressed) of one COCO segmentation."""
    if isinstance(seg, list):
        polys = []
        for p in seg:
            if not isinstance(p, list | tuple) or len(p) % 2:
                raise DataError(f"{where}: a polygon must be a flat list of x, y pairs, got {str(p)[:80]}")
            if len(p) >= 6:  # fewer than 3 points encloses nothing (and 4 numbers would read as a box)
                polys.append([float(v) for v in p])
        return mask_utils.frPyObjects(polys, h, w) if polys else []
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [h, w]:
            raise DataError(
                f"{where}: RLE mask is {seg['size'][0]}x{seg['size'][1]} (HxW) but its image is {h}x{w}"
            )
        counts = seg["counts"]
        if isinstance(counts, list):
            if sum(counts) != h * w:
                raise DataError(f"{where}: RLE counts cover {sum(counts)} pixels, the image has {h * w}")
            return [mask_utils.frPyObjects(seg, h, w)]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if isinstance(counts, bytes):
            return [{"size": [h, w], "counts": counts}]
    raise DataError(f"{where}: not a COCO segmentation (polygon list or RLE dict): {str(seg)[:80]}")


def union_mask(segs: Sequence[Any], h: int, w: int, where: str = "annotation") -> np.ndarray:
    """The HxW boolean union of COCO segmentations; all-zero for an empty list (no target)."""
    rles = []
    for seg in segs:
        rles += _rles(seg, h, w, where)
    if not rles:
        return np.zeros((h, w), dtype=bool)
    try:
        m = mask_utils.decode(mask_utils.merge(rles) if len(rles) > 1 else rles[0])
    except Exception as e:  # pycocotools raises bare exceptions on malformed counts
        raise DataError(f"{where}: cannot decode the RLE mask: {e}") from e
    if m.shape != (h, w):
        raise DataError(f"{where}: decoded mask is {m.shape[0]}x{m.shape[1]}, expected {h}x{w}")
    return m.astype(bool)


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a boolean HxW mask, JSON-ready (``counts`` as a string)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
