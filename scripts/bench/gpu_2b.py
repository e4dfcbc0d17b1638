"""GPU check: the Qwen2-VL-2B architecture (random weights) as STAMP, at 896x896 (1024 cells).

Measures, in bf16, for each attention path of the language model (``--attn``: ``sdpa``, the dense
4-D mask, and ``sdpa_hybrid``, attention only where the hybrid rule allows it), with
flash-attention for the vision encoder where installed:
  * end to end per sample: prefill (vision + prompt) + 16 generated tokens + the mask forward
    (target <= 0.25 s; the paper reports ~0.9 s for STAMP-2B);
  * the mask forward alone for K = 1, 4, 8 targets (target <= 30 ms; K = 8 <= 2x K = 1);
  * a training step, fused vs two-pass: tokens/s and an estimated MFU.

Random weights (``model.random_weights``): the architecture and sequence lengths set the cost,
not the values. The tokenizer is the tiny model's, and the special-token ids come from it. Prepared to run in one call on the lent GPU:

    PYTHONPATH=src python scripts/bench/gpu_2b.py            # on the GPU
    PYTHONPATH=src python scripts/bench/gpu_2b.py --arch tiny --device cpu --repeats 2   # dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from _common import batch_for, machine, median_time, random_model, report, sync, table

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def build(arch_name: str, attn: str, device: str, dtype: torch.dtype, cells: int):
    vision_attn = (
        "flash_attention_2"
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn")
        else "sdpa"
    )
    model, processor = random_model(arch_name, attn, device, dtype, cells, vision_attn=vision_attn)
    return model, processor, vision_attn


def measure(a, attn: str, dtype: torch.dtype) -> dict:
    """Every figure of the script for one attention implementation of the language model."""
    from transformers import GenerationConfig

    from stamp.inference.generate import answer_starts, generate, mask_forward, predict_masks, prefill

    t0 = time.perf_counter()
    model, processor, vision_attn = build(a.arch, attn, a.device, dtype, a.cells)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    print(
        f"built {a.arch} ({n_params / 1e9:.3f} B params) on {a.device} in {time.perf_counter() - t0:.1f}s; "
        f"language attention: {attn}, vision attention: {vision_attn}",
        flush=True,
    )
    # 1) end to end: prefill + 16 generated tokens + one mask forward (the <|seg|> is the last generated token)
    prompt = batch_for(processor, a.device, a.cells, 1, teacher_forcing=False)

    seg_id, pad_id = model.seg_token_id, processor.tokenizer.pad_token_id
    config = GenerationConfig(  # exactly new_tokens tokens, whatever the random weights say
        max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=pad_id
    )

    @torch.no_grad()
    def end_to_end():
        ctx = generate(model, prompt, config)
        ctx.ids[:, -1] = seg_id  # the last generated token read as a <|seg|> (not yet in the cache)
        return predict_masks(model, ctx, prompt["image_grid_thw"])

    t_e2e = median_time(end_to_end, a.repeats, warmup=2, device=a.device)
    t_prefill = median_time(lambda: prefill(model, prompt), a.repeats, warmup=1, device=a.device)

    # 2) the mask forward alone, K targets in one batched forward on the cached answer
    mask_ms = {}
    for k in (1, 4, 8):
        forced = batch_for(processor, a.device, a.cells, k)
        with torch.no_grad():
            ctx = prefill(model, forced, answer_starts(forced["input_ids"], header))
        segs = [
            s for s in model.find_segs(ctx.ids, ctx.valid, forced["image_grid_thw"]) if s.pos >= ctx.starts[0]
        ]
        assert len(segs) == k

        @torch.no_grad()
        def masks(ctx=ctx, segs=segs):  # reads the cache, leaves it as it is
            return mask_forward(model, segs, ctx.features, ctx.positions, ctx.valid, ctx.cache)

        mask_ms[k] = median_time(masks, a.repeats, warmup=2, device=a.device) * 1e3

    # 3) training step, fused vs two-pass
    model.train()
    train_batch = batch_for(processor, a.device, a.cells, 2, n=a.train_batch, train=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    lm_tokens = int(train_batch["attention_mask"].sum()) + sum(t.numel() for t in train_batch["seg_targets"])
    patches = int(train_batch["image_grid_thw"].prod(-1).sum())
    vis_params = sum(p.numel() for p in model.qwen.model.visual.parameters())
    lm_params = n_params - vis_params
    flops = 6 * (lm_params * lm_tokens + vis_params * patches)  # the usual 6 N T estimate

    def step():
        out = model(train_batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    train = {}
    for mode in ("fused", "two_pass"):
        model.train_forward = mode
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = median_time(step, max(3, a.repeats // 2), warmup=2, device=a.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else float("nan")
        gpu = machine().get("gpu", "")
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), float("nan"))
        train[mode] = {
            "step_s": t,
            "tokens_per_s": lm_tokens / t,
            "mfu": flops / t / 1e12 / peak_tflops,
            "peak_gib": peak,
        }
    sync(a.device)

    return {
        "params": n_params,
        "vision_attn": vision_attn,
        "end_to_end_ms": t_e2e * 1e3,
        "prefill_ms": t_prefill * 1e3,
        "mask_forward_ms": mask_ms,
        "train": train,
        "train_batch": f"{a.train_batch} x (1 image of {a.cells} cells, 2 <|seg|>): {lm_tokens} LM tokens, {patches} patches",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="2b", choices=["2b", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--attn", default="sdpa,sdpa_hybrid", help="language-model attention paths to measure")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    results = {}
    for attn in a.attn.split(","):
        results[attn] = measure(a, attn, dtype)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the previous model is gone with measure()'s frame
    rows, trows = [], []
    for attn, r in results.items():
        rows += [
            [attn, "end to end (prefill + 16 tokens + mask)", r["end_to_end_ms"], "<= 250"],
            [attn, "prefill alone", r["prefill_ms"], "-"],
        ]
        m1 = r["mask_forward_ms"][1]
        rows += [
            [attn, f"mask forward, K={k}", v, "<= 30" if k == 1 else f"<= {2 * m1:.1f} (2x K=1)"]
            for k, v in r["mask_forward_ms"].items()
        ]
        trows += [
            [attn, m, v["step_s"], v["tokens_per_s"], v["mfu"], v["peak_gib"]] for m, v in r["train"].items()
        ]
    text = table(rows, ["attention", "latency (batch 1)", "ms", "target ms"])
    text += "\n\n" + table(trows, ["attention", "train step", "s/step", "tokens/s", "est. MFU", "peak GiB"])
    first = next(iter(results.values()))
    text += f"\ntrain batch {first['train_batch']}"
    for attn, r in results.items():
        text += f"\n{attn}: fused / two-pass {r['train']['two_pass']['step_s'] / r['train']['fused']['step_s']:.2f}x"
    report(
        text, {"bench": "gpu_2b", "arch": a.arch, "cells": a.cells, "results": results, "machine": machine()}
    )


if __name__ == "__main__":
    main()
