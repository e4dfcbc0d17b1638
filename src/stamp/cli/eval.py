"""``stamp-eval``: score a checkpoint on one or many splits with Lightning's test loop.

Writes, under the run directory (``logs/eval/<checkpoint>/`` unless ``hydra.run.dir`` says
otherwise): ``splits/<split>.json`` as each split finishes, then ``results.json`` and
``results.md`` for all requested splits; ``predictions/<split>.jsonl`` with
``save_predictions=true``. A rerun skips the splits whose results exist for the same settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stamp.cli import CONF_DIR, user_errors
from stamp.data.datamodule import StampDataModule
from stamp.data.records import report_unreadable
from stamp.training.callbacks import SegmentationScoring
from stamp.training.distributed import end_distributed_job, pin_run_dir_for_children
from stamp.training.evaluate import EvalWriter, StampEvalModule, read_predictions
from stamp.training.tracking import _hydra, finish_wandb, wandb_init_args

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


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    cols = [c for c in TABLE if any(c in r for r in results.values())]
    lines = ["| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, r in results.items():
        cells = [
            (f"{r[c]:.0f}" if c == "expressions" else f"{100 * r[c]:.2f}") if c in r else "-" for c in cols
        ]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this job."""
    hc = _hydra(cfg)
    return list(hc.overrides.task) if hc is not None else []


def with_run_data(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the data settings of the training run that exported ``ckpt``.

    When ``ckpt`` is a run's ``model/`` folder (its ``../.hydra/config.yaml`` exists) and the
    command line picks no data config (``data=...``), the run's ``data`` node, ``seed`` and
    ``generation`` settings are used, so the run's validation is reproduced; overrides of
    ``data.*``, ``seed`` and ``generation.*`` given on the command line still apply.
    """
    run_cfg_path = Path(str(cfg.ckpt)).expanduser().parent / ".hydra" / "config.yaml"
    overrides = task_overrides(cfg)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if not run_cfg_path.is_file() or "data" in keys:
        return cfg
    run_cfg = OmegaConf.load(run_cfg_path)
    if "data" not in run_cfg:
        return cfg
    out = cfg.copy()
    with open_dict(out):
        out.data = run_cfg.data
        for key in (k for k in keys if k.startswith("data.")):
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
        if "seed" not in keys and "seed" in run_cfg:
            out.seed = run_cfg.seed
        if "generation" in run_cfg:
            out.generation = OmegaConf.merge(out.generation, run_cfg.generation)
            for key in (k for k in keys if k.startswith("generation.")):
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
    log.info("data settings of the run that exported %s: %s", cfg.ckpt, run_cfg_path)
    return out


def eval_dataset_node(data_cfg: DictConfig, split: str) -> DictConfig:
    """The config of a named split: an entry of ``data.splits`` or a top-level key (val, test)."""
    splits = data_cfg.get("splits") or {}
    node = splits.get(split) if split in splits else data_cfg.get(split)
    if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
        valid = sorted(set(splits) | {k for k in ("val", "test") if data_cfg.get(k) is not None})
        raise ValueError(f"unknown split {split!r} in data.eval_splits; valid splits: {valid}")
    return node


def eval_dataset(data_cfg: DictConfig, split: str):
    return instantiate(eval_dataset_node(data_cfg, split))


def split_settings(cfg: DictConfig, split: str) -> dict[str, Any]:
    """What a split's scores depend on; results are reused only for equal settings."""
    return {
        "ckpt": str(Path(str(cfg.ckpt)).expanduser().resolve()),
        "dataset": OmegaConf.to_container(eval_dataset_node(cfg.data, split), resolve=True),
        "batch_size": int(cfg.batch_size),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "dtype": str(cfg.dtype),
        "model_overrides": OmegaConf.to_container(cfg.model_overrides, resolve=True),
        "sam": OmegaConf.to_container(cfg.sam, resolve=True) if cfg.sam.checkpoint else None,
    }


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def finished_splits(out_dir: Path, cfg: DictConfig, splits: list[str]) -> dict[str, dict]:
    """The splits whose results exist under ``out_dir`` for the current settings."""
    done = {}
    for split in splits:
        path = out_dir / "splits" / f"{split}.json"
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        if saved.get("settings") == split_settings(cfg, split):
            log.info("%s: results exist (%s); skipped (overwrite=true evaluates it again)", split, path)
            done[split] = saved["metrics"]
        else:
            log.info("%s: %s was computed with other settings; evaluating again", split, path)
    return done


def resolve_dtype(cfg: DictConfig) -> str:
    if cfg.dtype != "auto":
        return str(cfg.dtype)
    gpu = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return "bfloat16" if gpu else "float32"


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    from stamp.cli.train import instantiate_group
    from stamp.model.checkpoints import load_stamp

    cfg = with_run_data(cfg)
    out_dir = Path(cfg.paths.output_dir)
    splits = [str(s) for s in cfg.data.eval_splits]
    datasets = {s: eval_dataset(cfg.data, s) for s in splits}  # an unknown name fails before any work
    done = {} if cfg.overwrite else finished_splits(out_dir, cfg, splits)
    todo = [s for s in splits if s not in done]
    if todo:
        model, processor = load_stamp(cfg.ckpt, dtype=resolve_dtype(cfg), **cfg.get("model_overrides", {}))
        refiner = None
        if cfg.sam.checkpoint:
            from stamp.inference.sam import SamRefiner

            s = cfg.sam
            refiner = SamRefiner.from_checkpoint(
                s.checkpoint,
                s.model_type,
                resolve_device("auto"),
                points=s.points,
                iterations=s.iterations,
                seed=s.seed,
            )
        parts_dir = out_dir / "predictions"
        writer = EvalWriter(parts_dir, refiner, out_dir / "masks" if cfg.save_masks else None)
        loggers = instantiate_group(cfg.get("logger"), lambda c: wandb_init_args(c, cfg))
        scoring = SegmentationScoring(examples=0)
        trainer = instantiate(cfg.trainer, callbacks=[scoring, writer], logger=False)
        module = StampEvalModule(model, processor, OmegaConf.to_container(cfg.generation, resolve=True))
        launch_env = pin_run_dir_for_children()  # the ranks a ddp launcher starts write here too
        failed = True
        try:
            for split in todo:
                report_unreadable(datasets[split], split)
                dm = StampDataModule(
                    test=datasets[split],
                    processor=processor,
                    eval_batch_size=int(cfg.batch_size),
                    num_workers=int(cfg.data.get("num_workers", 0)),
                )
                writer.split = split
                trainer.test(module, datamodule=dm, verbose=False)
                # scores synced over the processes, in full precision; a rate with nothing to
                # count (N-acc without no-target expressions) is left out
                metrics = {
                    k: v for k, v in {**scoring.results, **writer.sam_results}.items() if not math.isnan(v)
                }
                if trainer.is_global_zero:
                    finish_split(cfg, split, metrics, writer.merged_path, loggers, datasets[split])
                done[split] = metrics
                log.info("%s: %s", split, {k: round(v, 4) for k, v in metrics.items()})
            failed = False
        finally:
            finish_wandb(loggers, failed)
            end_distributed_job(launch_env)
        if not trainer.is_global_zero:
            return done
    results = {s: done[s] for s in splits}
    write_json(out_dir / "results.json", {"ckpt": str(cfg.ckpt), "splits": results})
    (out_dir / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))
    print(out_dir / "results.json")
    return results


