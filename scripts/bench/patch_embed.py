"""The vision tower's patch embedding: transformers' ``Conv3d`` vs STAMP's ``PatchLinear`` (the
same parameter computed as ``F.linear``; ``stamp.model.patch_embed``), forward + backward (the
weight's gradient; pixels need none), side by side in one process, alternating, medians.

Shapes: the demo's (16 images of 256 patches, width 128) and the 2B recipe's (one 1024-cell
image: 4096 patches, width 1280).

    PYTHONPATH=src .venv/bin/python scripts/bench/patch_embed.py
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import machine, report, table

from stamp.model.patch_embed import PatchLinear

SHAPES = {"demo (tiny)": (4096, 128), "2B, 1024 cells": (4096, 1280)}


def main(repeats: int = 7) -> None:
    torch.manual_seed(0)
    rows, figures = [], {}
    for name, (patches, width) in SHAPES.items():
        x = torch.randn(patches, 3, 2, 14, 14)
        conv = torch.nn.Conv3d(3, width, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
        times = {"Conv3d": [], "PatchLinear": []}
        for i in range(repeats + 1):
            for cls in (torch.nn.Conv3d, PatchLinear):
                conv.__class__ = cls
                conv.weight.grad = None
                t = time.perf_counter()
                y = conv(x).view(-1, width)
                (y * y).sum().backward()
                if i:  # the first round warms up
                    times[cls.__name__].append(time.perf_counter() - t)
        conv_ms, lin_ms = (statistics.median(times[k]) * 1e3 for k in ("Conv3d", "PatchLinear"))
        rows.append([name, patches, width, conv_ms, lin_ms, conv_ms / lin_ms])
        figures[name] = {"conv3d_ms": conv_ms, "patch_linear_ms": lin_ms, "speedup": conv_ms / lin_ms}
    header = ["shape", "patches", "width", "Conv3d ms", "PatchLinear ms", "Conv3d/PatchLinear"]
    report(table(rows, header), {"bench": "patch_embed", "results": figures, "machine": machine()})


if __name__ == "__main__":
    main()
