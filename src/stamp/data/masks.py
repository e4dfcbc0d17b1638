"""COCO segmentations (polygons, RLE) to boolean masks and back, with pycocotools.

Conventions are COCO's: a polygon is a flat ``[x0, y0, x1, y1, ...]`` list in pixel
coordinates whose pixel (row i, column j) is the unit square ``[j, j+1) x [i, i+1)``; an RLE
is a dict ``{"size": [h, w], "counts": ...}`` (``counts`` a list = uncompressed, a string or
bytes = compressed). An object's segmentation comes in any of the layouts the public releases
use, and decodes to the union of its pieces, as pycocotools and REFER's ``getMask`` do:

* a list of polygons (COCO, RefCOCO/+/g);
* one RLE dict (COCO crowd annotations: uncompressed; prepared records: compressed);
* a list of RLE dicts, one or several pieces (RefCLEF's ``instances.json``);
* a list mixing polygons and RLE dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from stamp.data.io import DataError


def is_rle(piece: Any) -> bool:
    return isinstance(piece, dict) and "counts" in piece and "size" in piece


def _rle(seg: dict, h: int, w: int, where: str) -> dict:
    """One RLE dict (either kind) as a compressed pycocotools RLE, its size checked."""
    try:
        size = [int(v) for v in seg["size"]]
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: RLE 'size' must be [height, width], got {str(seg['size'])[:40]}") from e
    if size != [h, w]:
        raise DataError(f"{where}: RLE mask is {size[0]}x{size[1]} (HxW) but its image is {h}x{w}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if sum(counts) != h * w:
            raise DataError(f"{where}: RLE counts cover {sum(counts)} pixels, the image has {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    raise DataError(f"{where}: RLE 'counts' must be a list or a string, got {type(counts).__name__}")


def _is_polygon(piece: Any) -> bool:
    return (
        isinstance(piece, list | tuple)
        and len(piece) % 2 == 0
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in piece)
    )


def _pieces(seg: Any, h: int, w: int, where: str) -> tuple[list[list[float]], list[dict]]:
    """(polygons, compressed RLEs) of one COCO segmentation in any layout, checked but not decoded."""
    if is_rle(seg):
        return [], [_rle(seg, h, w, where)]
    if not isinstance(seg, list | tuple):
        raise DataError(f"{where}: not a COCO segmentation (polygon list or RLE dict): {str(seg)[:80]}")
    polys, rles = [], []
    for piece in seg:
        if is_rle(piece):
            rles.append(_rle(piece, h, w, where))
        elif _is_polygon(piece):
            if len(piece) >= 6:  # fewer than 3 points encloses nothing (and 4 numbers would read as a box)
                polys.append([float(v) for v in piece])
        else:
            raise DataError(
                f"{where}: a segmentation piece must be a polygon (a flat list of x, y pairs) "
                f"or an RLE dict with 'size' and 'counts', got {str(piece)[:80]}"
            )
    return polys, rles


def check_segmentations(segs: Sequence[Any], h: int, w: int, where: str = "annotation") -> None:
    """Raise ``DataError`` if a segmentation is not of a COCO layout or not of size ``h x w``
    (cheap: nothing is decoded, so a corrupt compressed RLE string still shows only when decoded)."""
    for seg in segs:
        _pieces(seg, h, w, where)


def _rles(seg: Any, h: int, w: int, where: str) -> list[dict]:
    """The compressed pycocotools RLEs of the pieces of one COCO segmentation (any layout)."""
    polys, rles = _pieces(seg, h, w, where)
    return (mask_utils.frPyObjects(polys, h, w) if polys else []) + rles


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
