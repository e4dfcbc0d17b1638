"""The LightningModule: STAMP's losses in training, end-to-end generation in validation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from stamp.inference.generate import generate_with_masks, generation_config
from stamp.model.build import build_stamp


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def param_groups(net: torch.nn.Module, multipliers: Mapping[str, float], lr: float) -> list[dict]:
    """The trainable parameters in one optimizer group per learning rate (``lr`` times the factor
    of the first regex in ``multipliers`` that matches the parameter's name, else ``lr``)."""
    patterns = {key: re.compile(key) for key in multipliers}
    groups: dict[float, list[torch.nn.Parameter]] = {}
    matched = dict.fromkeys(multipliers, 0)
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k, rx in patterns.items() if rx.search(name)), None)
        if key is not None:
            matched[key] += 1
        groups.setdefault(float(multipliers[key]) if key is not None else 1.0, []).append(p)
    unused = [k for k, n in matched.items() if n == 0]
    if unused:
        raise ValueError(f"optimizer.lr_multipliers: no trainable parameter name matches {unused}")
    return [{"params": ps, "lr": lr * f} for f, ps in groups.items()]


class StampLitModule(L.LightningModule):
    """Args:
    model: the model config (``conf/model/*.yaml``), see ``stamp.model.build.build_stamp``.
    optimizer: a ``_target_`` config of a torch optimizer (``params`` are filled in here), plus
        ``lr_multipliers``: ``{regex: factor}``; a trainable parameter whose name matches a regex
        (``re.search``, the first that matches) learns at ``factor`` times ``lr``.
    scheduler: ``warmup_ratio`` (or ``warmup_steps``) of a linear warm-up, then linear decay to 0.
    generation: ``generation.*`` settings of validation's generated answers (``conf/generation/``).
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
        self.generation = generation_config(self.hparams.generation, self.processor.tokenizer)
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
        rows = generate_with_masks(self.net, batch, self.processor.tokenizer, self.generation)
        return {"rows": rows}

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        groups = param_groups(self.net, opt_cfg.pop("lr_multipliers", None) or {}, opt_cfg["lr"])
        optimizer = get_class(opt_cfg.pop("_target_"))(groups, **opt_cfg)
        sched = self.hparams.scheduler or {}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(sched.get("warmup_steps") or round(sched.get("warmup_ratio", 0.0) * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
