"""``stamp-train``: compose the config, build data/model/callbacks/loggers/trainer, fit, report."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from stamp.cli import CONF_DIR
from stamp.model.build import save_stamp
from stamp.training.module import StampLitModule

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group such as ``callbacks`` or ``logger``."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; return the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    module = StampLitModule(cfg.model, cfg.optimizer, cfg.scheduler, cfg.generation)
    datamodule = instantiate(cfg.data, processor=module.processor)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # nothing to report a learning rate to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export") and trainer.is_global_zero:
        out = save_stamp(module.net, module.processor, Path(cfg.paths.output_dir) / "model")
        log.info("exported the trained model to %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    metrics = train(cfg)
    metrics_file = Path(cfg.paths.output_dir) / "metrics.json"
    if metrics_file.exists():
        print(metrics_file)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
