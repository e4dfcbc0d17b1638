"""Resuming: a run stopped after step k and resumed from its last.ckpt ends exactly where an
uninterrupted run ends (same batches, weights, optimizer state), on the CPU in float32."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from torch.utils.data import Dataset

from stamp.data.resumable import ResumableDataLoader, ResumableSampler
from stamp.training.resume import RandomState, resolve_ckpt_path


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Crashes the run just before the training step that follows global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


class RecordBatches(L.Callback):
    """Appends ``[global step + 1, sample ids]`` of every training batch to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps([trainer.global_step + 1, [s.id for s in batch["samples"]]]) + "\n")


# 5 training samples in batches of 2: epochs of 3 steps (the last one a single sample); 6 steps
# are two shuffled epochs, and step 4 is in the middle of the second. LoRA dropout makes every
# step draw from torch's generator, so the random state must be restored too.
TINY = [
    "trainer=cpu",
    "trainer.max_steps=6",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "export=false",
    "data.batch_size=2",
    "data.shuffle=true",
    "data.train.size=5",
    "data.train.image_size=56",
    "data.train.radius=[8,14]",
    "model.lora={r:4,alpha:8,dropout:0.3,target_modules:[q_proj,v_proj]}",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def _run_cfg(compose_cfg, out: Path, extra: list[str] = ()):
    cfg = compose_cfg(
        [
            *TINY,
            "+callbacks.record._target_=tests.test_resume.RecordBatches",
            f"+callbacks.record.path={out}/batches.jsonl",
            *extra,
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _steps(out: Path) -> list:
    return [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]


def test_resumed_run_matches_uninterrupted_run_bitwise(compose_cfg, tmp_path):
    """Bitwise: every state is restored exactly (no tolerance needed on the CPU in float32)."""
    from stamp.cli.train import train

    whole, split = tmp_path / "whole", tmp_path / "split"
    train(_run_cfg(compose_cfg, whole))

    interrupt = ["+callbacks.interrupt._target_=tests.test_resume.InterruptAt", "+callbacks.interrupt.step=4"]
    with pytest.raises(Interrupted):
        train(_run_cfg(compose_cfg, split, interrupt))
    assert torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    train(_run_cfg(compose_cfg, split, ["ckpt_path=last"]))

    # the same samples at every step: the resumed run went on in the middle of epoch 2
    seen_whole, seen_split = _steps(whole), _steps(split)
    assert [s for s, _ in seen_split] == [1, 2, 3, 4, 5, 5, 6]  # step 5 had its batch when it crashed
    assert seen_split.pop(4) == seen_split[4]
    assert seen_split == seen_whole
    assert seen_whole[0][1] != seen_whole[3][1]  # epoch 2 is permuted differently from epoch 1

    assert not (split / "checkpoints" / "last-v1.ckpt").exists()
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6 and a["epoch"] == b["epoch"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, w in a["state_dict"].items():
        assert torch.equal(w, b["state_dict"][name]), name
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][i][key]), (i, key)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_ckpt_path_last_without_checkpoint_names_the_path(compose_cfg, tmp_path):
    from stamp.cli.train import train

    cfg = compose_cfg(["ckpt_path=last"])
    expected = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="ckpt_path=last") as err:
        train(cfg)
    assert str(expected) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        resolve_ckpt_path(compose_cfg([f"ckpt_path={tmp_path}/missing.ckpt"]))


def test_auto_resume_uses_last_checkpoint_only_when_it_exists(compose_cfg):
    cfg = compose_cfg(["auto_resume=true"])
    assert resolve_ckpt_path(cfg) is None
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    assert resolve_ckpt_path(cfg) == str(last)
    assert resolve_ckpt_path(compose_cfg([])) is None  # auto_resume is off by default
    assert resolve_ckpt_path(compose_cfg(["ckpt_path=last"])) == str(last)


class Indices(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> int:
        return i


def _loader(shuffle: bool) -> ResumableDataLoader:
    return ResumableDataLoader(Indices(), ResumableSampler(Indices(), shuffle=shuffle, seed=5), batch_size=3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_state_resumes_mid_epoch(shuffle):
    full = _loader(shuffle)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]
    assert sorted(sum(expected, [])) == list(range(11)) and len(full) == 4

    first = _loader(shuffle)
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 6, "num_replicas": 1}

    second = _loader(shuffle)
    second.load_state_dict(state)
    assert len(second) == 4  # Lightning counts the restored batches itself
    assert seen + [b.tolist() for b in second] == expected
    assert second.state_dict()["consumed"] == 11
    # the skip applies once: the next epoch is whole, and epoch 3 differs from epoch 2 when shuffled
    second.sampler.set_epoch(3)
    again = [b.tolist() for b in second]
    assert sorted(sum(again, [])) == list(range(11)) and (again != expected) == shuffle


def test_random_state_round_trip():
    cb = RandomState()
    torch.manual_seed(0)
    state = cb.state_dict()
    expected = torch.rand(3)
    torch.manual_seed(1)
    cb.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)


