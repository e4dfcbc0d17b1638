"""STAMP's special tokens and how they are added to a Qwen2-VL tokenizer and model."""

from __future__ import annotations

import torch

SEG_TOKEN = "<|seg|>"
MASK_TOKEN = "<|mask|>"
# The released checkpoints also carry these two (unused); a loader must accept them.
LEGACY_TOKENS = ("<|yes|>", "<|no|>")
IMAGE_PAD = "<|image_pad|>"
IM_END = "<|im_end|>"


def mark_masks(text: str) -> str:
    """An answer as a person reads it: the k-th ``<|seg|>`` becomes ``[mask k]`` (k from 1)."""
    parts = text.split(SEG_TOKEN)
    out = parts[0]
    for k, part in enumerate(parts[1:], start=1):
        before = " " if out and not out[-1].isspace() else ""
        after = " " if part[:1].isalnum() else ""  # "is <|seg|>." keeps its full stop in place
        out += f"{before}[mask {k}]{after}{part}"
    return " ".join(out.split())


def add_stamp_tokens(tokenizer) -> int:
    """Add ``<|seg|>`` and ``<|mask|>`` as special tokens if missing; return how many were added."""
    missing = [t for t in (SEG_TOKEN, MASK_TOKEN) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)


@torch.no_grad()
def resize_embeddings(model, num_tokens: int) -> None:
    """Grow the input/output embeddings to hold ``num_tokens`` rows; new rows get the mean row.

    Qwen2-VL's embedding matrix is padded beyond its tokenizer, so new ids often already have
    rows; it is never shrunk (that would break checkpoints that rely on the padding).
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if num_tokens <= old:
        return
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None and layer.weight.shape[0] == num_tokens and not layer.weight.is_meta:
            layer.weight[old:] = layer.weight[:old].mean(0, keepdim=True)
