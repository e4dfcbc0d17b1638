"""The LightningModule: STAMP's losses in training, end-to-end generation in validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stamp.inference.generate import generate_with_masks
from stamp.model.build import build_stamp


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class StampLitModule(L.LightningModule):
    """Args:
    model: the model config (``conf/model/*.yaml``), see ``stamp.model.build.build_stamp``.
    optimizer: a ``_target_`` config of a torch optimizer (``params`` are filled in here).
    scheduler: ``warmup_ratio`` (or ``warmup_steps``) of a linear warm-up, then linear decay to 0.
    generation: ``max_new_tokens`` for validation's generated answers.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        generation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "model": _plain(model),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "generation": _plain(generation),
            }
        )
        self.net, self.processor = build_stamp(self.hparams.model)
        self.net.train()  # from_pretrained leaves the backbone in eval mode (dropout off)
        self.skipped = 0  # training samples replaced because their image or mask was unreadable

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.net(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/loss_lm", out.loss_lm, batch_size=bs)
        self.log("train/loss_seg", out.loss_seg, prog_bar=True, batch_size=bs)
        self.skipped += int(batch.get("skipped", 0))
        self.log("data/skipped", float(self.skipped), batch_size=bs)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        gen = self.hparams.generation or {}
        rows = generate_with_masks(self.net, batch, self.processor.tokenizer, gen.get("max_new_tokens", 32))
        return {"rows": rows}

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer, params=params)
        sched = self.hparams.scheduler or {}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(sched.get("warmup_steps") or round(sched.get("warmup_ratio", 0.0) * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
