"""Small builders used across tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from stamp.data.sample import Sample
from stamp.model.tokens import SEG_TOKEN


def square_sample(
    size: int = 112,
    box=(28, 28, 84, 84),
    question: str = "Segment the red square.",
    answer: str = f"Sure, it is {SEG_TOKEN}",
    extra_turns: list[dict] | None = None,
    sid: str = "t",
) -> Sample:
    """A red square on grey, with its mask."""
    img = np.full((size, size, 3), 200, dtype=np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (220, 30, 30)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    msgs += extra_turns or []
    n = sum(m["content"].count(SEG_TOKEN) for m in msgs if m["role"] == "assistant")
    return Sample(image=Image.fromarray(img), messages=msgs, masks=[mask] * n, id=sid)


QWEN_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def qwen_inputs(batch: dict) -> dict:
    """The entries of a collated batch that transformers' own Qwen2-VL forward takes."""
    return {k: batch[k] for k in QWEN_INPUTS}
