"""Drawing masks over images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from stamp.inference.generate import strip_seg

PALETTE = [(255, 40, 40), (40, 120, 255), (40, 200, 80), (255, 200, 0), (200, 60, 220)]


def overlay(image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """The image with each mask tinted in its own colour (``alpha`` = tint opacity)."""
    out = np.asarray(image.convert("RGB")).astype(np.float32)
    for i, m in enumerate(masks):
        m = np.asarray(m, dtype=bool)
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask {i} is {m.shape}, image is {out.shape[:2]}")
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
    return Image.fromarray(out.round().astype(np.uint8))


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
        draw.text((4, y + 14), f"answer: {strip_seg(answer)[:60]}", fill=(90, 90, 90))
        for c, masks in enumerate((sample.masks, preds)):
            sheet.paste(overlay(sample.image, masks).resize((tile, tile)), (c * tile, y + caption))
        draw.text((4, y + caption + 2), "truth", fill="black")
        draw.text((tile + 4, y + caption + 2), "prediction", fill="black")
    return sheet
