"""GPU check: the Qwen2-VL-2B architecture (random weights) as STAMP, at 896x896 (1024 cells).

Measures, bf16 + sdpa (flash-attention for the vision encoder where installed):
  * end to end per sample: prefill (vision + prompt) + 16 generated tokens + the mask forward
    (target <= 0.25 s; the paper reports ~0.9 s for STAMP-2B);
  * the mask forward alone for K = 1, 4, 8 targets (target <= 30 ms; K = 8 <= 2x K = 1);
  * a training step, fused vs two-pass: tokens/s and an estimated MFU.

Random weights: the architecture and sequence lengths set the cost, not the values. The
tokenizer and image processor are the tiny model's (with 896x896 -> 1024 cells); the special
token ids of the 2B config are set to match them. Prepared to run in one call on the lent GPU:

    PYTHONPATH=src python scripts/bench/gpu_2b.py            # on the GPU
    PYTHONPATH=src python scripts/bench/gpu_2b.py --arch tiny --device cpu --repeats 2   # dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np
import torch
from _common import machine, median_time, report, sync, table, tiny_dir
from PIL import Image

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def build(arch_name: str, device: str, dtype: torch.dtype, cells: int):
    from omegaconf import OmegaConf
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from stamp.cli import CONF_DIR
    from stamp.model.build import stamp_from_backbone
    from stamp.model.tokens import add_stamp_tokens

    pixels = cells * 28 * 28
    processor = AutoProcessor.from_pretrained(tiny_dir(), min_pixels=pixels, max_pixels=pixels)
    add_stamp_tokens(processor.tokenizer)
    tok = processor.tokenizer
    ids = {
        k: tok.convert_tokens_to_ids(t)
        for k, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    if arch_name == "tiny":
        config = Qwen2VLConfig.from_pretrained(tiny_dir())
    else:
        arch = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/qwen2vl_2b.yaml").arch)
        arch.pop("tokenizer_len", None)
        config = Qwen2VLConfig(**{**arch, **ids})
    vision_attn = (
        "flash_attention_2"
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn")
        else "sdpa"
    )
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = vision_attn
    torch.manual_seed(0)
    with torch.device(device):
        backbone = Qwen2VLForConditionalGeneration(config).to(dtype)
    model = stamp_from_backbone(backbone, processor, {"mask_positions": "sequential"}).to(
        device=device, dtype=dtype
    )
    return model, processor, vision_attn


def batch_for(
    processor,
    device: str,
    cells: int,
    targets: int,
    n: int = 1,
    teacher_forcing: bool = True,
    train: bool = False,
):
    from stamp.data.collate import StampCollator
    from stamp.data.sample import Sample

    side = int(math.isqrt(cells)) * 28
    rng = np.random.default_rng(0)
    answer = "Sure, " + " and ".join(f"the red shape {'<|seg|>'}" for _ in range(targets))
    samples = [
        Sample(
            image=Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)),
            messages=[
                {"role": "user", "content": "Please segment the red shapes in this picture."},
                {"role": "assistant", "content": answer},
            ],
            masks=[np.zeros((side, side), bool)] * targets,
        )
        for _ in range(n)
    ]
    collate = StampCollator(processor, "train" if train else "generate", teacher_forcing=teacher_forcing)
    batch = collate(samples)
    return {
        k: (
            [t.to(device) for t in v]
            if k == "seg_targets"
            else v.to(device)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in batch.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="2b", choices=["2b", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=4)
    a = p.parse_args()
    from stamp.inference.generate import answer_starts, decode, mask_forward, prefill

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model, processor, vision_attn = build(a.arch, a.device, dtype, a.cells)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    print(
        f"built {a.arch} ({n_params / 1e9:.3f} B params) on {a.device} in {time.perf_counter() - t0:.1f}s; vision attention: {vision_attn}",
        flush=True,
    )

    # 1) end to end: prefill + 16 generated tokens + one mask forward (the <|seg|> is the last generated token)
    prompt = batch_for(processor, a.device, a.cells, 1, teacher_forcing=False)

    @torch.no_grad()
    def end_to_end():
        from stamp.model.stamp import Seg

        state = prefill(model, prompt)
        decode(model, state, a.new_tokens, stop_ids=set(), pad_id=processor.tokenizer.pad_token_id)
        grid = prompt["image_grid_thw"][0]
        seg = Seg(0, state.ids.shape[1] - 1, 0, (int(grid[1]) // 2, int(grid[2]) // 2))
        return mask_forward(model, [seg], state.features, state.positions, state.valid, state.cache)

    t_e2e = median_time(end_to_end, a.repeats, warmup=2, device=a.device)
    t_prefill = median_time(lambda: prefill(model, prompt), a.repeats, warmup=1, device=a.device)

    # 2) the mask forward alone, K targets in one batched forward on the cached answer
    mask_ms = {}
    for k in (1, 4, 8):
        forced = batch_for(processor, a.device, a.cells, k)
        with torch.no_grad():
            state = prefill(model, forced)
        start = answer_starts(state.ids, header)[0]
        segs = [
            s for s in model.find_segs(state.ids, state.valid, forced["image_grid_thw"]) if s.pos >= start
        ]
        assert len(segs) == k

        @torch.no_grad()
        def masks(state=state, segs=segs):  # reads the cache, leaves it as it is
            return mask_forward(model, segs, state.features, state.positions, state.valid, state.cache)

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

    rows = [
        ["end to end (prefill + 16 tokens + mask)", t_e2e * 1e3, "<= 250"],
        ["prefill alone", t_prefill * 1e3, "-"],
    ]
    rows += [
        [f"mask forward, K={k}", v, "<= 30" if k == 1 else f"<= {2 * mask_ms[1]:.1f} (2x K=1)"]
        for k, v in mask_ms.items()
    ]
    text = table(rows, ["latency (batch 1)", "ms", "target ms"])
    trows = [[m, v["step_s"], v["tokens_per_s"], v["mfu"], v["peak_gib"]] for m, v in train.items()]
    text += "\n\n" + table(trows, ["train step", "s/step", "tokens/s", "est. MFU", "peak GiB"])
    text += f"\ntrain batch {a.train_batch} x (1 image of {a.cells} cells, 2 <|seg|>): {lm_tokens} LM tokens, {patches} patches"
    text += f"\nfused / two-pass: {train['two_pass']['step_s'] / train['fused']['step_s']:.2f}x"
    report(
        text,
        {
            "bench": "gpu_2b",
            "arch": a.arch,
            "params": n_params,
            "cells": a.cells,
            "vision_attn": vision_attn,
            "end_to_end_ms": t_e2e * 1e3,
            "prefill_ms": t_prefill * 1e3,
            "mask_forward_ms": mask_ms,
            "train": train,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
