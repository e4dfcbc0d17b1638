"""Answers + masks end to end: transformers' ``generate()`` (``stamp.inference.generate``) vs the
hand-written greedy loop it replaced, side by side in one run, on the same model and batches.

The old loop is read from git history (``--baseline``, default the last commit that had it) into
a module of its own; both run ``generate_with_masks`` over the same validation batches (batch 1
and batched, left-padded), alternating, medians over repeats. Also reported: whether the two
give the same answers and the largest difference of their mask logits.

    .venv/bin/python scripts/bench/generation.py [--ckpt DIR] [--samples 32] [--batch 1 16] [--repeats 3]

Without --ckpt it uses the model `make demo` trained (logs/demo/make-demo-model.txt) when there
is one, else the untrained tiny model (whose answers are short and hold no <|seg|>).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, report, table, tiny_dir

BASELINE = "ac4205a"  # the last commit with the hand-written loop (prefill / feed / decode)
ROOT = Path(__file__).resolve().parents[2]


def old_module(rev: str):
    """``src/stamp/inference/generate.py`` as it was at ``rev``, imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/stamp/inference/generate.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "generate_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generate_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def model_path(ckpt: str | None) -> str:
    if ckpt:
        return ckpt
    marker = ROOT / "logs" / "demo" / "make-demo-model.txt"
    if marker.is_file():
        return marker.read_text().strip()
    from stamp.model.build import build_stamp, save_stamp

    model, processor = build_stamp({"backbone": str(tiny_dir())})
    return str(save_stamp(model, processor, tempfile.mkdtemp() + "/stamp"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=BASELINE, help="git revision of the old loop")
    a = p.parse_args()
    from stamp.data.collate import StampCollator
    from stamp.data.synthetic import SyntheticScenes
    from stamp.inference import generate as new
    from stamp.model.checkpoints import load_stamp

    old = old_module(a.baseline)
    ckpt = model_path(a.ckpt)
    model, processor = load_stamp(ckpt)
    model.eval()
    tok = processor.tokenizer
    data = SyntheticScenes("val", size=a.samples, seed=42)
    collate = StampCollator(processor, "generate")
    ways = {
        "generate()": lambda b: new.generate_with_masks(model, b, tok, a.max_new_tokens),
        "old loop": lambda b: old.generate_with_masks(model, b, tok, a.max_new_tokens),
    }
    rows, figures = [], {"bench": "generation", "ckpt": ckpt, "baseline": a.baseline, "machine": machine()}
    for bs in a.batch:
        batches = [
            collate([data[i] for i in range(s, min(s + bs, a.samples))]) for s in range(0, a.samples, bs)
        ]
        times = {w: [] for w in ways}
        outputs = {}
        for _ in range(a.repeats):
            for w, run in ways.items():
                t = time.perf_counter()
                outputs[w] = [r for b in batches for r in run(b)]
                times[w].append(time.perf_counter() - t)
        same_text = [r.text for r in outputs["generate()"]] == [r.text for r in outputs["old loop"]]
        logits = [
            (x, y)
            for r, q in zip(outputs["generate()"], outputs["old loop"], strict=True)
            for x, y in zip(r.cell_logits, q.cell_logits, strict=True)
        ]
        diff = max(((x - y).abs().max().item() for x, y in logits), default=0.0)
        rate = {w: a.samples / statistics.median(ts) for w, ts in times.items()}
        ratio = rate["generate()"] / rate["old loop"]
        rows.append([bs, rate["generate()"], rate["old loop"], ratio, same_text, len(logits), diff])
        figures[f"batch{bs}"] = {
            "samples_per_s": rate,
            "new_over_old": ratio,
            "same_answers": same_text,
            "masks": len(logits),
            "max_logit_diff": diff,
        }
    text = table(
        rows, ["batch", "generate() /s", "old loop /s", "new/old", "same answers", "masks", "max |dlogit|"]
    )
    report(f"{ckpt}\n{text}", figures)


if __name__ == "__main__":
    sys.exit(main())
