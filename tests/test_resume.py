"""Resuming: a run stopped after step k and resumed from its last.ckpt ends exactly where an
uninterrupted run ends (same batches, weights, optimizer state), on the CPU in float32."""

from __future__ import annotations

import json
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
