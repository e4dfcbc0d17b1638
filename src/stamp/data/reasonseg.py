"""ReasonSeg (LISA): reasoning segmentation.

    <root>/{train,val,test}/<name>.jpg    the images
    <root>/{train,val,test}/<name>.json   {"text": [queries], "is_sentence": bool,
                                           "shapes": [{"label", "points": [[x, y], ...], "shape_type"}]}

Read as LISA's reference reader reads them: the JSON as UTF-8, falling back to cp1252 (some
files of the release are saved that way); shapes painted with OpenCV (``polylines`` then
``fillPoly``, points truncated to integers), largest first, so a smaller shape inside a larger
one wins. A label containing "ignore" paints an ignored region (value 255: left out of the
metrics and of the target), a "flag" shape is skipped, any other label is the target.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from stamp.data.io import DataError, read_json
from stamp.data.records import RecordDataset

SPLITS = ("train", "val", "test")
IGNORE = 255


def shape_points(shape: dict, where: str) -> np.ndarray:
    """A shape's vertices as the reference reads them: int32, truncated toward zero, 1 x n x 2.

    ``shape_type`` is not looked at (LISA's reader paints every shape as a polygon).
    """
    try:
        pts = np.asarray(shape["points"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: shape {shape.get('label')!r} has no valid points ({e})") from e
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise DataError(
            f"{where}: shape {shape.get('label')!r} needs points as [[x, y], ...], got shape {pts.shape}"
        )
    return pts.astype(np.int32)[None]


def paint(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    """Paint a closed polygon onto ``canvas`` as the reference does: its 1-px outline, then its fill."""
    cv2.polylines(canvas, points, True, value, 1)
    cv2.fillPoly(canvas, points, value)


def label_map(shapes: list[dict], h: int, w: int, where: str) -> np.ndarray:
    """uint8 HxW map: 0 background, 1 target, 255 ignore, painted as LISA's ``get_mask_from_json``.

    Shapes are painted in decreasing order of their painted area (``np.argsort`` of the areas,
    reversed, as the reference does, ties included), so a smaller shape nested in a larger one
    stays visible whichever is listed first.
    """
    valid, areas = [], []
    for s in shapes:
        label = str(s.get("label", ""))
        if label.lower() == "flag":  # deprecated annotations, skipped by the reference
            continue
        pts = shape_points(s, where)
        alone = np.zeros((h, w), dtype=np.uint8)
        paint(alone, pts, 1)
        valid.append((IGNORE if "ignore" in label.lower() else 1, pts))
        areas.append(int(alone.sum()))
    out = np.zeros((h, w), dtype=np.uint8)
    for k in np.argsort(areas)[::-1]:
        value, pts = valid[k]
        paint(out, pts, value)
    return out


class ReasonSegDataset(RecordDataset):
    """ReasonSeg: one sample per query text (``texts=first``: only the first, as evaluated).

    Args:
        root: the ``ReasonSeg`` folder holding ``train/``, ``val/``, ``test/``.
        split: ``train``, ``val`` or ``test``.
        **kwargs: see ``RecordDataset``.
    """

    def __init__(self, root: str | Path, split: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"unknown ReasonSeg split {split!r}; valid splits: {list(SPLITS)}")
        self.root, self.split = Path(root), split

    @property
    def name(self) -> str:
        return f"reasonseg|{self.split}"

    @property
    def split_dir(self) -> Path:
        d = self.root / self.split
        if not d.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            raise DataError(f"ReasonSeg split folder {d} does not exist (found: {present})")
        return d

    def source_files(self) -> list[tuple[Path, str]]:
        d = self.split_dir
        return [(p, p.name) for p in sorted(d.iterdir()) if p.suffix.lower() in (".jpg", ".json")]

    def read_raw(self) -> list[dict]:
        records = []
        for image in sorted(self.split_dir.glob("*.jpg")):
            ann_path = image.with_suffix(".json")
            rec: dict = {
                "id": f"reasonseg_{self.split}_{image.stem}",
                "image": image.name,
                "source": str(ann_path),
            }
            try:
                ann = read_json(ann_path, fallback_encoding="cp1252")
                texts = ann["text"]
                texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
                rec.update(
                    texts=[t.strip() for t in texts],  # all, as the reference keeps them
                    shapes=list(ann["shapes"]),
                    kind="reason" if ann.get("is_sentence") else "refer",
                )
            except DataError as e:
                rec["error"] = str(e)
            except (KeyError, TypeError) as e:
                rec["error"] = (
                    f"{ann_path}: expected keys 'text', 'is_sentence' and 'shapes' ({type(e).__name__}: {e})"
                )
            records.append(rec)
        return records

    def image_path(self, rec: dict) -> Path:
        return self.root / self.split / rec["image"]

    def decode(self, rec: dict, h: int, w: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        labels = label_map(rec["shapes"], h, w, rec["source"])
        ignore = labels == IGNORE
        return [labels == 1], ignore if ignore.any() else None

    def family_of(self, rec: dict) -> str:
        # the question follows the query: a sentence that needs reasoning, or a short phrase
        return "reason" if rec.get("kind") == "reason" else "refer"
