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
import warnings
from collections import defaultdict

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from stamp.cli import CONF_DIR
from stamp.data.collate import StampCollator
from stamp.data.synthetic import POSITIONS, SyntheticScenes
from stamp.evaluation import StampScorer
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


def scores(model, processor, data: SyntheticScenes, group, batch_size: int = 50) -> dict[str, dict]:
    """The evaluation's metrics (``StampScorer``) of the generated answers, per ``group(question)``."""
    collate = StampCollator(processor, "generate")
    scorers = defaultdict(StampScorer)
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(len(data), start + batch_size))])
        with torch.no_grad():
            rows = generate_with_masks(model, batch, processor.tokenizer, 16)
        for sample, row, grid in zip(batch["samples"], rows, batch["grid_hw"], strict=True):
            scorers[group(sample.messages[0]["content"])].update([sample], [row], [grid])
    with warnings.catch_warnings():  # a group of VQA questions leaves the mask metrics unused
        warnings.filterwarnings("ignore", "The ``compute`` method of metric", UserWarning)
        return {name: scorer.compute() for name, scorer in scorers.items()}


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

    seg = scores(model, processor, split("refer"), wording)
    print(f"{'referring expression names the target by':42s} {'n':>4s}  cell cIoU")
    for kind in sorted(seg):
        print(f"{kind:42s} {seg[kind]['expressions']:4.0f}  {seg[kind]['ciou_cell']:.3f}")

    vqa = scores(model, processor, split("vqa"), question_type)
    print(f"\n{'VQA question':42s} {'n':>4s}  accuracy")
    for _, kind in VQA_TYPES:
        got = vqa.get(kind, {"vqa_questions": 0, "vqa_acc": 0.0})
        print(f"{kind:42s} {got['vqa_questions']:4.0f}  {got['vqa_acc']:.3f}")
    asked = sum(v["vqa_questions"] for v in vqa.values())
    right = sum(v["vqa_acc"] * v["vqa_questions"] for v in vqa.values())
    print(f"{'all':42s} {asked:4.0f}  {right / asked:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
