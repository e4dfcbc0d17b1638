"""Weights & Biases: offline or online, run naming and grouping, one run per job.

``conf/logger/wandb.yaml`` builds Lightning's ``WandbLogger``; its keys left ``null`` there are
filled in by ``wandb_init_args`` from the composed config:

* ``offline``: offline when no API key is configured (neither ``WANDB_API_KEY`` nor a
  ``.netrc`` entry for the W&B host), online otherwise; an explicit ``WANDB_MODE`` wins.
* ``group``: ``task_name``, plus the sweep directory's name in a multirun, so the jobs of one
  sweep sit together; ``name``: the job's command-line overrides (and its number in a sweep);
  ``job_type``: the Hydra job (the entry point, e.g. ``train``).

``log_run_config`` then sets the run's config: the resolved config, plus ``model/params_total``
and ``model/params_trainable`` (also in the run summary).

A ``WandbLogger`` attaches to ``wandb.run`` when one is open, so each job must close its own
run (``finish_wandb``), or every job of a multirun would log into the first job's run.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
# hosts whose .netrc entry wandb uses when WANDB_BASE_URL is unset (wandb 0.31's default host
# proxies api.wandb.ai and accepts its key)
DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def api_key_configured() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY`` or a ``.netrc`` entry for the host.

    Reads the environment and the netrc file only (no network, no login prompt).
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    hosts = (urlsplit(base).netloc,) if base else DEFAULT_HOSTS
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        entries = netrc.netrc(path)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any((entry := entries.authenticators(h)) and entry[2] for h in hosts)


def wandb_mode(offline: bool | None = None) -> str:
    """``offline`` or ``online`` (or the user's ``WANDB_MODE``) for a run.

    Args:
        offline: True/False forces the mode; None decides: ``WANDB_MODE`` if set, else online
            exactly when an API key is configured.
    """
    if offline is not None:
        return "offline" if offline else "online"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if api_key_configured() else "offline"


def is_wandb_entry(entry: Any) -> bool:
    return isinstance(entry, DictConfig) and entry.get("_target_") == WANDB_LOGGER


def _hydra(cfg: DictConfig) -> Any:
    """The Hydra config of this job: the running app's, else the one ``compose`` returned."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else cfg.get("hydra")


def run_names(cfg: DictConfig) -> dict[str, str | None]:
    """``group``, ``name`` and ``job_type`` of the W&B run of this job."""
    hydra = _hydra(cfg)
    group, name, job_type = str(cfg.get("task_name") or "train"), None, None
    if hydra is not None:
        overrides = OmegaConf.select(hydra, "job.override_dirname", default=None) or None
        job_type = OmegaConf.select(hydra, "job.name", default=None)
        num = OmegaConf.select(hydra, "job.num", default=None)
        if str(OmegaConf.select(hydra, "mode", default="")).endswith("MULTIRUN"):
            group = f"{group}/{Path(str(hydra.sweep.dir)).name}"
            name = f"{num}:{overrides}" if overrides else f"job{num}"
        else:
            name = overrides
    return {"group": group, "name": name, "job_type": job_type}


def wandb_init_args(entry: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """Values for the keys of a ``WandbLogger`` entry that are left null (``{}`` for other loggers)."""
    if not is_wandb_entry(entry):
        return {}
    mode = wandb_mode(entry.get("offline"))
    args: dict[str, Any] = {"offline": mode in ("offline", "dryrun"), "mode": mode}
    args.update({k: v for k, v in run_names(cfg).items() if entry.get(k) is None})
    log.info("W&B: %s run, group %s, name %s", mode, args.get("group"), args.get("name"))
    return args


@rank_zero_only
def log_run_config(loggers: Sequence[Any], cfg: DictConfig, model: Any) -> None:
    """W&B runs: the resolved config (without ``hydra``) as the run config, and the model's
    ``model/params_total`` and ``model/params_trainable`` in the config and the summary."""
    from lightning.pytorch.loggers import WandbLogger

    from stamp.model.budget import count_parameters

    runs = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not runs:
        return
    config = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    total, trainable = count_parameters(model)
    sizes = {"model/params_total": total, "model/params_trainable": trainable}
    for lg in runs:
        lg.log_hyperparams({**config, **sizes})
        lg.experiment.summary.update(sizes)


def finish_wandb(loggers: Sequence[Any], failed: bool = False) -> None:
    """Close this job's W&B run (if a ``WandbLogger`` opened one), so the next job gets its own."""
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
