"""Sweeps: `stamp-train -m` runs every combination, each job in its own dir with its metrics
(one after another, or in parallel with `hydra/launcher=local_processes`); `stamp-sweep-report`
tabulates and plots them; `hparams_search=optuna` runs an Optuna study with pruning, resumable
from its storage."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

BIN = Path(sys.executable).parent
# the shrinking of tests/conftest.py::compose_cfg and the e2e training test, as CLI overrides
SMALL_JOB = [
    "trainer=cpu",
    "trainer.max_steps=2",
    "data.batch_size=4",
    "data.val.size=8",
    "data.eval_batch_size=8",
    "generation.max_new_tokens=4",
    "trainer.enable_progress_bar=false",
    "export=false",
]


def run_cli(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # the repository root on the path: jobs import tests.rendezvous
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def table_rows(md: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of the (only) markdown table in ``md``."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    header, rows = split[0], split[2:]  # split[1] is the --- line
    return header, [dict(zip(header, r, strict=True)) for r in rows]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_multirun_jobs_and_report(tiny_dir, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "stamp-train",
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "model.mask_positions=sequential,grid",
        f"hydra.sweep.dir={sweep}",
        f"paths.tiny_dir={tiny_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *SMALL_JOB,
        cwd=tmp_path,
    )
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name for d in jobs] == ["0", "1", "2", "3"]
    settings, metrics = {}, {}
    for d in jobs:
        cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        settings[d.name] = (float(cfg["optimizer"]["lr"]), cfg["model"]["mask_positions"])
        metrics[d.name] = json.loads((d / "metrics.json").read_text())  # each job wrote its own
        assert "val/ciou_cell" in metrics[d.name] and "train/loss" in metrics[d.name]
        assert (d / "checkpoints" / "last.ckpt").is_file()
    assert sorted(settings.values()) == sorted(itertools.product([1e-3, 2e-3], ["sequential", "grid"]))

    out = tmp_path / "report"
    run_cli(
        "stamp-sweep-report",
        str(sweep),
        "--metric",
        "train/loss",
        "--metric",
        "val/ciou_cell",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    header, rows = table_rows((out / "sweep.md").read_text())
    assert header == ["job", "optimizer.lr", "model.mask_positions", "train/loss", "val/ciou_cell", "status"]
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"]
    for r in rows:
        lr, positions = settings[r["job"]]
        assert float(r["optimizer.lr"]) == lr and r["model.mask_positions"] == positions
        for m in ("train/loss", "val/ciou_cell"):
            assert float(r[m]) == pytest.approx(metrics[r["job"]][m], rel=1e-5, abs=1e-9)
        assert r["status"] == "ok"
    losses = [float(r["train/loss"]) for r in rows]
    assert losses == sorted(losses)  # a loss: lowest (best) first
    assert_png(out / "sweep.png")


def write_job(root: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    write_job(
        root,
        "0",
        ["optimizer.lr=0.1", "model.mask_positions=grid", "trainer=cpu"],
        {"val/ciou_cell": 0.25, "train/loss": 2.0},
    )
    write_job(
        root,
        "1",
        ["optimizer.lr=0.2", "model.mask_positions=grid", "trainer=cpu"],
        {"val/ciou_cell": 0.5, "train/loss": 3.0},
    )
    write_job(root, "2", ["optimizer.lr=0.1", "model.mask_positions=sequential", "trainer=cpu"], None)
    write_job(
        root,
        "10",
        ["optimizer.lr=0.2", "model.mask_positions=sequential", "trainer=cpu"],
        {"val/ciou_cell": 0.125, "train/loss": 1.0},
    )
    (root / "multirun.yaml").write_text(
        "optimized_metric: val/ciou_cell\nhydra:\n  sweeper:\n    params: null\n"
    )
    return root


def test_report_on_a_fake_sweep(fake_sweep, tmp_path):
    from stamp.cli.sweep_report import load_sweep, main

    sweep = load_sweep(fake_sweep)
    assert [j.dir.name for j in sweep.jobs] == ["0", "1", "2", "10"]  # numeric order
    assert sweep.swept == ["optimizer.lr", "model.mask_positions"] and sweep.common == {"trainer": "cpu"}
    assert sweep.optimized_metric == "val/ciou_cell"

    main([str(fake_sweep)])  # default metric: the sweep's optimized_metric; default out: the sweep dir
    md = (fake_sweep / "sweep.md").read_text()
    header, rows = table_rows(md)
    assert header == ["job", "optimizer.lr", "model.mask_positions", "val/ciou_cell", "status"]
    assert [r["job"] for r in rows] == ["1", "0", "10", "2"]  # best first, the failed job last
    assert [r["val/ciou_cell"] for r in rows] == ["0.5", "0.25", "0.125", "failed"]
    assert rows[-1]["status"].startswith("failed") and rows[-1]["model.mask_positions"] == "sequential"
    assert "4 jobs, 1 failed" in md and "`trainer=cpu`" in md
    assert_png(fake_sweep / "sweep.png")

    out = tmp_path / "by_loss"
    main([str(fake_sweep), "--metric", "train/loss", "--out", str(out)])
    assert [r["job"] for r in table_rows((out / "sweep.md").read_text())[1]] == ["10", "0", "1", "2"]
    main([str(fake_sweep), "--metric", "train/loss", "--maximize", "--out", str(out)])
    assert [r["job"] for r in table_rows((out / "sweep.md").read_text())[1]] == ["1", "0", "10", "2"]


def test_report_uses_the_sweepers_direction(fake_sweep):
    from stamp.cli.sweep_report import load_sweep, sweep_table

    (fake_sweep / "multirun.yaml").write_text(
        "optimized_metric: val/ciou_cell\nhydra:\n  sweeper:\n    direction: minimize\n"
    )
    sweep = load_sweep(fake_sweep)
    assert sweep.direction == "minimize"
    assert [r["job"] for r in table_rows(sweep_table(sweep, ["val/ciou_cell"]))[1]] == ["10", "0", "1", "2"]
    # the direction is the optimised metric's; a loss reported beside it still sorts lowest first
    assert [r["job"] for r in table_rows(sweep_table(sweep, ["train/loss"]))[1]] == ["10", "0", "1", "2"]
    assert (
        not sweep.maximize("val/ciou_cell")
        and sweep.maximize("val/giou")
        and not sweep.maximize("train/loss")
    )


def test_report_errors(fake_sweep, tmp_path, capsys):
    from stamp.cli.sweep_report import main

    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    write_job(broken, "0", ["optimizer.lr=0.1"], None)
    (broken / "0" / "metrics.json").write_text('{"val/ciou_cell": 0.')
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(fake_sweep / "multirun.yaml")], "is not a directory"),
        ([str(tmp_path / "empty")], "no jobs found"),
        ([str(broken)], "0/metrics.json is not valid JSON"),
        (
            [str(fake_sweep), "--metric", "val/nope"],
            "'val/nope' is in no job's metrics.json under "
            + str(fake_sweep)
            + "; available: ['train/loss', 'val/ciou_cell']",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_optimized_value():
    from stamp.cli.train import optimized_value

    value = optimized_value({"val/ciou_cell": 0.5, "train/loss": 1.0}, "val/ciou_cell")
    assert value == 0.5 and type(value) is float
    assert optimized_value({"train/loss": 1.0}, None) is None
    with pytest.raises(ValueError, match=r"optimized_metric='val/ciou'.*\['train/loss', 'val/giou'\]"):
        optimized_value({"val/giou": 0.1, "train/loss": 1.0}, "val/ciou")


@pytest.mark.slow
def test_local_processes_launcher_runs_jobs_in_parallel(tiny_dir, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "stamp-train",
        "-m",
        "hydra/launcher=local_processes",
        "optimizer.lr=1e-3,2e-3",
        # both jobs must be running at once: each waits at its start for the other (jobs run
        # one after another would fail here after the timeout)
        "+hydra.callbacks.rendezvous._target_=tests.rendezvous.Rendezvous",
        f"+hydra.callbacks.rendezvous.dir={tmp_path / 'rendezvous'}",
        "+hydra.callbacks.rendezvous.parties=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.tiny_dir={tiny_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *SMALL_JOB,
        cwd=tmp_path,
    )
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert [d.name for d in jobs] == ["0", "1"]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran them
    assert len(list((tmp_path / "rendezvous" / "met").iterdir())) == 2  # each job saw the other
    lrs = {
        d.name: yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] for d in jobs
    }
    assert sorted(lrs.values()) == [1e-3, 2e-3]

    run_cli("stamp-sweep-report", str(sweep), cwd=tmp_path)
    header, rows = table_rows((sweep / "sweep.md").read_text())
    assert header == ["job", "optimizer.lr", "val/ciou_cell", "status"]
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    for r in rows:
        assert float(r["optimizer.lr"]) == lrs[r["job"]] and r["status"] == "ok"
        metrics = json.loads((sweep / r["job"] / "metrics.json").read_text())
        assert float(r["val/ciou_cell"]) == pytest.approx(metrics["val/ciou_cell"], rel=1e-5, abs=1e-9)


def test_optuna_search_composes(compose_cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.pruners import MedianPruner
    from optuna.samplers import TPESampler

    from hydra_plugins.stamp_optuna_sweeper.sweeper import StampOptunaSweeper, search_space

    cfg = compose_cfg(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.stamp_optuna_sweeper.sweeper.StampOptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/ciou_cell"
    assert sweeper.study_name == cfg.task_name and sweeper.storage.endswith("/optuna.journal")
    assert isinstance(instantiate(sweeper.sampler), TPESampler) and sweeper.sampler.seed == cfg.seed
    assert isinstance(instantiate(sweeper.pruner), MedianPruner)
    space, fixed = search_space([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(space) == {"optimizer.lr", "scheduler.warmup_ratio", "model.mask_positions"}
    for key in space:  # every searched key exists in the training config
        assert OmegaConf.select(cfg, key) is not None, key
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 5e-3, log=True)
    assert space["scheduler.warmup_ratio"] == FloatDistribution(0.0, 0.1)
    assert space["model.mask_positions"] == CategoricalDistribution(("sequential", "grid"))

    args = dict(
        study_name="s", direction="maximize", n_trials=2, n_jobs=1, sampler=None, params={}, storage=None
    )
    with pytest.raises(ValueError, match=r"hydra.sweeper.pruner is set but hydra.sweeper.storage is null"):
        StampOptunaSweeper(**{**args, "pruner": MedianPruner()})
    with pytest.raises(ValueError, match=r"hydra.sweeper.direction='max'"):
        StampOptunaSweeper(**{**args, "pruner": None, "direction": "max"})
    with pytest.raises(ValueError, match=r"hydra.sweeper.n_jobs=0"):
        StampOptunaSweeper(**{**args, "pruner": None, "n_jobs": 0})


def test_search_space_syntax():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.stamp_optuna_sweeper.sweeper import flatten_params, override_value, search_space

    space, fixed = search_space(
        [
            "a=interval(0, 1)",
            "b=int(interval(1, 10))",
            "c=tag(log, interval(1e-5, 1e-2))",
            "d=tag(log, int(interval(1, 64)))",
            "e=range(2, 11, 3)",
            "f=choice(x, 'y z', 3)",
            "+g=choice(true, false)",
            "h=7",
            "a=interval(0.5, 1)",  # a later line (the command line) wins
        ]
    )
    assert space == {
        "a": FloatDistribution(0.5, 1.0),
        "b": IntDistribution(1, 10),
        "c": FloatDistribution(1e-5, 1e-2, log=True),
        "d": IntDistribution(1, 64, log=True),
        "e": IntDistribution(2, 8, step=3),
        "f": CategoricalDistribution(("x", "y z", 3)),
        "+g": CategoricalDistribution((True, False)),
    }
    assert fixed == ["h=7"]
    assert flatten_params({"optimizer": {"lr": "interval(0, 1)"}, "x.y": "choice(1, 2)"}) == {
        "optimizer.lr": "interval(0, 1)",
        "x.y": "choice(1, 2)",
    }
    parser = OverridesParser.create()
    for value in [0.0, 3e-3, 1e-05, 5, True, None, "grid", "a b", "it's", "null", "sqlite:///x/y.db"]:
        assert parser.parse_override(f"k={override_value(value)}").value() == value
    for line, message in [
        ("a=tag(loog, interval(0, 1))", r"a: unknown tag\(s\) \['loog'\]"),
        ("a=tag(log, choice(1, 2))", "does not apply to a choice"),
        ("a=glob(*)", "is not a search dimension"),
    ]:
        with pytest.raises(ValueError, match=message):
            search_space([line])


def fake_study(root: Path) -> str:
    """A journal study as the sweeper leaves it: trial 0 complete, 1 pruned after two reports,
    2 failed, 3 complete; job dirs 0 and 1 with their metrics.json."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from stamp.utils.studies import open_storage

    storage = str(root / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="minimize")
    study.set_user_attr("optimized_metric", "train/loss")
    space = {"optimizer.lr": FloatDistribution(0.0, 1.0)}
    for lr, reports, end in [
        (0.1, {2: 3.0, 4: 2.0}, 2.0),
        (0.0, {2: 5.0, 4: 4.5}, TrialState.PRUNED),
        (0.5, {}, TrialState.FAIL),
        (0.2, {2: 2.5, 4: 1.5}, 1.5),
    ]:
        study.enqueue_trial({"optimizer.lr": lr})
        trial = study.ask(space)
        for step, value in reports.items():
            trial.report(value, step)
        if isinstance(end, TrialState):
            study.tell(trial, state=end)
        else:
            study.tell(trial, end)
    for number, metrics in [(0, {"train/loss": 2.25, "val/ciou_cell": 0.5}), (1, {"train/loss": 9.0})]:
        (root / str(number)).mkdir(parents=True)
        (root / str(number) / "metrics.json").write_text(json.dumps(metrics))
    return storage


