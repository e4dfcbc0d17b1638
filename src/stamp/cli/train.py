"""``stamp-train``: compose the config, build data/model/callbacks/loggers/trainer, fit, report."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from stamp.cli import CONF_DIR, user_errors
from stamp.model.build import save_stamp
from stamp.training.callbacks import StepProgressBar
from stamp.training.distributed import (
    check_export,
    check_submitit_launch,
    end_distributed_job,
    pin_run_dir_for_children,
)
from stamp.training.module import StampLitModule
from stamp.training.resume import resolve_ckpt_path
from stamp.training.search import pruning_callback
from stamp.training.tracking import finish_wandb, log_run_config, wandb_init_args
from stamp.utils.config import check_arguments

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None, extra: Callable[[DictConfig], dict] | None = None) -> list:
    """Instantiate every entry of a config group such as ``callbacks`` or ``logger``
    (``extra(entry)``: more keyword arguments for an entry)."""
    if not group:
        return []
    entries = [c for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]
    return [instantiate(c, **(extra(c) if extra else {})) for c in entries]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; return the final logged metrics."""
    if is_dry_run(cfg):
        from stamp.model.budget import dry_run

        model, trainer = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "trainer"))
        return dry_run(model, trainer)
    ckpt_path = resolve_ckpt_path(cfg)
    check_arguments(cfg.data, "data")
    L.seed_everything(cfg.seed, workers=True)
    module = StampLitModule(cfg.model, cfg.optimizer, cfg.scheduler, cfg.generation)
    datamodule = instantiate(cfg.data, processor=module.processor)
    loggers = instantiate_group(cfg.get("logger"), lambda c: wandb_init_args(c, cfg))
    log_run_config(loggers, cfg, module.net)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # nothing to report a learning rate to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    pruning = pruning_callback(cfg)  # a trial of an Optuna search reports to its study
    if pruning is not None:
        callbacks.append(pruning)
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())  # step/max_steps rather than Lightning's per-epoch count
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_export(trainer, bool(cfg.get("export")))
    check_submitit_launch(trainer)
    launch_env = pin_run_dir_for_children()  # the ranks a ddp launcher starts write to this run's dir
    failed = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if ckpt_path and not validated(trainer) and trainer.limit_val_batches != 0:
            # resumed after its last step (killed during the final validation, or a finished run
            # started again by auto_resume): nothing was left to train, so validate the model now
            log.info("training ended at step %d; validating the trained model", trainer.global_step)
            trainer.validate(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if pruning is not None and pruning.pruned_at is not None:
            import optuna

            failed = False
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")  # the sweeper records it
        if cfg.get("export") and trainer.is_global_zero:
            out = save_stamp(module.net, module.processor, Path(cfg.paths.output_dir) / "model")
            log.info("exported the trained model to %s", out)
            if cfg.get("export_marker"):
                write_marker(Path(cfg.export_marker), out)
        failed = False
    finally:
        finish_wandb(loggers, failed)  # each job of a multirun logs into its own W&B run
        end_distributed_job(launch_env)  # the next job of a multirun starts its own process group
    return metrics


def write_marker(marker: Path, model_dir: Path) -> None:
    """Write ``model_dir``'s absolute path into ``marker`` (atomically: a reader sees the old
    path or the new one)."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(f"{model_dir.resolve()}\n")
    os.replace(tmp, marker)
    log.info("wrote the model's path to %s", marker)


def validated(trainer: L.Trainer) -> bool:
    """Whether this process logged validation metrics (``val/...``)."""
    return any(k.startswith("val/") for k in trainer.callback_metrics)


def is_dry_run(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "train.dry_run", default=False))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors("stamp-train"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
        metrics = train(cfg)
        if is_dry_run(cfg):
            return None
        metrics_file = Path(cfg.paths.output_dir) / "metrics.json"
        if metrics_file.exists():
            print(metrics_file)
        return optimized_value(metrics, cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value of ``optimized_metric`` for a sweeper (``None`` when no metric is named)."""
    if not name:
        return None
    if name not in metrics:
        raise ValueError(
            f"optimized_metric={name!r} was not logged by this run; "
            f"logged metrics: {sorted(metrics) or 'none'} (set optimized_metric to one of them)"
        )
    return float(metrics[name])


if __name__ == "__main__":
    main()
