"""Turning ``Sample`` chats into model batches with the checkpoint's own processor (Qwen2-VL,
Qwen2.5-VL or Qwen3-VL: the cell size comes from its image processor)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stamp.data.sample import Sample
from stamp.model.tokens import IM_END

CELL = 28  # pixels per mask cell of Qwen2-VL and Qwen2.5-VL (14-px patches merged 2x2); see cell_pixels


def cell_pixels(processor) -> int:
    """Pixels per side of one mask cell: the image processor's patch size times its merge size
    (28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL's 16-px patches)."""
    image = processor.image_processor
    return int(image.patch_size) * int(image.merge_size)


def conversation(messages: list[dict[str, str]], with_image: bool) -> list[dict[str, Any]]:
    """Messages in the processor's chat format; the image goes first in the first user turn."""
    conv, placed = [], not with_image
    for m in messages:
        parts: list[dict[str, str]] = []
        if not placed and m["role"] == "user":
            parts.append({"type": "image"})
            placed = True
        parts.append({"type": "text", "text": m["content"]})
        conv.append({"role": m["role"], "content": parts})
    return conv


def cell_mask(mask: np.ndarray | torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Ground truth on the cell grid: bilinear resize, then threshold 0.5 (docs/METHOD.md section 3).

    Plain bilinear interpolation (no antialiasing) reads the mask around each cell's centre.
    """
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    small = F.interpolate(m, size=grid_hw, mode="bilinear", align_corners=False)[0, 0]
    return (small > 0.5).float()


def check_image(sample: Sample, cell: int = CELL) -> None:
    if sample.image is not None and min(sample.image.size) < cell:
        w, h = sample.image.size
        raise ValueError(
            f"sample {sample.id!r}: image is {w}x{h} pixels, smaller than one {cell}x{cell} mask cell"
        )


class StampCollator:
    """Collate ``Sample``s.

    ``mode="train"``: whole chats, right-padded, ``labels`` on assistant tokens only, one cell
    ground truth per ``<|seg|>`` in ``seg_targets``.
    ``mode="generate"``: the prompt up to the last answer plus the generation prompt,
    left-padded, for generation; with ``teacher_forcing=True`` the reference answer is
    appended (its masks can then be scored for a known answer).
    Both keep the ``samples`` and each row's cell grid ``grid_hw`` for scoring, and ``skipped``:
    how many broken samples the batch's samples replaced (logged as ``data/skipped``).
    """

    def __init__(self, processor, mode: str = "train", teacher_forcing: bool = False) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"unknown collator mode {mode!r}; expected 'train' or 'generate'")
        self.processor, self.mode, self.teacher_forcing = processor, mode, teacher_forcing
        tok = processor.tokenizer
        self.header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.im_end = tok.convert_tokens_to_ids(IM_END)
        self.merge = processor.image_processor.merge_size
        self.cell = cell_pixels(processor)

    def texts(self, s: Sample) -> str:
        if self.mode == "train" or self.teacher_forcing:
            conv = conversation(s.messages, s.image is not None)
            return self.processor.apply_chat_template(conv, tokenize=False)
        conv = conversation(s.prompt, s.image is not None)
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        for s in samples:
            check_image(s, self.cell)
        tok = self.processor.tokenizer
        tok.padding_side = "right" if self.mode == "train" else "left"
        images = [s.image.convert("RGB") for s in samples if s.image is not None]
        enc = self.processor(
            text=[self.texts(s) for s in samples],
            images=images or None,
            padding=True,
            return_tensors="pt",
        )
        batch: dict[str, Any] = dict(enc)
        grid = enc.get("image_grid_thw")
        grids, k = [], 0
        for s in samples:
            if s.image is None:
                grids.append(None)
            else:
                grids.append((int(grid[k, 1]) // self.merge, int(grid[k, 2]) // self.merge))
                k += 1
        batch["grid_hw"] = grids
        batch["samples"] = samples
        batch["skipped"] = sum(len(s.skipped) for s in samples)  # broken samples replaced (training)
        if self.mode == "train":
            batch["labels"] = self.labels(enc["input_ids"], enc["attention_mask"])
            batch["seg_targets"] = [
                cell_mask(m, g) for s, g in zip(samples, grids, strict=True) for m in s.masks
            ]
        return batch

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-100 everywhere except the assistant answers (each through its ``<|im_end|>``)."""
        labels = torch.full_like(input_ids, -100)
        n = len(self.header)
        for b, row in enumerate(input_ids.tolist()):
            i = 0
            while i + n <= len(row):
                if row[i : i + n] == self.header:
                    j = i + n
                    while j < len(row) and row[j] != self.im_end and attention_mask[b, j]:
                        j += 1
                    end = min(j + 1, len(row))
                    labels[b, i + n : end] = input_ids[b, i + n : end]
                    i = end
                else:
                    i += 1
        return labels
