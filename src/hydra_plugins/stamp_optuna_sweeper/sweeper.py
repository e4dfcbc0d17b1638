"""A Hydra sweeper that runs an Optuna study: ask for trials, launch them, tell their results.

Each batch of ``n_jobs`` trials goes to Hydra's launcher (the basic one, or submitit's
``hydra/launcher=local_processes`` / ``slurm``), one job per trial. A job learns which trial it
runs from the overrides ``+optuna_trial.{study,storage,number}``, so that ``stamp-train`` can
report the validation metric to that trial and stop when the pruner says so (the job then
raises ``optuna.TrialPruned``). ``n_trials`` is the number of trials the study should hold in
the end: a rerun on the same storage, or another worker on it, launches only the missing ones.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from stamp.utils.studies import TRIAL_KEY, open_storage  # light: Optuna is imported when used

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")  # a string Hydra reads back unchanged without quotes


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """``hydra.sweeper.params`` as ``{key: sweep expression}``; nested dicts (which a command-line
    ``hydra.sweeper.params.optimizer.lr=...`` creates) are joined with dots."""
    if params is None:
        return {}
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, dict):
        raise ValueError(f"hydra.sweeper.params must be a mapping of key: sweep, got {params!r}")
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def distribution(override: Override):
    """The Optuna distribution of one sweep override (``interval``, ``int(interval)``, ``range``,
    ``choice``, with ``tag(log, ...)`` for a log scale)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    tags = set(getattr(value, "tags", ()) or ())
    unknown = tags - {"log"}
    if unknown:
        raise ValueError(
            f"hydra.sweeper.params.{key}: unknown tag(s) {sorted(unknown)}; only `log` is understood"
        )
    log_scale = "log" in tags
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, RangeSweep):
        if value.step is None or value.step <= 0 or value.stop <= value.start:
            raise ValueError(f"hydra.sweeper.params.{key}: {override.input_line!r} is empty or descending")
        count = math.ceil((value.stop - value.start) / value.step)
        high = value.start + value.step * (count - 1)
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, high, step=value.step, log=log_scale)
        if log_scale:
            raise ValueError(f"hydra.sweeper.params.{key}: tag(log, ...) needs an interval or an int range")
        return FloatDistribution(float(value.start), float(high), step=float(value.step))
    if isinstance(value, ChoiceSweep):
        if log_scale:
            raise ValueError(f"hydra.sweeper.params.{key}: tag(log, ...) does not apply to a choice")
        for v in value.list:
            if isinstance(v, (list, dict)):
                raise ValueError(f"hydra.sweeper.params.{key}: choice values must be plain values, got {v!r}")
        return CategoricalDistribution(tuple(value.list))
    raise ValueError(
        f"hydra.sweeper.params.{key}: {override.input_line!r} is not a search dimension "
        "(use interval(a, b), int(interval(a, b)), range(a, b[, step]), choice(...), tag(log, ...))"
    )


