"""``stamp-sweep-report``: tabulate and plot the jobs of a sweep: a Hydra multirun
(``stamp-train -m ...``) or an Optuna study (``stamp-train hparams_search=optuna ...``).

Every job dir of a multirun holds ``.hydra/overrides.yaml`` (its settings) and, once its run has
finished, ``metrics.json``. An Optuna study is read from its storage (``--storage URL --study
NAME``, or found from the sweep dir's ``optimization_results.yaml`` / ``multirun.yaml``): one row
per trial with its parameters, its state (complete, pruned at step N, failed, running), and the
metrics of its job dir when that is at hand. The report writes ``sweep.md`` (one row per job, the
swept settings as columns, then the metrics, best first) and ``sweep.png`` (the first metric).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stamp.cli import user_errors
from stamp.utils.studies import TRIAL_KEY

DEFAULT_METRIC = "val/ciou_cell"


@dataclass
class Job:
    """One job of a sweep: its dir, its command-line overrides and its metrics (None = failed).

    ``state``: ``ok``, ``failed``, or for an Optuna trial also ``pruned`` (``stopped_at``: the
    step of its last reported value) and ``running``.
    """

    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, float] | None
    state: str = "ok"
    stopped_at: int | None = None

    @property
    def failed(self) -> bool:
        return self.metrics is None

    @property
    def status(self) -> str:
        if self.state == "pruned":
            return "pruned" if self.stopped_at is None else f"pruned at step {self.stopped_at}"
        if self.state == "ok" and self.failed:
            return "failed (no metrics.json)"
        return self.state

    def value(self, metric: str) -> float | None:
        return None if self.metrics is None else self.metrics.get(metric)


@dataclass
class Sweep:
    """The jobs of one multirun dir, and the settings that differ between them."""

    dir: Path
    jobs: list[Job]
    swept: list[str] = field(default_factory=list)  # override keys whose value differs between jobs
    common: dict[str, str] = field(default_factory=dict)  # overrides every job shares
    optimized_metric: str | None = None  # from the sweep's multirun.yaml
    direction: str | None = None  # "maximize" | "minimize", when the sweeper says
    study: str | None = None  # "<study name> in <storage>" for an Optuna study

    def metric_names(self) -> list[str]:
        return sorted({k for j in self.jobs if j.metrics for k in j.metrics})

    def maximize(self, metric: str) -> bool:
        """Whether higher ``metric`` is better: the sweeper's direction for the metric it
        optimised (an Optuna sweep states it), else lower for losses, higher for the rest."""
        if self.direction and metric == self.optimized_metric:
            return self.direction == "maximize"
        return "loss" not in metric


def parse_overrides(path: Path) -> dict[str, str]:
    """``key=value`` lines of a job's ``.hydra/overrides.yaml`` as a dict (values as written)."""
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of key=value overrides, got {type(items).__name__}")
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if key.lstrip("+").startswith(f"{TRIAL_KEY}."):
            continue  # which Optuna trial the job ran: the trial number says it
        out[key] = value if sep else ""  # `~key` (a deletion) has no value
    return out


