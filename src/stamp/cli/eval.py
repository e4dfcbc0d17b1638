"""``stamp-eval``: score a checkpoint on one or many splits; write results.json and results.md."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from stamp.cli import CONF_DIR, user_errors
from stamp.data.collate import StampCollator
from stamp.evaluation import StampScorer, predicted_cells, upsample
from stamp.inference.generate import generate_with_masks
from stamp.metrics import SegmentationMetrics
from stamp.utils.overlay import mask_image

log = logging.getLogger(__name__)
TABLE = (
    "giou",
    "ciou",
    "giou_sam",
    "ciou_sam",
    "n_acc",
    "t_acc",
    "ciou_cell",
    "ciou_oracle",
    "vqa_acc",
    "expressions",
)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when there is a CUDA device, else cpu; a CUDA device that is not there is
    a user error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={name}: this machine has no CUDA device that torch can use; use device=cpu or device=auto"
        )
    return name


def evaluate_split(
    model,
    processor,
    dataset,
    batch_size: int,
    max_new_tokens: int,
    refiner=None,
    mask_dir: Path | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Generate answers and masks for every sample of ``dataset`` and score them."""
    device = next(model.parameters()).device
    scorer = StampScorer().to(device)
    refined = SegmentationMetrics().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=StampCollator(processor, "generate"))
    for batch in tqdm(loader, desc=desc, unit="batch"):
        samples, grids = batch["samples"], batch["grid_hw"]
        tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rows = generate_with_masks(model, tensors, processor.tokenizer, max_new_tokens)
        scorer.update(samples, rows, grids)
        for s, row, grid in zip(samples, rows, grids, strict=True):
            if not s.masks:
                continue
            coarse = [
                upsample(predicted_cells(row, k, grid), s.masks[k].shape).numpy() for k in range(len(s.masks))
            ]
            final = refiner.refine(s.image, coarse) if refiner is not None else coarse
            if refiner is not None:
                refined.update(final, s.masks, None if s.ignore is None else [s.ignore] * len(final))
            if mask_dir is not None:
                mask_dir.mkdir(parents=True, exist_ok=True)
                for k, m in enumerate(final):
                    mask_image([m], m.shape).save(mask_dir / f"{s.id}_{k}.png")
    results = scorer.compute()
    if refiner is not None:
        r = refined.compute()
        results.update(giou_sam=float(r["giou"]), ciou_sam=float(r["ciou"]))
    # a rate with nothing to count (e.g. N-acc on a split without no-target expressions) is left out
    return {k: v for k, v in results.items() if not math.isnan(v)}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    cols = [c for c in TABLE if any(c in r for r in results.values())]
    lines = ["| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, r in results.items():
        cells = [
            (f"{r[c]:.0f}" if c == "expressions" else f"{100 * r[c]:.2f}") if c in r else "-" for c in cols
        ]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    from stamp.model.checkpoints import load_stamp

    device = resolve_device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model, processor = load_stamp(cfg.ckpt, dtype=dtype, **cfg.get("model_overrides", {}))
    model.to(device).eval()
    refiner = None
    if cfg.sam.checkpoint:
        from stamp.inference.sam import SamRefiner

        s = cfg.sam
        refiner = SamRefiner.from_checkpoint(
            s.checkpoint, s.model_type, device, points=s.points, iterations=s.iterations, seed=s.seed
        )
    out_dir = Path(cfg.paths.output_dir)
    results = {}
    for split in cfg.data.eval_splits:
        dataset = eval_dataset(cfg.data, split)
        mask_dir = out_dir / "masks" / split if cfg.save_masks else None
        results[split] = evaluate_split(
            model, processor, dataset, cfg.batch_size, cfg.max_new_tokens, refiner, mask_dir, desc=split
        )
        log.info("%s: %s", split, {k: round(v, 4) for k, v in results[split].items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps({"ckpt": str(cfg.ckpt), "splits": results}, indent=2) + "\n"
    )
    (out_dir / "results.md").write_text(markdown_table(results))
    log_to_loggers(cfg, results)
    print(markdown_table(results))
    print(out_dir / "results.json")
    return results


def eval_dataset(data_cfg: DictConfig, split: str):
    """The dataset of a named split: an entry of ``data.splits`` or a top-level key (val, test)."""
    splits = data_cfg.get("splits") or {}
    node = splits.get(split) if split in splits else data_cfg.get(split)
    if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
        valid = sorted(set(splits) | {k for k in ("val", "test") if data_cfg.get(k) is not None})
        raise ValueError(f"unknown split {split!r} in data.eval_splits; valid splits: {valid}")
    return instantiate(node)


def log_to_loggers(cfg: DictConfig, results: dict[str, Any]) -> None:
    for node in (cfg.get("logger") or {}).values():
        logger = instantiate(node)
        logger.log_metrics({f"eval/{s}/{k}": v for s, r in results.items() for k, v in r.items()})
        if hasattr(logger, "finalize"):
            logger.finalize("success")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors("stamp-eval"):
        run(cfg)


if __name__ == "__main__":
    main()