def test_sampler_splits_ranks_and_resumes_each():
    ranks = [ResumableSampler(Indices(), shuffle=True, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    orders = [list(s) for s in ranks]
    assert len(orders[0]) == len(orders[1]) == 6 and set(orders[0] + orders[1]) == set(range(11))
    for s, order in zip(ranks, orders, strict=True):
        s.skip(1, 4)
        assert list(s) == order[4:]
        assert list(s) == order  # the skip was used up


class KillDuringValidation(L.Callback):
    """Kills its own process (SIGKILL, as a preemption would) at the first validation batch."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


# 4 steps with a checkpoint every 2: last.ckpt holds step 4 before the final validation starts
VALIDATED = [
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.enable_progress_bar=false",
    "export=false",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.train.size=8",
    "data.train.image_size=56",
    "data.train.radius=[8,14]",
    "data.val.size=8",
    "data.val.image_size=56",
    "generation.max_new_tokens=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.mark.slow  # a training subprocess (~35 s)
def test_killed_during_final_validation_then_resumed_writes_results(compose_cfg, tiny_dir, tmp_path):
    from stamp.cli.train import train

    run = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)])}
    cmd = [sys.executable, "-m", "stamp.cli.train", *VALIDATED, f"hydra.run.dir={run}"]
    cmd += [f"paths.tiny_dir={tiny_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    cmd += ["+callbacks.kill._target_=tests.test_resume.KillDuringValidation"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (run / "metrics.json").exists() and not (run / "overlays.png").exists()

    metrics = train(compose_cfg([*VALIDATED, "ckpt_path=last"]))
    assert "val/ciou_cell" in metrics and "val/vqa_acc" in metrics
    written = json.loads((run / "metrics.json").read_text())
    assert written["val/ciou_cell"] == pytest.approx(metrics["val/ciou_cell"])
    assert (run / "overlays.png").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_auto_resume_of_a_finished_run_keeps_its_results(compose_cfg, tmp_path):
    from stamp.cli.train import train

    first = train(compose_cfg(VALIDATED))
    run = tmp_path / "run"
    before = json.loads((run / "metrics.json").read_text())
    assert "val/ciou_cell" in before and "train/loss" in before
    again = train(compose_cfg([*VALIDATED, "auto_resume=true"]))
    assert again["val/ciou_cell"] == first["val/ciou_cell"]  # the same model, validated again
    assert json.loads((run / "metrics.json").read_text()) == before
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_metrics_file_is_never_replaced_by_an_empty_one(tmp_path):
    from stamp.training.callbacks import write_metrics

    path = tmp_path / "metrics.json"
    write_metrics(path, {"val/ciou": torch.tensor(0.5), "train/loss": 1.0})
    assert write_metrics(path, {}) is None
    write_metrics(path, {"val/ciou": 0.25})  # a resumed run's new value; the old ones stay
    assert json.loads(path.read_text()) == {"train/loss": 1.0, "val/ciou": 0.25}
    write_metrics(path, {"val/giou": 0.1}, keep_old=False)
    assert json.loads(path.read_text()) == {"val/giou": pytest.approx(0.1)}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