def _job_order(job_dir: Path, root: Path) -> tuple:
    # numeric job dirs (hydra's default subdir is the job number) in numeric order
    parts = job_dir.relative_to(root).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def load_sweep(sweep_dir: str | Path | None, storage: str | None = None, study: str | None = None) -> Sweep:
    """Read a sweep: the Optuna study ``study`` in ``storage`` when given, or the one the
    sweep dir names; else every job of ``sweep_dir`` (each sub-dir, or sub-sub-dir, with
    ``.hydra/overrides.yaml``)."""
    if (storage is None) != (study is None):
        raise ValueError("give both --storage and --study (or neither, to read the sweep dir)")
    if storage is None and sweep_dir is not None:
        storage, study = study_of(Path(sweep_dir))
    if storage is not None:
        return load_study(storage, study, sweep_dir)
    if sweep_dir is None:
        raise ValueError("give a sweep dir, or --storage and --study for an Optuna study")
    root = Path(sweep_dir)
    if not root.exists():
        raise FileNotFoundError(f"sweep dir {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(
            f"{root} is not a directory (give the multirun dir, e.g. logs/train/multiruns/<date>)"
        )
    # hydra's sweep.subdir is the job number by default; allow one more level for custom subdirs
    found = [*root.glob("*/.hydra/overrides.yaml"), *root.glob("*/*/.hydra/overrides.yaml")]
    job_dirs = sorted({p.parent.parent for p in found}, key=lambda d: _job_order(d, root))
    if not job_dirs:
        raise ValueError(
            f"no jobs found under {root}: no <job dir>/.hydra/overrides.yaml "
            "(is this the dir a `stamp-train -m ...` run wrote?)"
        )
    jobs = []
    for d in job_dirs:
        metrics_file = d / "metrics.json"
        metrics = None
        if metrics_file.is_file():
            try:
                raw = json.loads(metrics_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{metrics_file} is not valid JSON ({e}); rerun that job or delete the file"
                ) from e
            if not isinstance(raw, dict):
                raise ValueError(f"{metrics_file}: expected a JSON object of metric: value")
            metrics = {str(k): float(v) for k, v in raw.items()}
        jobs.append(Job(d, parse_overrides(d / ".hydra" / "overrides.yaml"), metrics))
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in swept}
    if len(jobs) == 1:  # nothing differs; show the job's own settings
        swept, common = keys, {}
    sweep = Sweep(root, jobs, swept, common)
    # the basic sweeper writes multirun.yaml (config + hydra); the Optuna sweeper does not, but
    # every job keeps its own config.yaml and hydra.yaml
    hydra_dir = job_dirs[0] / ".hydra"
    for cfg_file in (root / "multirun.yaml", hydra_dir / "config.yaml", hydra_dir / "hydra.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
        if not isinstance(cfg, dict):
            continue
        sweep.optimized_metric = sweep.optimized_metric or cfg.get("optimized_metric")
        direction = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("direction")
        if isinstance(direction, str) and not sweep.direction:
            sweep.direction = direction
    return sweep


def _read_yaml(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    return cfg if isinstance(cfg, dict) else {}


def study_of(sweep_dir: Path) -> tuple[str | None, str | None]:
    """(storage, study name) of the Optuna study an ``hparams_search=optuna`` sweep dir ran, from
    its ``optimization_results.yaml`` or ``multirun.yaml``; (None, None) for another sweep."""
    results = _read_yaml(sweep_dir / "optimization_results.yaml")
    if results.get("storage") and results.get("study_name"):
        return str(results["storage"]), str(results["study_name"])
    sweeper = (_read_yaml(sweep_dir / "multirun.yaml").get("hydra") or {}).get("sweeper") or {}
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if "stamp_optuna_sweeper" in str(sweeper.get("_target_")) and storage and name:
        return str(storage), str(name)
    return None, None


def load_study(storage: str, study_name: str, sweep_dir: str | Path | None = None) -> Sweep:
    """One job per trial of Optuna study ``study_name``: its parameters, its state, and its
    metrics (the job dir's ``metrics.json`` when ``sweep_dir/<trial number>`` holds one, else the
    value the trial told the study, under the study's ``optimized_metric``)."""
    import optuna
    from optuna.trial import TrialState

    from stamp.utils.studies import open_storage

    if "://" not in storage and not Path(storage).expanduser().is_file():
        raise FileNotFoundError(f"storage {storage!r} is neither an RDB URL nor an existing journal file")
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError as e:
        raise ValueError(f"study {study_name!r} is not in storage {storage!r}") from e
    root = Path(sweep_dir) if sweep_dir is not None else Path(".")
    metric = study.user_attrs.get("optimized_metric") or DEFAULT_METRIC
    states = {
        TrialState.COMPLETE: "ok",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    jobs = []
    for t in study.get_trials(deepcopy=False):
        state = states[t.state]
        metrics = None
        if state in ("ok", "pruned"):
            metrics = {}
            value = (
                t.value
                if state == "ok"
                else (t.intermediate_values.get(t.last_step) if t.last_step is not None else None)
            )
            if value is not None:
                metrics[metric] = float(value)
            metrics_file = root / str(t.number) / "metrics.json"
            if sweep_dir is not None and metrics_file.is_file():
                metrics.update({str(k): float(v) for k, v in json.loads(metrics_file.read_text()).items()})
                if value is not None:
                    metrics[metric] = float(value)  # the value the study holds (pruned: last report)
        overrides = {k: str(v) for k, v in t.params.items()}
        jobs.append(
            Job(root / str(t.number), overrides, metrics, state, t.last_step if state == "pruned" else None)
        )
    if not jobs:
        raise ValueError(f"study {study_name!r} in {storage!r} has no trials yet")
    swept = list(dict.fromkeys(k for t in study.get_trials(deepcopy=False) for k in t.distributions))
    return Sweep(
        root,
        jobs,
        swept,
        {},
        optimized_metric=metric,
        direction=study.direction.name.lower(),
        study=f"{study_name} in {storage}",
    )


_STATE_ORDER = {"ok": 0, "pruned": 1, "running": 2, "waiting": 2, "failed": 3}


def ranked(sweep: Sweep, metric: str, maximize: bool) -> list[Job]:
    """Jobs best first by ``metric``: finished ones, then pruned trials (by their last value),
    then those without the value (failed, running, or not logged)."""

    def key(job: Job) -> tuple:
        v = job.value(metric)
        if v is None or math.isnan(v):
            return (2, 0, 0.0)
        return (0 if job.state == "ok" else 1, _STATE_ORDER.get(job.state, 3), -v if maximize else v)

    return sorted(sweep.jobs, key=key)  # stable: ties keep the job order


def check_metrics(sweep: Sweep, metrics: list[str]) -> None:
    names = sweep.metric_names()
    if not names:
        return  # every job failed: the table says so
    missing = [m for m in metrics if m not in names]
    if missing:
        raise ValueError(
            f"metric {missing[0]!r} is in no job's metrics.json under {sweep.dir}; available: {names}"
        )


def _cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.6g}"


def setting(job: Job, key: str) -> str:
    """A job's value of ``key`` for display: long floats (Optuna's samples) cut to 6 digits."""
    value = job.overrides.get(key, "")
    try:
        number = float(value)
    except ValueError:
        return value
    short = f"{number:.6g}"
    return short if len(short) < len(value) else value


def sweep_table(sweep: Sweep, metrics: list[str], maximize: bool | None = None) -> str:
    """The markdown table of ``sweep``: job, swept settings, ``metrics``; sorted by ``metrics[0]``."""
    if maximize is None:
        maximize = sweep.maximize(metrics[0])
    header = ["job", *sweep.swept, *metrics, "status"]
    rows = []
    for job in ranked(sweep, metrics[0], maximize):
        status = job.status
        missing = "failed" if job.state == "ok" else job.state  # no metrics: failed, or still running
        cells = [missing if job.failed else _cell(job.value(m)) for m in metrics]
        rows.append(
            [
                job.dir.relative_to(sweep.dir).as_posix(),
                *(setting(job, k) for k in sweep.swept),
                *cells,
                status,
            ]
        )

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def job_label(job: Job, keys: list[str]) -> str:
    return "\n".join(f"{k}={setting(job, k)}" for k in keys) or job.dir.name


def _sort_values(values: set[str]) -> list[str]:
    def key(v: str) -> tuple:
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(values, key=key)


def plot_sweep(sweep: Sweep, metric: str, ax=None):
    """Bars of ``metric``: grouped (first swept key on x, second as colours) when the sweep is a
    full two-key grid, else one bar per job labelled by its settings. Failed jobs are marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(sweep.jobs)), 4.0), layout="constrained")
    keys = sweep.swept
    grid = None
    if len(keys) == 2:
        xs, hues = (_sort_values({j.overrides.get(k, "") for j in sweep.jobs}) for k in keys)
        cells = {(j.overrides.get(keys[0], ""), j.overrides.get(keys[1], "")): j for j in sweep.jobs}
        if len(cells) == len(sweep.jobs):
            grid = (xs, hues, cells)
    if grid:
        xs, hues, cells = grid
        width = 0.8 / len(hues)
        for h, hue in enumerate(hues):
            pos = [i + (h - (len(hues) - 1) / 2) * width for i in range(len(xs))]
            jobs = [cells.get((x, hue)) for x in xs]
            values = [(j.value(metric) if j else None) for j in jobs]
            bars = ax.bar(pos, [v or 0.0 for v in values], width, label=f"{keys[1]}={hue}")
            ax.bar_label(bars, labels=[_cell(v) if v is not None else "" for v in values], fontsize=7)
            for p, j, v in zip(pos, jobs, values, strict=True):
                if j is not None and v is None:
                    ax.text(p, 0, "failed", rotation=90, ha="center", va="bottom", color="red", fontsize=8)
        ax.set_xticks(range(len(xs)), [f"{keys[0]}={x}" for x in xs])
        ax.legend(fontsize=8)
    else:
        values = [j.value(metric) for j in sweep.jobs]
        colors = ["tab:gray" if j.state == "pruned" else "tab:blue" for j in sweep.jobs]
        bars = ax.bar(range(len(sweep.jobs)), [v or 0.0 for v in values], color=colors)
        ax.bar_label(bars, labels=[_cell(v) if v is not None else "" for v in values], fontsize=7)
        for i, v in enumerate(values):
            if v is None:
                label = "failed" if sweep.jobs[i].state == "ok" else sweep.jobs[i].state
                ax.text(i, 0, label, rotation=90, ha="center", va="bottom", color="red", fontsize=8)
        ax.set_xticks(range(len(sweep.jobs)), [job_label(j, keys) for j in sweep.jobs], fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per job ({sweep.dir.name})", fontsize=9)
    return ax.figure


def write_report(
    sweep_dir: str | Path | None,
    metrics: list[str] | None = None,
    out: str | Path | None = None,
    maximize: bool | None = None,
    storage: str | None = None,
    study: str | None = None,
) -> tuple[Path, Path]:
    """Write ``sweep.md`` and ``sweep.png`` for the multirun in ``sweep_dir`` (or the Optuna
    study ``study`` in ``storage``); return their paths.

    ``metrics``: the first sorts the table and is plotted; default the sweep's optimized_metric.
    """
    import matplotlib.pyplot as plt

    if sweep_dir is None and out is None:
        raise ValueError("reading a study without its sweep dir: give --out for sweep.md and sweep.png")
    sweep = load_sweep(sweep_dir, storage, study)
    metrics = list(metrics or [sweep.optimized_metric or DEFAULT_METRIC])
    check_metrics(sweep, metrics)
    if maximize is None:
        maximize = sweep.maximize(metrics[0])
    out_dir = Path(out) if out is not None else sweep.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = [j for j in sweep.jobs if j.failed]
    counts = ""
    if sweep.study:
        pruned = sum(j.state == "pruned" for j in sweep.jobs)
        counts = f", {pruned} pruned"
    lines = [
        f"# Sweep {sweep.study or sweep.dir}",
        "",
        f"{len(sweep.jobs)} jobs, {sum(j.state != 'pruned' for j in failed)} failed{counts}; sorted by {metrics[0]} "
        f"({'higher' if maximize else 'lower'} is better).",
    ]
    if sweep.common:
        lines.append("Common overrides: " + " ".join(f"`{k}={v}`" for k, v in sweep.common.items()))
    lines += ["", sweep_table(sweep, metrics, maximize), ""]
    md = out_dir / "sweep.md"
    md.write_text("\n".join(lines))
    fig = plot_sweep(sweep, metrics[0])
    png = out_dir / "sweep.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="stamp-sweep-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        help="a multirun dir, e.g. logs/train/multiruns/<date> (an hparams_search=optuna one is "
        "read through its study)",
    )
    parser.add_argument("--storage", help="an Optuna study's storage: RDB URL or journal file")
    parser.add_argument("--study", help="the study's name (with --storage)")
    parser.add_argument(
        "--metric",
        action="append",
        help=f"metric to report (repeat for more; the first sorts and is plotted); "
        f"default: the sweep's optimized_metric, else {DEFAULT_METRIC}",
    )
    parser.add_argument("--out", help="where to write sweep.md and sweep.png (default: the sweep dir)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--maximize",
        dest="maximize",
        action="store_true",
        default=None,
        help="higher is better (default: the sweeper's direction, else lower only for losses)",
    )
    order.add_argument("--minimize", dest="maximize", action="store_false", help="lower is better")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    with user_errors(parser.prog):
        md, png = write_report(args.sweep_dir, args.metric, args.out, args.maximize, args.storage, args.study)
    print(md)
    print(png)


if __name__ == "__main__":
    main()
