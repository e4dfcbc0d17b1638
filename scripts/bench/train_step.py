"""Training step, fused vs two-pass, on the tiny config (CPU by default).

Modes: ``two_pass`` (the released code's way), ``fused`` (one pass, rows padded) and ``packed``
(one pass, rows packed together: ``model.pack_rows``, the default). Each mode runs in its own child process (so that each peak RSS is that mode's own), the modes
alternate, and the table shows medians. Goal: fused >= 1.4x the two-pass samples/s.

    .venv/bin/python scripts/bench/train_step.py [--repeats 3] [--steps 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import machine, report, table, tiny_dir


def child(mode: str, steps: int, batch_size: int, turns: int) -> None:
    from stamp.data.collate import StampCollator
    from stamp.data.synthetic import SyntheticScenes
    from stamp.model.build import build_stamp

    torch.manual_seed(0)
    model, processor = build_stamp(
        {
            "backbone": str(tiny_dir()),
            "train_forward": "two_pass" if mode == "two_pass" else "fused",
            "pack_rows": mode == "packed",
        }
    )
    model.train()
    data = SyntheticScenes("train", size=batch_size * (steps + 1), turns=(1, turns))
    collate = StampCollator(processor)
    batches = [collate([data[i * batch_size + j] for j in range(batch_size)]) for i in range(steps + 1)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for b in batches:
        t = time.perf_counter()
        out = model(b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    segs = sum(len(b["seg_targets"]) for b in batches[1:])
    print(
        json.dumps(
            {
                "step_s": statistics.median(times[1:]),
                "segs_per_sample": segs / (steps * batch_size),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_mb": rss_before / 1024,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--turns", type=int, default=1, help="chat turns per sample: 1..turns")
    p.add_argument("--child", choices=["packed", "fused", "two_pass"])
    a = p.parse_args()
    if a.child:
        return child(a.child, a.steps, a.batch, a.turns)
    tiny_dir()
    runs = {"packed": [], "fused": [], "two_pass": []}
    for _ in range(a.repeats):
        for mode in runs:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--steps",
                    str(a.steps),
                    "--batch",
                    str(a.batch),
                    "--turns",
                    str(a.turns),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    rows = [
        [m, a.batch / v["step_s"], v["step_s"], v["peak_rss_mb"], v["segs_per_sample"]]
        for m, v in med.items()
    ]
    speedup = med["two_pass"]["step_s"] / med["fused"]["step_s"]
    packing = med["fused"]["step_s"] / med["packed"]["step_s"]
    text = table(rows, ["mode", "samples/s", "s/step", "peak RSS MB", "<|seg|>/sample"])
    text += f"\nfused / two-pass samples/s: {speedup:.2f}x (goal >= 1.4x)"
    text += f"\npacked / fused samples/s: {packing:.2f}x"
    report(
        text,
        {
            "bench": "train_step",
            "batch": a.batch,
            "turns": a.turns,
            "fused_samples_per_s": a.batch / med["fused"]["step_s"],
            "two_pass_samples_per_s": a.batch / med["two_pass"]["step_s"],
            "speedup": speedup,
            "packed_samples_per_s": a.batch / med["packed"]["step_s"],
            "packing_speedup": packing,
            "packed_peak_rss_mb": med["packed"]["peak_rss_mb"],
            "fused_peak_rss_mb": med["fused"]["peak_rss_mb"],
            "two_pass_peak_rss_mb": med["two_pass"]["peak_rss_mb"],
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
