"""Drawing masks over images: each mask in its own colour, outlined, and numbered as in the
answer's ``[mask k]``, so that a mask stays visible on an object of its own colour."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from stamp.model.tokens import mark_masks

# Well-separated colours for masks 1-10; later masks get hues spaced by the golden ratio.
PALETTE = [
    (230, 25, 75),
    (0, 130, 200),
    (60, 180, 75),
    (255, 225, 25),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
    (0, 0, 128),
]


def mask_colour(k: int) -> tuple[int, int, int]:
    """The RGB colour of mask ``k`` (from 0), distinct from the colours of the other masks."""
    if k < len(PALETTE):
        return PALETTE[k]
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 0.9 - 0.3 * ((k // 7) % 2))
    return round(255 * r), round(255 * g), round(255 * b)


def _grow(m: np.ndarray) -> np.ndarray:
    """``m`` and its 4-neighbours."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def outline(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's inner edge (its pixels next to the outside) and outer edge (the outside
    pixels next to it)."""
    inner = m & _grow(~m)
    outer = _grow(m) & ~m
    return inner, outer


def overlay(
    image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5, numbers: bool = True
) -> Image.Image:
    """The image with mask k tinted in ``mask_colour(k)`` (``alpha`` = tint opacity), outlined
    white inside and black outside (visible on any background), and, with ``numbers``, labelled
    ``k + 1`` in a tag of its colour. ``alpha`` 0 draws nothing: the image itself."""
    out = np.asarray(image.convert("RGB")).astype(np.float32)
    if alpha == 0:
        return Image.fromarray(out.astype(np.uint8))
    edges = []
    for i, m in enumerate(masks):
        m = np.asarray(m, dtype=bool)
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask {i} is {m.shape}, image is {out.shape[:2]}")
        out[m] = (1 - alpha) * out[m] + alpha * np.array(mask_colour(i), dtype=np.float32)
        edges.append(outline(m))
    for inner, outer in edges:
        out[outer] = 0
        out[inner] = 255
    picture = Image.fromarray(out.round().astype(np.uint8))
    if numbers:
        draw = ImageDraw.Draw(picture)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(np.asarray(m, dtype=bool))
            if len(ys):
                x, y = int(xs[ys == ys.min()].min()), int(ys.min())  # the mask's top-left pixel
                box = draw.textbbox((x, y), str(i + 1))
                draw.rectangle(
                    (box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=mask_colour(i), outline=(0, 0, 0)
                )
                draw.text((x, y), str(i + 1), fill=(0, 0, 0))
    return picture


def mask_image(masks: list[np.ndarray], shape: tuple[int, int]) -> Image.Image:
    """A black-and-white PNG-ready picture of the union of ``masks``."""
    union = np.zeros(shape, dtype=bool)
    for m in masks:
        union |= np.asarray(m, dtype=bool)
    return Image.fromarray((union * 255).astype(np.uint8), mode="L")


def empty_masks_note(masks: list[np.ndarray]) -> str | None:
    """A line naming the empty masks (numbered from 1), or None: an empty mask is the model's
    way of saying that nothing in the image matches the request."""
    empty = [str(k + 1) for k, m in enumerate(masks) if not np.asarray(m).any()]
    if not empty:
        return None
    which = f"Mask {empty[0]} is" if len(empty) == 1 else f"Masks {', '.join(empty)} are"
    return f"{which} empty: nothing in the image matches."


def overlay_grid(examples: list[tuple], tile: int = 224) -> Image.Image:
    """Rows of (question, truth overlay, prediction overlay) for (sample, answer, preds) triples."""
    caption = 28
    sheet = Image.new("RGB", (2 * tile, len(examples) * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (sample, answer, preds) in enumerate(examples):
        y = r * (tile + caption)
        question = sample.prompt[-1]["content"]
        draw.text((4, y + 2), question[:70], fill="black")
        draw.text((4, y + 14), f"answer: {mark_masks(answer)[:60]}", fill=(90, 90, 90))
        for c, masks in enumerate((sample.masks, preds)):
            sheet.paste(overlay(sample.image, masks).resize((tile, tile)), (c * tile, y + caption))
        draw.text((4, y + caption + 2), "truth", fill="black")
        draw.text((tile + 4, y + caption + 2), "prediction", fill="black")
    return sheet
