"""Distributed runs: every validation sample counted once, one output directory per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from stamp.training.distributed import UnpaddedDistributedSampler, job_argv


def test_unpadded_sampler_covers_each_index_once():
    data = list(range(7))
    parts = [list(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(UnpaddedDistributedSampler(data, 2, r)) for r in range(2)] == [4, 3]
    three = [list(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)]
    assert sorted(i for p in three for i in p) == data


def test_datamodule_evaluates_without_padding_under_several_processes(tiny):
    from torch.utils.data import SequentialSampler

    from stamp.data.datamodule import StampDataModule
    from stamp.data.synthetic import SyntheticScenes

    _, processor = tiny
    val = SyntheticScenes("val", size=7)
    dm = StampDataModule(val=val, test=val, processor=processor, eval_batch_size=2)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, UnpaddedDistributedSampler)
        assert [s.id for b in loader for s in b["samples"]] == [val[i].id for i in (1, 3, 5)]
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)


def test_job_argv_keeps_one_job_of_a_multirun():
    argv = [
        "stamp-train",
        "-m",
        "model=qwen2vl_2b,qwen2vl_7b_lora",
        "--config-dir",
        "/extra",
        "-cn=train",
        "seed=1",
    ]
    assert job_argv(argv, ["model=qwen2vl_2b", "seed=1"]) == [
        "stamp-train",
        "--config-dir",
        "/extra",
        "-cn=train",
        "model=qwen2vl_2b",
        "seed=1",
    ]
    assert job_argv(["x", "--multirun", "a=1,2"], ["a=2"]) == ["x", "a=2"]


@pytest.mark.slow
def test_ddp_cpu_validation_counts_each_sample_once(tiny_dir, tmp_path, compose_cfg):
    """2 gloo processes; 7 validation samples, 1 per batch (7 is not a multiple of 2 x 1).

    The validation scores logged under DDP must equal those of the exported model scored in one
    process on the same split, and the run must write exactly one output directory.
    """
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from stamp.data.collate import StampCollator
    from stamp.evaluation import StampScorer
    from stamp.inference.generate import generate_with_masks
    from stamp.model.checkpoints import load_stamp

    overrides = [
        "experiment=demo",
        "trainer=ddp_cpu",
        "trainer.max_steps=60",
        "data.batch_size=4",
        "data.val.size=7",
        "data.eval_batch_size=1",
        "generation.max_new_tokens=12",
        "optimizer.lr=3e-3",
        "scheduler.warmup_ratio=0",
        "~data.train.kind_weights",
        "+data.train.kind_weights={refer: 1}",
        "data.train.curriculum=240",  # 3/4 of the 60 x 4 training chats: "segment the <colour> shape"
        "trainer.precision=32-true",  # the single-process check below scores in float32
        "trainer.enable_progress_bar=false",
    ]
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "stamp.cli.train",
        *overrides,
        f"paths.tiny_dir={tiny_dir}",
        f"paths.log_dir={logs}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("STAMP_RUN_DIR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # one run, one directory, written by both ranks
    assert [p.name for p in logs.iterdir()] == ["demo"]
    assert [p.name for p in (logs / "demo").iterdir()] == ["runs"]
    runs = list((logs / "demo" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "train.log").is_file() and (run / "train_ddp_process_1.log").is_file()
    assert (run / "model" / "stamp_head.safetensors").is_file()
    ddp = json.loads((run / "metrics.json").read_text())

    # the same split, scored the way stamp-eval scored it before its test loop: one process, a
    # plain loop over the exported model
    val = instantiate(compose_cfg(overrides).data.val)
    expressions = sum(len(val[i].masks) for i in range(len(val)))
    assert len(val) == 7 and ddp["val/expressions"] == expressions  # Lightning's sampler would give 8
    model, processor = load_stamp(str(run / "model"))
    scorer = StampScorer()
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=1, collate_fn=StampCollator(processor, "generate")):
            rows = generate_with_masks(model.eval(), batch, processor.tokenizer, 12)
            scorer.update(batch["samples"], rows, batch["grid_hw"])
    plain = scorer.compute()
    assert plain["ciou"] > 0.0, plain  # predictions are not all empty: the comparison means something
    for key in ("ciou", "giou", "ciou_cell", "giou_cell", "ciou_oracle", "giou_oracle", "expressions"):
        assert ddp[f"val/{key}"] == pytest.approx(plain[key], abs=1e-6), key

    # stamp-eval on the exported model takes the run's own validation settings (its .hydra
    # config: 7 chats, batches of 1, 12 new tokens); in one process and in two (gloo) it writes
    # the same figures and the same predictions, equal to the plain loop's
    def stamp_eval(name: str, trainer: str) -> tuple[dict, str]:
        out = tmp_path / name
        cmd = [sys.executable, "-m", "stamp.cli.eval", f"ckpt={run / 'model'}", f"trainer={trainer}"]
        cmd += ["save_predictions=true", "trainer.enable_progress_bar=false"]
        proc = subprocess.run(
            cmd,
            cwd=tmp_path,
            env={**env, "STAMP_RUN_DIR": str(out)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads((out / "results.json").read_text())["splits"]
        return results["val"], (out / "predictions" / "val.jsonl").read_text()

    single, single_predictions = stamp_eval("eval_cpu", "cpu")
    two, two_predictions = stamp_eval("eval_ddp", "ddp_cpu")
    assert two == single and two_predictions == single_predictions
    assert len(single_predictions.splitlines()) == 7
    for key, value in plain.items():
        assert single[key] == pytest.approx(value, abs=1e-9), key
        if f"val/{key}" in ddp:  # reproduces the run's metrics.json (logged as float32)
            assert single[key] == pytest.approx(ddp[f"val/{key}"], abs=1e-6), key


def test_export_is_refused_under_fsdp_before_training():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from stamp.training.distributed import check_export

    with pytest.raises(ValueError, match="export=true with trainer=fsdp"):
        check_export(SimpleNamespace(strategy=FSDPStrategy()), export=True)
    check_export(SimpleNamespace(strategy=FSDPStrategy()), export=False)
    check_export(SimpleNamespace(strategy=DDPStrategy()), export=True)
