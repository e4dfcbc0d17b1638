# ruff: noqa: UP006, UP045
"""The sweeper's config schema, registered as ``hydra/sweeper=stamp_optuna``.

The values a search uses live in ``conf/hparams_search/optuna.yaml``; these are neutral fallbacks.
"""

# no `from __future__ import annotations`: Hydra's plugin scan loads this module outside
# sys.modules, where dataclasses cannot resolve string annotations (hence Optional/Dict too)
from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # noqa: UP035

from hydra.core.config_store import ConfigStore


@dataclass
class StampOptunaSweeperConf:
    _target_: str = "hydra_plugins.stamp_optuna_sweeper.sweeper.StampOptunaSweeper"
    # study name; several workers (processes, cluster jobs) with the same name and storage share it
    study_name: Optional[str] = None
    # null: in memory (one process, no pruning); an RDB URL (sqlite:///optuna.db,
    # postgresql://...); or any other string: the path of an Optuna journal file
    storage: Optional[str] = None
    direction: str = "maximize"
    # trials the study should hold in the end (finished or running, over all workers and reruns)
    n_trials: int = 20
    # trials launched at once: one launcher batch (parallel with a parallel launcher)
    n_jobs: int = 1
    sampler: Any = None  # {_target_: optuna.samplers..., ...}; null: Optuna's default (TPE)
    pruner: Any = None  # {_target_: optuna.pruners..., ...}; null: no pruning
    # search space in Hydra's sweep syntax, e.g. {optimizer.lr: "tag(log, interval(1e-5, 1e-3))"}
    params: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="stamp_optuna", node=StampOptunaSweeperConf, provider="stamp"
)
