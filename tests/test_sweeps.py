"""Sweeps: `stamp-train -m` runs every combination, each job in its own dir with its metrics;
`stamp-sweep-report` tabulates and plots them; `hparams_search=optuna` composes and runs."""

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
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
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


def test_optuna_search_composes(compose_cfg):
    from hydra.utils import instantiate
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution, UniformDistribution
    from optuna.samplers import TPESampler

    cfg = compose_cfg(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/ciou_cell"
    assert isinstance(instantiate(sweeper.sampler), TPESampler) and sweeper.sampler.seed == cfg.seed
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(space) == {"optimizer.lr", "scheduler.warmup_ratio", "model.mask_positions"}
    for key in space:  # every searched key exists in the training config
        assert OmegaConf.select(cfg, key) is not None, key
    assert isinstance(space["optimizer.lr"], LogUniformDistribution)
    assert isinstance(space["scheduler.warmup_ratio"], UniformDistribution)
    assert space["model.mask_positions"] == CategoricalDistribution(("sequential", "grid"))


def test_optuna_two_trials(tiny_dir, tmp_path):
    sweep = tmp_path / "optuna"
    run_cli(
        "stamp-train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.tiny_dir={tiny_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *SMALL_JOB,
        cwd=tmp_path,
    )
    trials = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert trials == ["0", "1"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(json.loads((sweep / t / "metrics.json").read_text())["val/ciou_cell"] for t in trials)
    assert results["best_value"] == pytest.approx(best)  # the value stamp-train returned to the sweeper
    assert set(results["best_params"]) == {"optimizer.lr", "scheduler.warmup_ratio", "model.mask_positions"}

    from stamp.cli.sweep_report import load_sweep

    loaded = load_sweep(sweep)
    assert loaded.direction == "maximize"
    assert {"optimizer.lr", "scheduler.warmup_ratio"} <= set(loaded.swept)
