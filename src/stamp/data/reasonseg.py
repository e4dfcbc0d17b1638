"""ReasonSeg (LISA): reasoning segmentation.

    <root>/{train,val,test}/<name>.jpg    the images
    <root>/{train,val,test}/<name>.json   {"text": [queries], "is_sentence": bool,
                                           "shapes": [{"label", "points": [[x, y], ...], "shape_type"}]}

Shapes are painted largest first (so a smaller shape inside a larger one wins), closed
polygons with their boundary pixels, points truncated to integers, as in LISA's reference code.
A label containing "ignore" paints an ignored region (value 255: left out of the metrics and of
the target), a "flag" shape is skipped, any other label is the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stamp.data.io import DataError, read_json
from stamp.data.records import RecordDataset

SPLITS = ("train", "val", "test")
IGNORE = 255


def shape_points(shape: dict, where: str) -> list[tuple[int, int]]:
    """Integer vertices of a labelme polygon (or rectangle, given by two corners)."""
    kind = shape.get("shape_type", "polygon") or "polygon"
    try:
        pts = [
            (int(x), int(y))
            for x, y in np.asarray(shape["points"], dtype=np.float64).astype(np.int32).tolist()
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: shape {shape.get('label')!r} has no valid points ({e})") from e
    if kind == "rectangle" and len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind != "polygon":
        raise DataError(f"{where}: shape {shape.get('label')!r} has shape_type {kind!r}; expected 'polygon'")
    if not pts:
        raise DataError(f"{where}: shape {shape.get('label')!r} has no points")
    return pts


def paint(points: list[tuple[int, int]], h: int, w: int) -> np.ndarray:
    """Boolean HxW mask of a closed polygon, boundary pixels included."""
    im = Image.new("1", (w, h), 0)
    ImageDraw.Draw(im).polygon(points, fill=1, outline=1)
    return np.asarray(im, dtype=bool)


def label_map(shapes: list[dict], h: int, w: int, where: str) -> np.ndarray:
    """uint8 HxW map: 0 background, 1 target, 255 ignore."""
    filled = []
    for s in shapes:
        label = str(s.get("label", ""))
        if label.lower() == "flag":
            continue
        m = paint(shape_points(s, where), h, w)
        filled.append((int(m.sum()), IGNORE if "ignore" in label.lower() else 1, m))
    out = np.zeros((h, w), dtype=np.uint8)
    for _, value, m in sorted(filled, key=lambda t: -t[0]):  # stable: larger first, then file order
        out[m] = value
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
                ann = read_json(ann_path)
                texts = ann["text"]
                texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
                rec.update(
                    texts=[t.strip() for t in texts if t.strip()],
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
