"""End-to-end evaluation throughput (generate answers + masks, score them): batch 1 vs batched.

    .venv/bin/python scripts/bench/eval_throughput.py [--ckpt DIR] [--samples 64] [--batch 16]

Without --ckpt it saves the (untrained) tiny model as a STAMP checkpoint first; the answers of
an untrained model are short, so pass a trained checkpoint for representative figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import machine, report, table, tiny_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    from stamp.cli.eval import evaluate_split
    from stamp.data.synthetic import SyntheticScenes
    from stamp.model.checkpoints import load_stamp

    ckpt = a.ckpt
    if ckpt is None:
        from stamp.model.build import build_stamp, save_stamp

        model, processor = build_stamp({"backbone": str(tiny_dir())})
        ckpt = save_stamp(model, processor, tempfile.mkdtemp() + "/stamp")
    model, processor = load_stamp(ckpt)
    model.eval()
    data = SyntheticScenes("val", size=a.samples, seed=42)
    times = {1: [], a.batch: []}
    results = {}
    for _ in range(a.repeats):
        for bs in times:
            t = time.perf_counter()
            with torch.no_grad():
                results[bs] = evaluate_split(model, processor, data, bs, a.max_new_tokens, desc=f"batch {bs}")
            times[bs].append(time.perf_counter() - t)
    rate = {bs: a.samples / statistics.median(ts) for bs, ts in times.items()}
    rows = [[bs, rate[bs], results[bs].get("ciou_cell", float("nan"))] for bs in times]
    text = table(rows, ["batch", "samples/s", "ciou_cell"])
    text += f"\nbatched / batch-1 throughput: {rate[a.batch] / rate[1]:.2f}x"
    report(
        text,
        {
            "bench": "eval_throughput",
            "samples": a.samples,
            "batch": a.batch,
            "samples_per_s_batch1": rate[1],
            "samples_per_s_batched": rate[a.batch],
            "speedup": rate[a.batch] / rate[1],
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
