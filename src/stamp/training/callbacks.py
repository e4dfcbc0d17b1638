"""Callbacks: validation scoring with torchmetrics, prediction overlays (files, W&B), a metrics file,
step time and peak memory."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from stamp.evaluation import StampScorer, predicted_cells, upsample
from stamp.model.tokens import mark_masks
from stamp.utils.overlay import overlay_grid

# The scores are torchmetrics states summed over the processes before they are logged
# (sync_dist=False on purpose); Lightning's advice to sync them again does not apply.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(val|test)/", category=PossibleUserWarning
)


class SegmentationScoring(L.Callback):
    """Scores the answers and masks generated in ``validation_step``/``test_step``.

    Logs ``{stage}/giou``, ``{stage}/ciou`` (pixels), ``{stage}/ciou_cell``,
    ``{stage}/ciou_oracle``, ``{stage}/n_acc``, ``{stage}/t_acc``, ``{stage}/pr@X`` and
    ``{stage}/vqa_acc``; keeps the first ``examples`` predictions for overlays.
    ``ciou_oracle`` is not a score of the model: it is the pixel cIoU of the true masks
    quantised to the cells (28 px; 32 px for Qwen3-VL), the ceiling of a cell-level prediction, fixed by the data.
    """

    def __init__(self, examples: int = 8) -> None:
        self.scorer = StampScorer()
        self.examples = examples
        self.kept: list[tuple] = []
        self.results: dict[str, float] = {}

    def _reset(self, pl_module) -> None:
        self.scorer = self.scorer.to(pl_module.device)
        self.scorer.reset()
        self.kept = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset(pl_module)

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        samples, grids = batch["samples"], batch["grid_hw"]
        self.scorer.update(samples, outputs["rows"], grids)
        for s, row, g in zip(samples, outputs["rows"], grids, strict=True):
            if len(self.kept) < self.examples and s.masks:
                preds = [
                    upsample(predicted_cells(row, k, g), s.masks[k].shape).numpy()
                    for k in range(len(s.masks))
                ]
                self.kept.append((s, row.text, preds))

    on_test_batch_end = on_validation_batch_end

    def _log(self, stage: str, pl_module) -> None:
        metrics = self.scorer.compute()
        self.results = metrics  # full precision (the logged values are float32)
        pl_module.log_dict({f"{stage}/{k}": torch.tensor(v) for k, v in metrics.items()}, sync_dist=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log("val", pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)


class OverlayWriter(L.Callback):
    """After each validation, writes ``overlays.png`` (image, truth, prediction) into the run dir."""

    def __init__(self, out_dir: str, every_n_validations: int = 1) -> None:
        self.out_dir, self.every = Path(out_dir), every_n_validations
        self.count = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.count += 1
        kept = kept_examples(trainer)
        if not kept or self.count % self.every:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        overlay_grid(kept).save(self.out_dir / "overlays.png")


def kept_examples(trainer) -> list[tuple]:
    """The (sample, answer, predicted masks) triples ``SegmentationScoring`` kept in this validation."""
    scoring = next((c for c in trainer.callbacks if isinstance(c, SegmentationScoring)), None)
    return scoring.kept if scoring is not None else []


class WandbOverlays(L.Callback):
    """Every ``every_n_val`` validations, logs ``val/overlays`` to W&B: each kept example's image
    with its predicted and ground-truth masks as W&B mask layers (``prediction``,
    ``ground_truth``; mask k of a sample is class k + 1). Does nothing without a ``WandbLogger``.
    """

    def __init__(self, every_n_val: int = 1, key: str = "val/overlays") -> None:
        if every_n_val < 1:
            raise ValueError(f"callbacks.wandb_overlays.every_n_val must be >= 1, got {every_n_val}")
        self.every, self.key = every_n_val, key
        self.count = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.count += 1
        kept = kept_examples(trainer)
        if not kept or self.count % self.every:
            return
        images, masks, captions = [], [], []
        for sample, answer, preds in kept:
            shape, n = sample.masks[0].shape, max(len(sample.masks), len(preds))
            labels = {0: "background", **{k + 1: f"target {k + 1}" for k in range(n)}}
            layers = {"prediction": preds, "ground_truth": sample.masks}
            images.append(sample.image.convert("RGB"))
            masks.append(
                {k: {"mask_data": label_map(m, shape), "class_labels": labels} for k, m in layers.items()}
            )
            captions.append(f"{sample.prompt[-1]['content']} -> {mark_masks(answer)}")
        wandb_logger.log_image(self.key, images, step=trainer.global_step, masks=masks, caption=captions)


def label_map(masks: list, shape: tuple[int, int]) -> np.ndarray:
    """One uint8 image of ``masks``: 0 = background, k + 1 where mask k is set (later masks on top)."""
    out = np.zeros(shape, dtype=np.uint8)
    for k, m in enumerate(masks):
        out[np.asarray(m, dtype=bool)] = k + 1
    return out


class StepProgressBar(TQDMProgressBar):
    """A training bar that counts optimizer steps, ``global_step/max_steps``, across epochs and
    from the step a resumed run starts at. Runs without ``max_steps`` (epoch-based) keep
    Lightning's bar per epoch."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar, step = self.train_progress_bar, trainer.global_step
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = bar.last_print_n = step  # the rate counts this run's steps only
        bar.set_description("train step")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and bar.n != step and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class MetricsFile(L.Callback):
    """Writes every logged scalar to ``metrics.json`` after each validation and at the end of
    fitting (rank 0). A resumed run adds its values to the file's; an empty set of metrics (a
    resumed run that had nothing left to train) never replaces the file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.keep_old = True

    def on_fit_start(self, trainer, pl_module) -> None:
        self.keep_old = trainer.ckpt_path is not None  # a fresh run starts its own file

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        if trainer.is_global_zero and write_metrics(self.path, trainer.callback_metrics, self.keep_old):
            self.keep_old = True


def write_metrics(path: Path, metrics: dict, keep_old: bool = True) -> Path | None:
    """Write ``metrics`` as JSON, atomically (a crash leaves the old file or the new one, never a
    part). ``keep_old``: values of the existing file that ``metrics`` lacks stay. Nothing is
    written when ``metrics`` is empty (returns None)."""
    if not metrics:
        return None
    plain = {k: float(v) for k, v in metrics.items()}
    if keep_old and path.is_file():
        with contextlib.suppress(OSError, ValueError):  # an unreadable old file is replaced
            plain = {**json.loads(path.read_text()), **plain}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(sorted(plain.items())), indent=2) + "\n")
    os.replace(tmp, path)
    return path


class StepPerf(L.Callback):
    """Logs ``perf/step_s`` (wall time of each training step: forward, backward and optimizer)
    and ``perf/peak_rss_gib`` (the process's peak resident memory so far, as the kernel counts it).
    Add it with ``+callbacks.perf._target_=stamp.training.callbacks.StepPerf``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_s = time.perf_counter() - self.start
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
        pl_module.log_dict({"perf/step_s": step_s, "perf/peak_rss_gib": peak_gib}, batch_size=1)
