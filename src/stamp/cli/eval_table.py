"""``stamp-eval-table``: several ``stamp-eval`` results in one comparison table, the paper's layout.

    stamp-eval-table logs/eval/run-2b logs/eval/run-7b [--out reports/ablation]

A row per checkpoint; columns: cIoU on the RefCOCO/+/g splits, gIoU / cIoU / N-acc / T-acc on
gRefCOCO, gIoU / cIoU on ReasonSeg, then the scores of any other split (e.g. the synthetic
``val``). Writes ``<out>.md`` and ``<out>.csv`` (default ``eval_table``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

# (split, metric) columns of the paper's tables, in order
PAPER_COLUMNS = [
    *[(f"{d}_{s}", "ciou") for d in ("refcoco", "refcoco+") for s in ("val", "testA", "testB")],
    *[(f"refcocog_{s}", "ciou") for s in ("val", "test")],
    *[(f"grefcoco_{s}", m) for s in ("val", "testA", "testB") for m in ("giou", "ciou", "n_acc", "t_acc")],
    *[(f"reasonseg_{s}", m) for s in ("val", "test") for m in ("giou", "ciou")],
]
OTHER_METRICS = ("giou", "ciou", "ciou_cell", "vqa_acc")


def read_results(path: str | Path) -> tuple[str, dict[str, dict[str, float]]]:
    """(checkpoint, {split: metrics}) of a ``results.json`` or of a folder holding one."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no results.json at {path} (run stamp-eval first, or name its output folder)"
        )
    try:
        saved = json.loads(file.read_text())
        return str(saved.get("ckpt", path)), dict(saved["splits"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a stamp-eval results file ({e})") from e


def columns(runs: list[dict[str, dict[str, float]]]) -> list[tuple[str, str]]:
    """The paper's columns some run has, then the other splits' scores."""
    present = [(s, m) for s, m in PAPER_COLUMNS if any(m in r.get(s, {}) for r in runs)]
    paper_splits = {s for s, _ in PAPER_COLUMNS}
    others = sorted({s for r in runs for s in r} - paper_splits)
    present += [(s, m) for s in others for m in OTHER_METRICS if any(m in r.get(s, {}) for r in runs)]
    return present


def table(paths: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) with scores in percent, two decimals; "-" where a run lacks a split."""
    loaded = [read_results(p) for p in paths]
    cols = columns([splits for _, splits in loaded])
    header = ["checkpoint"] + [f"{s} {m}" for s, m in cols]
    rows = [
        [ckpt] + [f"{100 * splits[s][m]:.2f}" if m in splits.get(s, {}) else "-" for s, m in cols]
        for ckpt, splits in loaded
    ]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from stamp.cli import user_errors

    p = argparse.ArgumentParser(prog="stamp-eval-table", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="stamp-eval output folders (or results.json files)")
    p.add_argument("--out", default="eval_table", help="write <out>.md and <out>.csv")
    args = p.parse_args(argv)
    with user_errors("stamp-eval-table"):
        header, rows = table(args.runs)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = markdown(header, rows)
        out.with_suffix(".md").write_text(text)
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        print(text, end="")
        print(out.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