def finish_split(cfg: DictConfig, split: str, metrics: dict, predictions: Path, loggers, dataset) -> None:
    """Rank 0, once a split is scored: its results file, predictions and W&B records."""
    out_dir = Path(cfg.paths.output_dir)
    for lg in loggers:
        lg.log_metrics({f"eval/{split}/{k}": v for k, v in metrics.items()})
        log_worst(lg, split, read_predictions(predictions), dataset, int(cfg.wandb_worst))
    if not cfg.save_predictions:
        predictions.unlink(missing_ok=True)
    write_json(
        out_dir / "splits" / f"{split}.json", {"settings": split_settings(cfg, split), "metrics": metrics}
    )


def log_worst(logger, split: str, predictions: list[dict], dataset, n: int) -> None:
    """The ``n`` worst mask predictions (lowest IoU) to W&B: a table (id, question, answer, mask,
    IoU, overlay) and the overlays as images captioned with their IoU."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or n <= 0:
        return
    import wandb
    from pycocotools import mask as mask_utils

    from stamp.utils.overlay import overlay_grid

    scored = [(m["iou"], r, k) for r in predictions for k, m in enumerate(r.get("masks", []))]
    rows, pictures, captions = [], [], []
    for value, r, k in sorted(scored, key=lambda t: (t[0], t[1]["index"], t[2]))[:n]:
        sample = dataset[r["index"]]
        pred = mask_utils.decode({**r["masks"][k]["rle"], "counts": r["masks"][k]["rle"]["counts"].encode()})
        picture = overlay_grid([(sample, r["answer"], [pred.astype(bool)])])
        rows.append([r["id"], r["question"], r["answer"], k + 1, value, wandb.Image(picture)])
        pictures.append(picture)
        captions.append(f"{r['id']} mask {k + 1}: IoU {value:.3f}")
    columns = ["id", "question", "answer", "mask", "iou", "overlay"]
    logger.experiment.log({f"eval/{split}/worst": wandb.Table(columns=columns, data=rows)})
    if pictures:
        logger.log_image(f"eval/{split}/worst_overlays", pictures, caption=captions)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors("stamp-eval"):
        run(cfg)


if __name__ == "__main__":
    main()
