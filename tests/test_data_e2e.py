"""End to end on the CPU: stamp-train on the "uni" mix of fixture datasets, stamp-eval on fixture splits."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.fixtures_data import COCO_DIR, write_playground


def test_train_uni_then_eval_fixture_splits(compose_cfg, tmp_path, caplog):
    from stamp.cli.eval import run
    from stamp.cli.train import train

    root = tmp_path / "data"
    write_playground(root, broken=True)  # two refcoco train refs have a missing / corrupt image
    cfg = compose_cfg(
        [
            "model=tiny",
            "data=uni",
            f"paths.data_dir={root}",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_steps=5",
            "data.batch_size=9",
            "data.num_workers=0",
            "data.eval_batch_size=4",
            "generation.max_new_tokens=4",
            "trainer.enable_progress_bar=false",
            "callbacks.scoring.examples=2",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="stamp.data.mixing"):
        metrics = train(cfg)
    # 45 training samples (RES x3 + LLaVA) = one epoch in 5 steps of 9: each broken one skipped 3 times
    assert caplog.text.count("data/skipped") == 6
    assert (
        "COCO_train2014_000000000003.jpg" in caplog.text and "COCO_train2014_000000000004.jpg" in caplog.text
    )
    assert {"train/loss", "train/loss_seg", "val/giou", "val/ciou"} <= set(metrics)
    ckpt = tmp_path / "run" / "model"
    assert (ckpt / "stamp_head.safetensors").is_file()

    cfg = compose_cfg(
        [
            f"ckpt={ckpt}",
            "data=uni",
            f"paths.data_dir={root}",
            "batch_size=4",
            "generation.max_new_tokens=4",
            "data.eval_splits=[refcoco_val,grefcoco_val,reasonseg_val]",
        ],
        config="eval",
    )
    results = run(cfg)
    assert {k: v["expressions"] for k, v in results.items()} == {
        "refcoco_val": 3,
        "grefcoco_val": 4,
        "reasonseg_val": 2,
    }
    assert {"n_acc", "t_acc"} <= set(results["grefcoco_val"])  # one no-target expression
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["splits"]) == {"refcoco_val", "grefcoco_val", "reasonseg_val"}


def test_eval_stops_on_a_missing_image_and_unknown_splits(compose_cfg, stamp_ckpt, tmp_path):
    from stamp.cli.eval import run
    from stamp.data.io import DataError

    root = tmp_path / "data"
    write_playground(root)
    (root / COCO_DIR / "COCO_train2014_000000000002.jpg").unlink()
    cfg = compose_cfg(
        [
            f"ckpt={stamp_ckpt}",
            "data=refcoco",
            f"paths.data_dir={root}",
            "batch_size=4",
            "generation.max_new_tokens=2",
            "data.eval_splits=[refcoco_testA,refcoco_val]",
        ],
        config="eval",
    )
    with pytest.raises(DataError, match=r"image not found: .*COCO_train2014_000000000002\.jpg"):
        run(cfg)
    cfg = compose_cfg(
        [f"ckpt={stamp_ckpt}", "data=refcoco", f"paths.data_dir={root}", "data.eval_splits=[refcoco_dev]"],
        config="eval",
    )
    with pytest.raises(
        ValueError,
        match=r"unknown split 'refcoco_dev'.*valid splits: \['refcoco_testA', 'refcoco_testB', 'refcoco_val', 'val'\]",
    ):
        run(cfg)
    shutil.rmtree(root / "refer_seg" / "refcoco")
    cfg = compose_cfg(
        [f"ckpt={stamp_ckpt}", "data=refcoco", f"paths.data_dir={root}", "data.eval_splits=[refcoco_val]"],
        config="eval",
    )
    with pytest.raises(DataError, match=r"file not found: .*refer_seg/refcoco/refs\(unc\)\.p"):
        run(cfg)
