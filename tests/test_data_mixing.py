"""Mixing proportions, reproducible sampling, and skipping broken samples in training only."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from hydra.utils import instantiate
from torch.utils.data import Dataset

from stamp.data.collate import StampCollator
from stamp.data.datamodule import StampDataModule
from stamp.data.io import DataError
from stamp.data.mixing import MixedDataset, SkipBadSamples
from tests.fixtures_data import write_playground
from tests.helpers import square_sample


class Numbers(Dataset):
    """n samples named <name>-<i>; indices in ``bad`` raise DataError."""

    def __init__(self, name: str, n: int, bad: tuple[int, ...] = ()) -> None:
        self.name, self.n, self.bad = name, n, set(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise DataError(f"/data/{self.name}/{i}.jpg is corrupt")
        return square_sample(sid=f"{self.name}-{i}")


def test_concatenation_follows_lengths_and_repeats():
    mix = MixedDataset({"a": Numbers("a", 30), "b": Numbers("b", 10)})
    assert len(mix) == 40
    assert Counter(mix.locate(i)[0] for i in range(40)) == {"a": 30, "b": 10}
    assert mix[29].id == "a-29" and mix[30].id == "b-0"
    with pytest.raises(IndexError):
        mix.locate(40)


def test_weighted_draws_match_weights_and_are_seeded():
    mix = MixedDataset(
        {"a": Numbers("a", 5), "b": Numbers("b", 1000), "c": Numbers("c", 3)},
        weights={"a": 0.5, "b": 0.3, "c": 0.2},
        size=20000,
        seed=7,
    )
    assert len(mix) == 20000
    draws = [mix.locate(i) for i in range(20000)]
    share = Counter(name for name, _ in draws)
    for name, w in {"a": 0.5, "b": 0.3, "c": 0.2}.items():
        assert abs(share[name] / 20000 - w) < 0.015, share
    within_a = Counter(i for name, i in draws if name == "a")
    assert set(within_a) == set(range(5)) and max(within_a.values()) / min(within_a.values()) < 1.25
    again = MixedDataset(
        {"a": Numbers("a", 5), "b": Numbers("b", 1000), "c": Numbers("c", 3)},
        weights={"a": 0.5, "b": 0.3, "c": 0.2},
        size=20000,
        seed=7,
    )
    other = MixedDataset(
        {"a": Numbers("a", 5), "b": Numbers("b", 1000), "c": Numbers("c", 3)},
        weights={"a": 0.5, "b": 0.3, "c": 0.2},
        size=20000,
        seed=8,
    )
    assert [again.locate(i) for i in range(500)] == draws[:500]
    assert [other.locate(i) for i in range(500)] != draws[:500]
    with pytest.raises(
        ValueError, match=r"weights name unknown dataset\(s\) \['d'\]; valid names: \['a', 'b', 'c'\]"
    ):
        MixedDataset({"a": Numbers("a", 5), "b": Numbers("b", 5), "c": Numbers("c", 5)}, weights={"d": 1.0})


def test_uni_config_mixes_res_three_times_plus_llava(compose_cfg, tmp_path):
    root = tmp_path / "data"
    write_playground(root)
    cfg = compose_cfg(["data=uni", f"paths.data_dir={root}"])
    mix = instantiate(cfg.data.train)
    res = {"refcoco": 4, "refcoco+": 2, "refcocog": 2, "refclef": 3}  # train expressions in the fixture
    assert dict(zip(mix.names, mix.lengths, strict=True)) == {
        **{k: 3 * n for k, n in res.items()},
        "llava": 6,
    }
    counts = Counter(mix.locate(i)[0] for i in range(len(mix)))
    assert counts == {**{k: 3 * n for k, n in res.items()}, "llava": 6}
    # reweighted from the command line: draws follow the weights
    cfg = compose_cfg(
        [
            "data=uni",
            f"paths.data_dir={root}",
            "data.train.weights={refcoco: 3, llava: 1}",
            "data.train.size=4000",
        ]
    )
    mix = instantiate(cfg.data.train)
    counts = Counter(mix.locate(i)[0] for i in range(len(mix)))
    assert set(counts) == {"refcoco", "llava"} and abs(counts["refcoco"] / 4000 - 0.75) < 0.03


def test_datamodule_shuffles_reproducibly(tiny):
    _, processor = tiny
    data = Numbers("a", 64)

    def order(seed):
        dm = StampDataModule(train=data, processor=processor, batch_size=8, seed=seed)
        return list(iter(dm.train_dataloader().sampler))

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(64))


def test_training_skips_and_counts_bad_samples(tiny, caplog):
    _, processor = tiny
    data = Numbers("a", 10, bad=(2, 3, 7))
    dm = StampDataModule(train=data, processor=processor, batch_size=5, shuffle=False)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    ids = [s.id for b in batches for s in b["samples"]]
    assert ids == ["a-0", "a-1", "a-4", "a-4", "a-4", "a-5", "a-6", "a-8", "a-8", "a-9"]
    assert [b["skipped"] for b in batches] == [2, 1]  # one per bad index: 2, 3 | 7
    assert "data/skipped" in caplog.text and "/data/a/2.jpg is corrupt" in caplog.text
    # the training batch is still a normal batch
    assert batches[0]["input_ids"].shape[0] == 5 and len(batches[0]["seg_targets"]) == 5


def test_too_many_consecutive_failures_raise():
    with pytest.raises(
        DataError, match=r"4 consecutive samples from index 0 could not be loaded; check the data paths"
    ):
        SkipBadSamples(Numbers("a", 10, bad=(0, 1, 2, 3)), max_tries=4)[0]


def test_evaluation_never_skips(tiny):
    _, processor = tiny
    dm = StampDataModule(val=Numbers("v", 4, bad=(1,)), processor=processor, eval_batch_size=4)
    with pytest.raises(DataError, match=r"/data/v/1\.jpg is corrupt"):
        list(dm.val_dataloader())
    collate = StampCollator(processor, "generate")
    assert collate([square_sample()])["skipped"] == 0


def test_real_sources_skip_missing_and_corrupt_images(tmp_path, tiny):
    from stamp.data.refer import ReferSegDataset
    from tests.fixtures_data import COCO_DIR

    _, processor = tiny
    root: Path = tmp_path
    write_playground(root, broken=True)
    ds = ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR)
    assert len(ds) == 6
    dm = StampDataModule(train=ds, processor=processor, batch_size=6, shuffle=False)
    (batch,) = list(dm.train_dataloader())
    assert batch["skipped"] == 2
    assert [s.id for s in batch["samples"]][-2:] == ["refcoco_unc_0_0", "refcoco_unc_0_0"]  # wrapped around
