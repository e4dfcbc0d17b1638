"""Training step at the paper's shapes on the CPU: Qwen2-VL-2B widths (2 language + 2 vision
layers, random weights), one image of N cells whose answer holds K ``<|seg|>``, forward + backward.

Modes, each in its own child process (so that each peak RSS is its own), alternating, medians
over the repeats; each child profiles one untimed warm-up step, then times ``--steps`` steps:
  * ``two_pass``  - the released code's way (sdpa, dense masks), the reference;
  * ``dense``     - fused, one pass under the dense 4-D hybrid mask (``attn_implementation=sdpa``);
  * ``hybrid``    - fused, ``sdpa_hybrid``: the text causal without a mask, each block against its
    prefix and itself only.
Per mode: s/step, peak RSS, what the steps add to it (peak RSS minus the RSS before the first step: gradients and activations),
and the attention's share of the step (scaled-dot-product kernels, forward and backward, in a
``torch.profiler`` profile of one step). The FLOP ratios beside them count matrix products only
(the blocks' linear layers, attention QK^T and AV, x3 for forward + backward;
the lm_head, the same in every mode, left out).
Goals (CPU, N = 1024): hybrid >= 2.7x two_pass at K=3, >= 3.2x at K=5; hybrid's peak below dense.

``--live-rss`` runs the children with glibc's mmap threshold fixed, so that a child's peak RSS
follows the memory its tensors hold (by default freed blocks may stay in the heap: a few hundred MB
of noise between runs of one mode).

``--rounds R`` adds, per shape, one more child that times every mode on one model in one process,
R rounds in rotating order (the mode switched through transformers' ``set_attn_implementation`` and
``model.train_forward``): this machine's speed drifts by 10-20 % over minutes, which moves the
separate children's ratios; in one process each round's ratio pairs steps a minute apart.

    PYTHONPATH=src .venv/bin/python scripts/bench/real_shapes.py                # the full grid
    PYTHONPATH=src .venv/bin/python scripts/bench/real_shapes.py --cells 64 --targets 1 --repeats 1 --steps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import batch_for, machine, random_model, report, table

MODES = {"two_pass": ("sdpa", "two_pass"), "dense": ("sdpa", "fused"), "hybrid": ("sdpa_hybrid", "fused")}


def attention_share(step) -> float:
    """Share of one step's CPU time spent in scaled-dot-product attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attn = sum(
        e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key or "flash_attention" in e.key
    )
    return attn / max(total, 1)


def child(mode: str, cells: int, targets: int, steps: int, layers: int, vision_layers: int) -> None:
    attn, forward = MODES[mode]
    model, processor = random_model("2b", attn=attn, cells=cells, layers=layers, vision_layers=vision_layers)
    model.train_forward = forward
    model.train()
    batch = batch_for(processor, "cpu", cells, targets, train=True)

    def step():
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    share = attention_share(step)  # the profiled step is the warm-up, not timed
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "step_s": statistics.median(times),
                "peak_rss_mb": peak / 1024,
                "grads_acts_mb": (peak - rss_before) / 1024,
                "attention_share": share,
                "text_tokens": int(batch["attention_mask"].sum()),
                "segs": len(batch["seg_targets"]),
            }
        )
    )


