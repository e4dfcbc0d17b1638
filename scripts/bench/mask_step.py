"""The mask step: our cached, batched mask forward vs the released code's way vs autoregressive cells.

For an image of N cells (N = 64, 256, 1024) and an answer holding K ``<|seg|>``:

* ours      - ONE forward over the K mask blocks (one batch row each) against the KV cache of
              the answer (the image features are reused, nothing else is recomputed);
* released  - per ``<|seg|>``, a full forward over the sequence cut after it plus its block,
              re-encoding the image (the original project's inference);
* AR cells  - N single-token decode steps with the KV cache (one label per cell, the
              autoregressive mask-as-text way of Text4Seg), per ``<|seg|>``.

Goals: ours >= 20x faster than AR cells at N = 256, >= 2x faster than released; on a GPU,
K = 8 should cost at most 2x K = 1. Medians over repeats; the last line is JSON.

    .venv/bin/python scripts/bench/mask_step.py [--cells 64 256 1024] [--targets 1 4 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import numpy as np
import torch
from _common import machine, median_time, report, table, tiny_dir
from PIL import Image

SEG = "<|seg|>"


def setup(cells: int, targets: int, device: str, backbone: str | None, dtype: str):
    from stamp.data.collate import StampCollator
    from stamp.data.sample import Sample
    from stamp.inference.generate import answer_starts, prefill
    from stamp.model.build import build_stamp

    side = int(math.isqrt(cells)) * 28
    pixels = side * side
    model, processor = build_stamp(
        {"backbone": backbone or str(tiny_dir()), "min_pixels": pixels, "max_pixels": pixels, "dtype": dtype}
    )
    model.to(device).eval()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    answer = "Sure, " + " and ".join(f"the red shape {SEG}" for _ in range(targets))
    sample = Sample(
        image=image,
        messages=[
            {"role": "user", "content": "Segment the red shapes."},
            {"role": "assistant", "content": answer},
        ],
        masks=[np.zeros((side, side), bool)] * targets,
    )
    batch = StampCollator(processor, "generate", teacher_forcing=True)([sample])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        ctx = prefill(model, batch, answer_starts(batch["input_ids"], header))
    segs = [s for s in model.find_segs(ctx.ids, ctx.valid, batch["image_grid_thw"]) if s.pos >= ctx.starts[0]]
    assert len(segs) == targets and segs[0].grid_hw[0] * segs[0].grid_hw[1] == cells, segs
    return model, batch, ctx, segs


def ours(model, ctx, segs):
    from stamp.inference.generate import mask_forward

    with torch.no_grad():  # reads the cache, leaves it as it is
        return mask_forward(model, segs, ctx.features, ctx.positions, ctx.valid, ctx.cache)


def released(model, batch, segs):
    """The cut-sequence forward per <|seg|>, vision included (training's two-pass reference)."""
    from stamp.model.stamp import Seg

    out = []
    with torch.no_grad():
        for sg in segs:
            cut = {
                k: (v[:, : sg.pos + 1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                for k, v in batch.items()
                if isinstance(v, torch.Tensor)
            }
            out += model.fused_pass(cut, segs=[Seg(0, sg.pos, sg.image, sg.grid_hw)])[1]
    return out


def ar_cells(model, ctx, segs):
    """N single-token decode steps per <|seg|>, each reading one cell label, with the KV cache."""
    from stamp.inference.generate import extend, extended_positions

    C = ctx.cache.get_seq_length()
    with torch.no_grad():
        for sg in segs:
            n = sg.grid_hw[0] * sg.grid_hw[1]
            ids, valid = ctx.ids, ctx.valid
            tok = ids[:, -1:]
            for i in range(1, n + 1):
                ids, valid = torch.cat([ids, tok], 1), torch.cat([valid, valid[:, -1:]], 1)
                hidden = extend(model, ids, valid, extended_positions(ctx.positions, i), [], ctx.cache)
                tok = model.qwen.lm_head(hidden[:, -1:]).argmax(-1)
            ctx.cache.crop(C)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cells", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--targets", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default=None, help="checkpoint dir (default: the tiny model)")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    rows, figures = (
        [],
        {"bench": "mask_step", "device": a.device, "machine": machine(), "cells": {}, "targets": {}},
    )
    for n in a.cells:
        model, batch, ctx, segs = setup(n, 1, a.device, a.backbone, a.dtype)
        t_ours = median_time(partial(ours, model, ctx, segs), a.repeats, device=a.device)
        t_rel = median_time(partial(released, model, batch, segs), a.repeats, device=a.device)
        t_ar = median_time(partial(ar_cells, model, ctx, segs), max(1, a.repeats // 2), device=a.device)
        rows.append([f"N={n}, K=1", t_ours * 1e3, t_rel * 1e3, t_ar * 1e3, t_rel / t_ours, t_ar / t_ours])
        figures["cells"][n] = {
            "ours_ms": t_ours * 1e3,
            "released_ms": t_rel * 1e3,
            "ar_cells_ms": t_ar * 1e3,
            "vs_released": t_rel / t_ours,
            "vs_ar_cells": t_ar / t_ours,
        }
    n = 256 if 256 in a.cells else a.cells[0]
    base = None
    for k in a.targets:
        model, batch, ctx, segs = setup(n, k, a.device, a.backbone, a.dtype)
        t_ours = median_time(partial(ours, model, ctx, segs), a.repeats, device=a.device)
        t_rel = median_time(partial(released, model, batch, segs), a.repeats, device=a.device)
        base = base or t_ours
        rows.append([f"N={n}, K={k}", t_ours * 1e3, t_rel * 1e3, "-", t_rel / t_ours, "-"])
        figures["targets"][k] = {
            "ours_ms": t_ours * 1e3,
            "released_ms": t_rel * 1e3,
            "vs_released": t_rel / t_ours,
            "ours_vs_k1": t_ours / base,
        }
    text = table(rows, ["case", "ours ms", "released ms", "AR cells ms", "released/ours", "AR/ours"])
    at = figures["cells"].get(256) or next(iter(figures["cells"].values()))
    text += (
        f"\nN=256: ours is {at['vs_ar_cells']:.1f}x faster than AR cells (goal >= 20x) and "
        f"{at['vs_released']:.1f}x faster than released (goal >= 2x)"
    )
    kmax = max(a.targets)
    text += f"\nK={kmax} costs {figures['targets'][kmax]['ours_vs_k1']:.2f}x K=1 (GPU goal <= 2x)"
    report(text, figures)


if __name__ == "__main__":
    main()
