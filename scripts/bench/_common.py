"""Shared helpers of the benchmarks: timing, the tiny model, result printing."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "artifacts" / "tiny-qwen2vl"


def tiny_dir() -> Path:
    """The embedded tiny checkpoint, built if missing."""
    if not (TINY / "config.json").exists():
        from stamp.model.tiny import make_tiny

        make_tiny(TINY)
    return TINY


def random_model(
    arch_name: str = "2b",
    attn: str = "sdpa",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cells: int = 1024,
    layers: int | None = None,
    vision_layers: int | None = None,
    vision_attn: str | None = None,
):
    """STAMP on a random-weight backbone (``model.random_weights``): the 2B/7B config's ``arch``
    (``layers``/``vision_layers`` cut the depth) or the tiny checkpoint's; images of ``cells`` cells."""
    from omegaconf import OmegaConf

    from stamp.cli import CONF_DIR
    from stamp.model.build import build_stamp

    pixels = cells * 28 * 28
    if arch_name == "tiny":
        cfg = {"backbone": str(tiny_dir()), "min_pixels": pixels, "max_pixels": pixels}
    else:
        model_file = {"2b": "qwen2vl_2b", "7b": "qwen2vl_7b_lora"}[arch_name]
        arch = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/{model_file}.yaml").arch)
        if arch_name == "7b":  # the 7B file holds only what differs from the 2B
            base = OmegaConf.load(f"{CONF_DIR}/model/qwen2vl_2b.yaml").arch
            arch = OmegaConf.to_container(OmegaConf.merge(base, arch))
        if layers:
            arch["num_hidden_layers"] = layers
        if vision_layers:
            arch["vision_config"]["depth"] = vision_layers
        cfg = {"random_weights": True, "arch": arch, "min_pixels": pixels, "max_pixels": pixels}
    cfg.update(attn_implementation=attn, vision_attn_implementation=vision_attn or "sdpa")
    torch.manual_seed(0)
    model, processor = build_stamp(cfg)
    return model.to(device=device, dtype=dtype), processor


def batch_for(
    processor,
    device: str,
    cells: int,
    targets: int,
    n: int = 1,
    teacher_forcing: bool = True,
    train: bool = False,
):
    """``n`` chats about a random image of ``cells`` cells whose answer holds ``targets`` <|seg|>."""
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


def sync(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, device="cpu") -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(text: str, figures: dict) -> None:
    """Print the human table, then the figures as ONE JSON object on the last line."""
    print(text)
    print(json.dumps(figures, sort_keys=True))