def run_child(args: list[str], env: dict[str, str] | None) -> dict:
    """This script as a child process with ``args``; its last stdout line, parsed."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def set_mode(model, mode: str) -> None:
    attn, forward = MODES[mode]
    model.qwen.set_attn_implementation({"text_config": attn})
    model.train_forward = forward


def interleaved(cells: int, targets: int, rounds: int, layers: int, vision_layers: int) -> None:
    """Every mode on one model in one process: one warm-up step each, then ``rounds`` rounds in
    rotating order; per mode the median step and the median over rounds of two_pass / mode."""
    model, processor = random_model(
        "2b", attn="sdpa", cells=cells, layers=layers, vision_layers=vision_layers
    )
    model.train()
    batch = batch_for(processor, "cpu", cells, targets, train=True)

    def step(mode: str) -> float:
        set_mode(model, mode)
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        return time.perf_counter() - t

    modes = list(MODES)
    for m in modes:
        step(m)
    times = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            times[m].append(step(m))
    print(
        json.dumps(
            {
                m: {
                    "step_s": statistics.median(ts),
                    "steps_s": ts,
                    "speedup_vs_two_pass": statistics.median(
                        a / b for a, b in zip(times["two_pass"], ts, strict=True)
                    ),
                }
                for m, ts in times.items()
            }
        )
    )


def flops(cells: int, targets: int, text: int, layers: int, vision_layers: int) -> dict[str, float]:
    """Forward + backward FLOPs of the matrix products each mode computes (2B widths; ``text``
    tokens of chat): under a dense 4-D mask every query-key entry, under ``sdpa_hybrid`` only
    the allowed ones (the text's causal half, each block against its prefix and itself)."""
    h, inter, heads, kv, head_dim = 1536, 8960, 12, 2, 128
    vis_dim, patches = 1280, 4 * cells
    lm_token = 2 * (h * (heads + 2 * kv) * head_dim + heads * head_dim * h + 3 * h * inter)
    vis_token = 2 * (4 * vis_dim * vis_dim + 2 * vis_dim * 4 * vis_dim)
    merger = 2 * (4 * vis_dim * 4 * vis_dim + 4 * vis_dim * h) * cells
    attn_pair = 4 * heads * head_dim  # QK^T and AV per query-key pair and layer
    vision = vision_layers * (vis_token * patches + 4 * vis_dim * patches**2) + merger
    seg_at = [text - 2 - 6 * (targets - 1 - k) for k in range(targets)]  # where each <|seg|> roughly sits

    def lm(tokens: int, pairs: float) -> float:
        return layers * (lm_token * tokens + attn_pair * pairs)

    total_tokens = text + targets * cells
    dense = vision + lm(total_tokens, total_tokens**2)
    allowed = text * (text + 1) / 2 + sum(cells * (s + 1 + cells) for s in seg_at)
    hybrid = vision + lm(total_tokens, allowed)
    two_pass = vision + lm(text, text**2)  # under sdpa's 4-D masks every entry is computed
    for s in seg_at:  # a pass over the sequence cut after the <|seg|>, plus its block
        two_pass += vision + lm(s + 1 + cells, (s + 1 + cells) ** 2)
    return {"two_pass": 3 * two_pass, "dense": 3 * dense, "hybrid": 3 * hybrid}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="256,1024")
    p.add_argument("--targets", default="1,3,5")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2, help="child processes per mode and shape")
    p.add_argument("--steps", type=int, default=1, help="timed steps per child (after a profiled warm-up)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=0, help="rounds of the one-process comparison (0: none)")
    p.add_argument(
        "--live-rss",
        action="store_true",
        help="children with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072): freed large "
        "tensors leave RSS, so peak RSS follows live memory instead of the heap's history",
    )
    p.add_argument("--child", nargs=3, metavar=("MODE", "CELLS", "TARGETS"))
    a = p.parse_args()
    if a.child and a.child[0] == "interleaved":
        return interleaved(int(a.child[1]), int(a.child[2]), a.rounds, a.layers, a.vision_layers)
    if a.child:
        return child(a.child[0], int(a.child[1]), int(a.child[2]), a.steps, a.layers, a.vision_layers)
    modes = a.modes.split(",")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if a.live_rss else None
    results, rows, one_process, rows_1p = [], [], [], []
    for cells in (int(c) for c in a.cells.split(",")):
        for k in (int(t) for t in a.targets.split(",")):
            runs = {m: [] for m in modes}
            for _ in range(a.repeats):
                for m in modes:
                    args = ["--steps", str(a.steps), "--layers", str(a.layers)]
                    args += ["--vision-layers", str(a.vision_layers), "--child", m, str(cells), str(k)]
                    runs[m].append(run_child(args, env))
            med = {m: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for m, rs in runs.items()}
            text = int(next(iter(med.values()))["text_tokens"])
            fl = flops(cells, k, text, a.layers, a.vision_layers)
            ref = med.get("two_pass")
            for m, v in med.items():
                speedup = ref["step_s"] / v["step_s"] if ref else float("nan")
                flop_ratio = fl["two_pass"] / fl[m]
                rows.append(
                    [
                        cells,
                        k,
                        m,
                        v["step_s"],
                        speedup,
                        flop_ratio,
                        v["peak_rss_mb"],
                        v["grads_acts_mb"],
                        v["attention_share"],
                    ]
                )
                results.append(
                    {
                        "cells": cells,
                        "targets": k,
                        "mode": m,
                        **v,
                        "speedup_vs_two_pass": speedup,
                        "flop_ratio": flop_ratio,
                    }
                )
            if a.rounds:
                args = ["--rounds", str(a.rounds), "--layers", str(a.layers)]
                args += [
                    "--vision-layers",
                    str(a.vision_layers),
                    "--child",
                    "interleaved",
                    str(cells),
                    str(k),
                ]
                for m, v in run_child(args, env).items():
                    one_process.append({"cells": cells, "targets": k, "mode": m, **v})
                    steps = " ".join(f"{t:.1f}" for t in v["steps_s"])
                    rows_1p.append(
                        [cells, k, m, v["step_s"], v["speedup_vs_two_pass"], fl["two_pass"] / fl[m], steps]
                    )
    header = [
        "N",
        "K",
        "mode",
        "s/step",
        "two_pass/mode",
        "FLOP ratio",
        "peak RSS MB",
        "grads+acts MB",
        "attn share",
    ]
    text = table(rows, header)
    if rows_1p:
        text += f"\n\nIn one process, {a.rounds} rounds in rotating order (two_pass/mode: median of the rounds' ratios):\n"
        text += table(rows_1p, ["N", "K", "mode", "s/step", "two_pass/mode", "FLOP ratio", "steps (s)"])
    goals = {}
    for cells, k, goal in ((1024, 3, 2.7), (1024, 5, 3.2)):
        got = {r["mode"]: r for r in results if (r["cells"], r["targets"]) == (cells, k)}
        if {"hybrid", "two_pass", "dense"} <= set(got):
            h, d = got["hybrid"], got["dense"]
            goals[f"N{cells}_K{k}"] = {
                "speedup": h["speedup_vs_two_pass"],
                "goal": goal,
                "met": h["speedup_vs_two_pass"] >= goal and h["peak_rss_mb"] < d["peak_rss_mb"],
            }
            text += f"\nN={cells} K={k}: hybrid {h['speedup_vs_two_pass']:.2f}x two-pass (goal >= {goal}x), "
            text += f"peak RSS {h['peak_rss_mb']:.0f} vs dense {d['peak_rss_mb']:.0f} MB"
            same = [r for r in one_process if (r["cells"], r["targets"], r["mode"]) == (cells, k, "hybrid")]
            if same:
                goals[f"N{cells}_K{k}"]["speedup_one_process"] = same[0]["speedup_vs_two_pass"]
                text += f"; in one process {same[0]['speedup_vs_two_pass']:.2f}x"
    report(
        text,
        {
            "bench": "real_shapes",
            "layers": a.layers,
            "vision_layers": a.vision_layers,
            "steps": a.steps,
            "repeats": a.repeats,
            "rounds": a.rounds,
            "live_rss": a.live_rss,
            "results": results,
            "one_process": one_process,
            "goals": goals,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
