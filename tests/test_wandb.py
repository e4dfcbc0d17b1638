"""W&B tracking: offline without an API key, what a run logs (read back from the offline run
files), grouping and naming, and one run per training job."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image

from stamp.training import tracking

BASE = [
    "logger=wandb",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "export=false",
    "data.batch_size=2",
    "data.train.image_size=56",
    "data.train.radius=[8,14]",
    "data.eval_batch_size=8",
    "generation.max_new_tokens=4",
]


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    """No W&B API key anywhere (environment, ~/.netrc), W&B's files under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        # setenv first, so that the variable is removed again after the test even if
        # Lightning's WandbLogger sets it (offline runs set WANDB_MODE)
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    return home


class Boom(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise RuntimeError("boom")


def read_records(path: Path):
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header: CRC, length, type; the file opens with a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_run(run_dir: Path, wait_s: float = 60.0) -> dict:
    """History keys, config, summary, run settings and exit code of an offline run.

    W&B's service process writes the file; it can still be flushing it for a moment after the
    run's own process has returned. So the file is read again until it holds the run's exit
    record (or ``wait_s`` is up, and the last reading is returned or its error raised).
    """
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = parse_run(path)
            if out["exit_code"] is not None or time.monotonic() > deadline:
                return out
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def parse_run(path: Path) -> dict:
    out = {"history": {}, "config": {}, "summary": {}, "run": None, "exit_code": None}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            for item in r.history.item:
                out["history"].setdefault("/".join(item.nested_key) or item.key, []).append(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                out["config"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "run":
            out["run"] = r.run
            for item in r.run.config.update:
                out["config"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_offline_run_logs_losses_metrics_config_sizes_and_overlays(no_key, compose_cfg):
    import wandb

    from stamp.cli.train import train

    cfg = compose_cfg([*BASE, "trainer.max_steps=3", "data.val.size=8", "tags=[unit,wandb]"])
    out = Path(cfg.paths.output_dir)
    metrics = train(cfg)
    assert wandb.run is None  # the job closed its run

    (run_dir,) = offline_runs(out)  # offline (no key), under the run's output dir
    run = read_run(run_dir)
    for key in (
        "train/loss",
        "train/loss_lm",
        "train/loss_seg",
        "val/ciou_cell",
        "val/giou",
        "trainer/global_step",
    ):
        assert key in run["history"], key
    assert any(k.startswith("lr-") for k in run["history"])  # LearningRateMonitor
    assert len(run["history"]["train/loss"]) == 3
    assert json.loads(run["history"]["val/ciou_cell"][-1]) == pytest.approx(metrics["val/ciou_cell"])

    config = run["config"]
    assert config["trainer"]["max_steps"] == 3 and config["seed"] == 42 and "hydra" not in config
    assert config["data"]["val"]["size"] == 8
    total, trainable = config["model/params_total"], config["model/params_trainable"]
    assert isinstance(total, int) and 0 < trainable <= total
    assert run["summary"]["model/params_trainable"] == trainable
    assert run["run"].run_group == "train" and list(run["run"].tags) == ["unit", "wandb"]
    assert run["exit_code"] == 0

    # the overlays panel (one validation): images with a prediction and a ground-truth mask layer
    assert len(run["history"]["val/overlays/count"]) == 1
    panel = {
        k.split("/")[-1]: json.loads(v[-1])
        for k, v in run["history"].items()
        if k.startswith("val/overlays/")
    }
    files = run_dir / "files"
    assert panel["count"] == len(panel["filenames"]) == len(panel["all_masks"]) >= 1
    assert all((files / f).is_file() and f.startswith("media/images/") for f in panel["filenames"])
    truth = []
    for layers in panel["all_masks"]:
        assert set(layers) == {"prediction", "ground_truth"}
        assert all((files / layer["path"]).is_file() for layer in layers.values())
        truth.append(np.asarray(Image.open(files / layers["ground_truth"]["path"])))
    assert any(t.any() for t in truth)  # the ground truth is drawn (class k + 1 for mask k)


def test_each_job_gets_its_own_run_also_when_it_fails(no_key, compose_cfg, tmp_path):
    import wandb

    from stamp.cli.train import train

    outs = [tmp_path / "job0", tmp_path / "job1"]
    for i, out in enumerate(outs):
        extra = ["+callbacks.boom._target_=tests.test_wandb.Boom"] if i == 1 else []
        cfg = compose_cfg([*BASE, "trainer.max_steps=1", "+trainer.limit_val_batches=0", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        if i == 1:
            with pytest.raises(RuntimeError, match="boom"):
                train(cfg)
        else:
            train(cfg)
        assert wandb.run is None

    runs = [read_run(d) for out in outs for d in offline_runs(out)]
    assert len(runs) == 2 and runs[0]["run"].run_id != runs[1]["run"].run_id
    assert "train/loss" in runs[0]["history"] and "train/loss" not in runs[1]["history"]
    assert [r["exit_code"] for r in runs] == [0, 1]


def test_offline_unless_an_api_key_is_configured(no_key, monkeypatch):
    assert not tracking.api_key_configured()
    assert tracking.wandb_mode() == "offline"
    assert tracking.wandb_mode(offline=False) == "online"  # forced

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_mode() == "online"
    assert tracking.wandb_mode(offline=True) == "offline"  # forced
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own choice wins over the key
    assert tracking.wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")

    netrc = no_key / ".netrc"
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    assert tracking.wandb_mode() == "offline"  # an entry for another host
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.wandb_mode() == "online"


def test_runs_are_grouped_by_task_and_sweep(compose_cfg):
    from hydra.types import RunMode

    cfg = compose_cfg(["task_name=demo", "trainer.max_steps=5"])
    single = tracking.run_names(cfg)
    assert single["group"] == "demo" and single["name"] == "task_name=demo,trainer.max_steps=5"

    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "/logs/demo/multiruns/2026-01-02_03-04-05"
        cfg.hydra.job.num = 3
    multi = tracking.run_names(cfg)
    assert multi["group"] == "demo/2026-01-02_03-04-05"
    assert multi["name"] == "3:task_name=demo,trainer.max_steps=5"

    # explicit values in the logger config are kept
    cfg = compose_cfg(["logger=wandb", "logger.wandb.group=mine", "logger.wandb.offline=true"])
    args = tracking.wandb_init_args(cfg.logger.wandb, cfg)
    assert "group" not in args and args["offline"] is True and args["mode"] == "offline"
    assert tracking.wandb_init_args(compose_cfg(["logger=csv"]).logger.csv, cfg) == {}


def test_overlays_callback_does_nothing_without_wandb():
    from types import SimpleNamespace

    from stamp.training.callbacks import WandbOverlays

    cb = WandbOverlays(every_n_val=2)
    trainer = SimpleNamespace(loggers=[], callbacks=[], sanity_checking=False, is_global_zero=True)
    cb.on_validation_epoch_end(trainer, None)
    assert cb.count == 0
    with pytest.raises(ValueError, match="every_n_val"):
        WandbOverlays(every_n_val=0)


def test_stamp_eval_logs_metrics_and_a_table_of_the_worst_predictions(no_key, compose_cfg, stamp_ckpt):
    from stamp.cli.eval import run

    cfg = compose_cfg(
        [f"ckpt={stamp_ckpt}", "logger=wandb", "data.val.size=10", "data.eval_splits=[val]"]
        + ["batch_size=5", "generation.max_new_tokens=6", "wandb_worst=3"],
        config="eval",
    )
    results = run(cfg)
    (run_dir,) = offline_runs(Path(cfg.paths.output_dir))
    history = read_run(run_dir)["history"]
    assert json.loads(history["eval/val/giou"][-1]) == pytest.approx(results["val"]["giou"])
    table = {
        k.split("/")[-1]: json.loads(v[-1]) for k, v in history.items() if k.startswith("eval/val/worst/")
    }
    assert table["_type"] == "table-file" and table["nrows"] == 3 and table["ncols"] == 6
    saved = json.loads((run_dir / "files" / table["path"]).read_text())
    assert saved["columns"] == ["id", "question", "answer", "mask", "iou", "overlay"]
    ious = [row[4] for row in saved["data"]]
    assert ious == sorted(ious) and [row[5] for row in saved["data"]] == ["Image"] * 3
    overlays = {k.split("/")[-1]: json.loads(v[-1]) for k, v in history.items() if "/worst_overlays/" in k}
    assert overlays["count"] == 3 and overlays["captions"][0].endswith(f"IoU {ious[0]:.3f}")
    assert all((run_dir / "files" / f).is_file() for f in overlays["filenames"])
    predictions = Path(cfg.paths.output_dir) / "predictions"
    assert not list(predictions.glob("*.jsonl"))  # kept only with save_predictions=true