def test_report_on_a_study(tmp_path, capsys):
    from stamp.cli.sweep_report import load_sweep, main

    root = tmp_path / "search"
    root.mkdir()
    storage = fake_study(root)
    (root / "optimization_results.yaml").write_text(yaml.safe_dump({"study_name": "s", "storage": storage}))
    sweep = load_sweep(root)  # the study is found from the sweep dir
    assert sweep.direction == "minimize" and sweep.optimized_metric == "train/loss"
    assert [(j.state, j.stopped_at) for j in sweep.jobs] == [
        ("ok", None),
        ("pruned", 4),
        ("failed", None),
        ("ok", None),
    ]
    main([str(root)])
    md = (root / "sweep.md").read_text()
    header, rows = table_rows(md)
    assert header == ["job", "optimizer.lr", "train/loss", "status"]
    assert [(r["job"], r["optimizer.lr"], r["train/loss"], r["status"]) for r in rows] == [
        ("3", "0.2", "1.5", "ok"),
        ("0", "0.1", "2", "ok"),  # the value told to the study, not metrics.json's
        ("1", "0", "4.5", "pruned at step 4"),  # its last report
        ("2", "0.5", "failed", "failed"),
    ]
    assert "4 jobs, 1 failed, 1 pruned" in md
    assert_png(root / "sweep.png")
    main([str(root), "--metric", "val/ciou_cell", "--out", str(tmp_path / "ciou")])  # from metrics.json
    rows = table_rows((tmp_path / "ciou" / "sweep.md").read_text())[1]
    assert rows[0]["job"] == "0" and rows[0]["val/ciou_cell"] == "0.5"

    out = tmp_path / "by_storage"  # no sweep dir: the study alone
    main(["--storage", storage, "--study", "s", "--out", str(out)])
    rows = table_rows((out / "sweep.md").read_text())[1]
    assert [(r["job"], r["status"]) for r in rows] == [
        ("3", "ok"),
        ("0", "ok"),
        ("1", "pruned at step 4"),
        ("2", "failed"),
    ]
    cases = [
        (["--storage", storage, "--out", str(out)], "give both --storage and --study"),
        (["--storage", storage, "--study", "nope", "--out", str(out)], "study 'nope' is not in storage"),
        (["--storage", str(tmp_path / "x.journal"), "--study", "s", "--out", str(out)], "neither an RDB URL"),
        (["--storage", storage, "--study", "s"], "give --out"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def study_trials(storage: str, name: str) -> list:
    import optuna

    from stamp.utils.studies import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()


@pytest.mark.slow
def test_optuna_study_prunes_a_hopeless_trial_and_resumes(tiny_dir, tmp_path):
    """lr=0 cannot lower the loss: the median pruner stops that trial at its first validation (of
    two); rerun on the same storage with a larger n_trials, the study goes on from trial 2."""
    from optuna.trial import TrialState

    sweep = tmp_path / "search"
    search = [
        "hparams_search=optuna",
        # TPE's seeded random start-up proposes 3e-3 for trial 0, 0.0 for 1 and 3e-3 for 2
        "hydra.sweeper.sampler.seed=0",
        "optimizer.lr=choice(0.0, 3e-3)",  # a search dimension on the command line
        "scheduler.warmup_ratio=0.0",  # fixed (the config searches these two)
        "model.mask_positions=grid",
        # the training loss moves within a few steps, the validation scores of the tiny model do not
        "optimized_metric=train/loss",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.pruner.n_startup_trials=1",
        f"hydra.sweep.dir={sweep}",  # the storage is <sweep dir>/optuna.journal
        f"paths.tiny_dir={tiny_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *SMALL_JOB,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",  # validations at steps 2 and 4
        "data.batch_size=2",
        "data.val.size=2",
        "data.eval_batch_size=2",
    ]
    run_cli("stamp-train", *search, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    storage = str(sweep / "optuna.journal")
    first = study_trials(storage, "train")
    assert [t.params["optimizer.lr"] for t in first] == [3e-3, 0.0]
    done, pruned = first
    assert done.state == TrialState.COMPLETE and sorted(done.intermediate_values) == [2, 4]
    assert pruned.state == TrialState.PRUNED and sorted(pruned.intermediate_values) == [2]  # not 4
    assert pruned.intermediate_values[2] > done.intermediate_values[2]
    loss = json.loads((sweep / "0" / "metrics.json").read_text())["train/loss"]
    assert done.value == pytest.approx(loss)  # what stamp-train returned
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optimizer.lr": 3e-3} and results["best_value"] == pytest.approx(loss)
    assert (results["complete"], results["pruned"], results["failed"]) == (1, 1, 0)
    assert not (sweep / "1" / "model").exists()  # a pruned trial exports nothing

    run_cli("stamp-train", *search, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    trials = study_trials(storage, "train")
    assert [t.number for t in trials] == [0, 1, 2]  # continued, not started over
    assert [(t.state, t.value, t.params) for t in trials[:2]] == [(t.state, t.value, t.params) for t in first]
    assert trials[2].state == TrialState.COMPLETE and sorted(trials[2].intermediate_values) == [2, 4]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (results["n_trials"], results["complete"], results["pruned"]) == (3, 2, 1)

    run_cli("stamp-sweep-report", str(sweep), cwd=tmp_path)
    rows = table_rows((sweep / "sweep.md").read_text())[1]
    assert {r["job"]: r["status"] for r in rows} == {"0": "ok", "1": "pruned at step 2", "2": "ok"}


def test_optuna_failed_trials_are_recorded(tmp_path):
    """A trial whose job raises is told to the study as failed, and the search goes on."""
    sweep = tmp_path / "search"
    run_cli(
        "stamp-train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=choice(1e-3, 2e-3)",
        f"hydra.sweep.dir={sweep}",
        f"paths.tiny_dir={tmp_path / 'no-such-model'}",  # every job fails loading it:
        "model.tiny_family=null",  # it is not built on first use
        f"paths.log_dir={tmp_path / 'logs'}",
        *SMALL_JOB,
        cwd=tmp_path,
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (results["n_trials"], results["complete"], results["failed"]) == (2, 0, 2)
    assert "best_params" not in results


def test_submitit_job_refuses_lightning_launched_ranks(monkeypatch):
    import lightning as L

    from stamp.training.distributed import check_submitit_launch

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    check_submitit_launch(trainer)  # outside submitit: Lightning may start the ranks
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match=r"hydra/launcher=slurm job with trainer.devices=2.*tasks_per_node"):
        check_submitit_launch(trainer)
    check_submitit_launch(L.Trainer(accelerator="cpu", devices=1, logger=False))  # one rank: fine


def test_launcher_configs_compose(compose_cfg):
    cfg = compose_cfg(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "trainer=ddp",
            "trainer.devices=${hydra.launcher.gpus_per_node}",
            "trainer.num_nodes=${hydra.launcher.nodes}",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2
    local = compose_cfg(["hydra/launcher=local_processes", "hparams_search=optuna"]).hydra
    assert local.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert local.sweeper._target_.endswith("stamp_optuna_sweeper.sweeper.StampOptunaSweeper")
