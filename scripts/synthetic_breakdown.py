"""Where a model trained on the synthetic data stands, question type by question type.

Generates, end to end, the answers of a STAMP checkpoint to single-turn synthetic validation
questions and prints two tables: the cell-level cIoU of referring expressions by the words that
name the target (its colour, its kind, both, or a relative position), and the VQA accuracy by
question ("How many <colour> shapes?", "Is there a ...?", ...). `val/ciou_cell` and
`val/vqa_acc` average over these; the tables show which kind of words a model has not grounded:

    .venv/bin/python scripts/synthetic_breakdown.py logs/demo/runs/<run>/model [n=400] [seed=42]

The questions come from the validation split that `make demo` validates on (the demo config),
one kind at a time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from stamp.cli import CONF_DIR
from stamp.data.collate import CELL, StampCollator, cell_mask
from stamp.data.synthetic import POSITIONS, SyntheticScenes
from stamp.evaluation import normalise_answer
from stamp.inference.generate import generate_with_masks
from stamp.model.checkpoints import load_stamp

VQA_TYPES = (
    ("How many shapes", "how many shapes"),
    ("How many", "how many <colour> shapes"),
    ("Is there", "is there a <description>"),
    ("What colour", "what colour is the <kind>"),
    ("What shape", "what shape is the <colour> one"),
)


def wording(question: str) -> str:
    """What names the target of a synthetic referring question."""
    words = re.search(r"the (.+?)(?: in this image)?[.?]$", question).group(1).split()
    if words[0] in POSITIONS:
        return "position"
    if words[-1] == "shape":
        return "colour"
    return "kind" if len(words) == 1 else "colour + kind"


def question_type(question: str) -> str:
    """The type of a synthetic VQA question (``VQA_TYPES``)."""
    return next(name for start, name in VQA_TYPES if question.startswith(start))


def answers(model, processor, data: SyntheticScenes, batch_size: int = 50):
    collate = StampCollator(processor, "generate")
    for start in range(0, len(data), batch_size):
        samples = [data[i] for i in range(start, min(len(data), start + batch_size))]
        with torch.no_grad():
            rows = generate_with_masks(model, collate(samples), processor.tokenizer, 16)
        yield from zip(samples, rows, strict=True)


def main(args: list[str]) -> None:
    if not args:
        raise SystemExit(__doc__)
    opts = dict(a.split("=", 1) for a in args[1:])
    unknown = set(opts) - {"n", "seed"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; expected n=<questions>, seed=<int>")
    n, seed = int(opts.get("n", 400)), int(opts.get("seed", 42))
    model, processor = load_stamp(args[0])
    model.eval()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        val = compose("train", overrides=["experiment=demo", f"seed={seed}"]).data.val

    def split(kind: str) -> SyntheticScenes:
        return instantiate(val, size=n, kind_weights={kind: 1})

    inter, union, count = Counter(), Counter(), Counter()
    for sample, row in answers(model, processor, split("refer")):
        kind = wording(sample.messages[0]["content"])
        truth = cell_mask(sample.masks[0], (sample.image.height // CELL, sample.image.width // CELL)).bool()
        pred = row.cell_logits[0] > 0 if row.cell_logits else torch.zeros_like(truth)
        inter[kind] += int((pred & truth).sum())
        union[kind] += int((pred | truth).sum())
        count[kind] += 1
    print(f"{'referring expression names the target by':42s} {'n':>4s}  cell cIoU")
    for kind in sorted(count):
        print(f"{kind:42s} {count[kind]:4d}  {inter[kind] / max(union[kind], 1):.3f}")

    right, asked = Counter(), Counter()
    for sample, row in answers(model, processor, split("vqa")):
        kind = question_type(sample.messages[0]["content"])
        right[kind] += normalise_answer(row.text) == normalise_answer(sample.answer)
        asked[kind] += 1
    print(f"\n{'VQA question':42s} {'n':>4s}  accuracy")
    for _, kind in VQA_TYPES:
        print(f"{kind:42s} {asked[kind]:4d}  {right[kind] / max(asked[kind], 1):.3f}")
    print(f"{'all':42s} {sum(asked.values()):4d}  {sum(right.values()) / sum(asked.values()):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
