"""A training run as one trial of an Optuna study (``hparams_search=optuna``).

The sweeper tells each job its trial with ``optuna_trial.{study,storage,number}``. After every
validation, ``OptunaPruning`` reports the optimised metric at the current step to that trial and
asks the study's pruner whether to go on. When the pruner says stop, every rank stops at the
same point (the decision is rank 0's, broadcast), training ends as after early stopping, and
``train`` raises ``optuna.TrialPruned``, which the sweeper records as a pruned trial.
"""

from __future__ import annotations

import logging
import math

import lightning as L
from omegaconf import DictConfig

from stamp.utils.studies import TRIAL_KEY, load_trial

log = logging.getLogger(__name__)


class OptunaPruning(L.Callback):
    """Report ``metric`` to Optuna trial ``number`` after each validation; stop when pruned.

    ``pruner``: the sweeper's pruner (None: report only). ``pruned_at``: the global step at which
    the pruner stopped the run, else None.
    """

    def __init__(self, storage: str, study: str, number: int, metric: str, pruner=None) -> None:
        self.storage, self.study, self.number, self.metric = storage, study, int(number), metric
        self.pruner = pruner
        self.pruned_at: int | None = None
        self.last_value: float | None = None
        self._trial = None

    def trial(self):
        if self._trial is None:  # opened on first use, on rank 0 only
            self._trial = load_trial(self.storage, self.study, self.number, self.pruner)
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        step = trainer.global_step
        if self.metric not in trainer.callback_metrics:  # on every rank, so that none waits below
            raise ValueError(
                f"optimized_metric={self.metric!r} was not logged at validation (step {step}); "
                f"logged: {sorted(trainer.callback_metrics)}"
            )
        prune = False
        if trainer.is_global_zero:
            value = float(trainer.callback_metrics[self.metric])
            self.last_value = value
            trial = self.trial()
            if not math.isnan(value):  # Optuna refuses NaN intermediate values; the pruner sees none
                trial.report(value, step)
            prune = trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = step
            trainer.should_stop = True
            log.info("trial %d pruned at step %d (%s=%s)", self.number, step, self.metric, self.last_value)


def pruning_callback(cfg: DictConfig) -> OptunaPruning | None:
    """The callback for a job the Optuna sweeper launched (``cfg.optuna_trial`` set), else None.

    The pruner is the sweeper's (``hydra.sweeper.pruner``; Optuna keeps none in the storage).
    """
    trial = cfg.get(TRIAL_KEY)
    if not trial:
        return None
    missing = [k for k in ("study", "storage", "number") if trial.get(k) is None]
    if missing:
        raise ValueError(f"{TRIAL_KEY} lacks {missing}: it needs study, storage and number")
    if not cfg.get("optimized_metric"):
        raise ValueError(f"{TRIAL_KEY} is set but optimized_metric is empty: name the metric to report")
    return OptunaPruning(trial.storage, trial.study, trial.number, cfg.optimized_metric, sweeper_pruner())


def sweeper_pruner():
    """The pruner of the sweep this job belongs to (``hydra.sweeper.pruner``), or None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if not HydraConfig.initialized():
        return None
    pruner = HydraConfig.get().sweeper.get("pruner")
    return instantiate(pruner) if pruner else None