def search_space(lines: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` lines in Hydra's override syntax -> (Optuna distributions by key, fixed
    overrides). A later line for the same key wins (command-line overrides beat the config's)."""
    by_key: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        by_key[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in by_key.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line or f"{key}={override.value()}")
    return space, fixed


def override_value(value: Any) -> str:
    """``value`` written so that Hydra's override parser reads it back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in {"null", "true", "false"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class StampOptunaSweeper(Sweeper):
    """``hydra/sweeper=stamp_optuna``: see ``config.py`` for the settings."""

    def __init__(
        self,
        study_name: str | None,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        pruner: Any,
        params: Any,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r}; expected one of {DIRECTIONS}")
        for name, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"hydra.sweeper.{name}={value!r}; expected a positive integer")
        if pruner is not None and storage is None:
            raise ValueError(
                "hydra.sweeper.pruner is set but hydra.sweeper.storage is null: trials report to the "
                "study from their own jobs, so give a storage (a journal file path or sqlite:///optuna.db)"
            )
        if storage is not None and not study_name:
            raise ValueError(
                f"hydra.sweeper.study_name is empty with storage={storage!r}: name the study so that "
                "reruns and other workers find it"
            )
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.pruner = pruner
        self.params = flatten_params(params)
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def storage_spec(self) -> str | None:
        """The storage as the jobs get it: a journal path made absolute (jobs may run elsewhere)."""
        if self.storage is None or "://" in str(self.storage):
            return self.storage
        return str(Path(str(self.storage)).expanduser().resolve())

    def load_study(self):
        import optuna

        spec = self.storage_spec()
        return optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(spec) if spec is not None else None,
            sampler=self.sampler,
            pruner=self.pruner,
            direction=self.direction,
            load_if_exists=True,
        )

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        space, fixed = search_space([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        if not space:
            raise ValueError(
                "hydra.sweeper.params holds no search dimension (interval/choice/range) and the "
                "command line gives none: nothing to search"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolves ${now:} once for every job
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self.load_study()
        spec = self.storage_spec()
        metric = OmegaConf.select(self.config, "optimized_metric", default=None)
        if metric and study.user_attrs.get("optimized_metric") != metric:
            study.set_user_attr("optimized_metric", str(metric))  # for stamp-sweep-report
        self._save_multirun(sweep_dir, study.study_name, spec)
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        before = len(study.get_trials(deepcopy=False, states=counted))
        log.info(
            "Optuna study %r (%s): %d of %d trials there already; searching %s",
            study.study_name,
            spec or "in memory",
            before,
            self.n_trials,
            ", ".join(space),
        )
        while True:
            missing = self.n_trials - len(study.get_trials(deepcopy=False, states=counted))
            if missing <= 0:
                break
            trials = [study.ask(space) for _ in range(min(self.n_jobs, missing))]
            batch = [self._job_overrides(t, fixed, study.study_name, spec) for t in trials]
            try:
                self.validate_batch_is_legal(batch)  # a config error: stop here, not in every job
            except Exception:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)  # not left `running` in the storage
                raise
            try:
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            except Exception as e:  # the launcher lost the jobs (killed, timed out): count them failed
                log.error("launching trials %s failed: %s", [t.number for t in trials], e)
                returns = [None] * len(trials)
            self.job_idx += len(trials)
            for trial, ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret)
        return self._write_results(study, sweep_dir, spec)

    def _job_overrides(self, trial, fixed: list[str], study_name: str, spec: str | None) -> list[str]:
        out = [*fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items())]
        out.append(f"hydra.sweep.subdir={trial.number}")  # job dir = trial number, unique across workers
        if spec is not None:  # the job reports to its trial (needs a storage it can open)
            out += [
                f"+{TRIAL_KEY}.study={override_value(study_name)}",
                f"+{TRIAL_KEY}.storage={override_value(spec)}",
                f"+{TRIAL_KEY}.number={trial.number}",
            ]
        return out

    def _tell(self, study, trial, ret: JobReturn | None) -> None:
        import optuna
        from optuna.trial import TrialState

        name = f"trial {trial.number} ({', '.join(f'{k}={v}' for k, v in trial.params.items())})"
        if ret is None:
            study.tell(trial, state=TrialState.FAIL)
            return
        value = ret._return_value  # read directly: JobReturn.return_value re-raises a job's error
        if ret.status == JobStatus.COMPLETED:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if math.isnan(number):
                log.error("%s returned %r, not a number: counted as failed", name, value)
                study.tell(trial, state=TrialState.FAIL)
                return
            study.tell(trial, number)
            log.info("%s: %s", name, number)
        elif isinstance(value, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("%s: pruned (%s)", name, value)
        else:
            log.error("%s failed: %s: %s (the sweep goes on)", name, type(value).__name__, value)
            study.tell(trial, state=TrialState.FAIL)

    def _save_multirun(self, sweep_dir: Path, study_name: str, spec: str | None) -> None:
        # like Hydra's basic sweeper, plus the study's resolved name and storage for the report
        cfg = OmegaConf.create(OmegaConf.to_container(self.config, resolve=False))
        cfg.hydra.sweeper.study_name = study_name
        cfg.hydra.sweeper.storage = spec
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")

    def _write_results(self, study, sweep_dir: Path, spec: str | None) -> dict[str, Any]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        results: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": spec,
            "direction": self.direction,
            "n_trials": len(trials),
            "complete": counts["complete"],
            "pruned": counts["pruned"],
            "failed": counts["fail"],
            "running": counts["running"],
        }
        if counts["complete"]:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=dict(best.params))
        else:
            log.warning("no trial of study %r completed: no best parameters", study.study_name)
        path = sweep_dir / "optimization_results.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
        log.info(
            "study %r: %d complete, %d pruned, %d failed; best %s",
            study.study_name,
            counts["complete"],
            counts["pruned"],
            counts["fail"],
            {k: results[k] for k in ("best_value", "best_params") if k in results} or "none",
        )
        return results
