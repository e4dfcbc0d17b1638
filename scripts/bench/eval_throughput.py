"""End-to-end evaluation throughput on stamp-eval's path (Lightning's test loop: generate answers
and masks, score them): batch 1, batched, and batched with data-loader workers, side by side.

    .venv/bin/python scripts/bench/eval_throughput.py [--ckpt DIR] [--samples 64] [--batch 16] [--workers 2]

Without --ckpt it saves the (untrained) tiny model as a STAMP checkpoint first; the answers of
an untrained model are short, so pass a trained checkpoint for representative figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
from _common import machine, report, table, tiny_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    from stamp.data.datamodule import StampDataModule
    from stamp.data.synthetic import SyntheticScenes
    from stamp.model.checkpoints import load_stamp
    from stamp.training.callbacks import SegmentationScoring
    from stamp.training.evaluate import StampEvalModule

    ckpt = a.ckpt
    if ckpt is None:
        from stamp.model.build import build_stamp, save_stamp

        model, processor = build_stamp({"backbone": str(tiny_dir())})
        ckpt = save_stamp(model, processor, tempfile.mkdtemp() + "/stamp")
    model, processor = load_stamp(ckpt)
    module = StampEvalModule(model.eval(), processor, {"max_new_tokens": a.max_new_tokens})
    data = SyntheticScenes("val", size=a.samples, seed=42)
    settings = [(1, 0), (a.batch, 0), (a.batch, a.workers)]  # (batch, workers)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    scores = {}
    for _ in range(a.repeats):
        for batch, workers in settings:
            scoring = SegmentationScoring(examples=0)
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                callbacks=[scoring],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            dm = StampDataModule(test=data, processor=processor, eval_batch_size=batch, num_workers=workers)
            t = time.perf_counter()
            trainer.test(module, datamodule=dm, verbose=False)
            times[(batch, workers)].append(time.perf_counter() - t)
            scores[(batch, workers)] = scoring.results.get("ciou_cell", float("nan"))
    rate = {s: a.samples / statistics.median(ts) for s, ts in times.items()}
    rows = [[b, w, rate[(b, w)], scores[(b, w)]] for b, w in settings]
    text = table(rows, ["batch", "workers", "samples/s", "ciou_cell"])
    batched, workers = rate[(a.batch, 0)], rate[(a.batch, a.workers)]
    text += f"\nbatched / batch-1 throughput: {batched / rate[(1, 0)]:.2f}x"
    text += f"\n{a.workers} workers / no workers (batched): {workers / batched:.2f}x"
    report(
        text,
        {
            "bench": "eval_throughput",
            "samples": a.samples,
            "batch": a.batch,
            "workers": a.workers,
            "samples_per_s_batch1": rate[(1, 0)],
            "samples_per_s_batched": batched,
            "samples_per_s_batched_workers": workers,
            "speedup_batched": batched / rate[(1, 0)],
            "speedup_workers": workers / batched,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
