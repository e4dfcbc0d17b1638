"""stamp-eval on Lightning's test loop: results per split, reruns, predictions, run data settings,
W&B worst predictions (the multi-process identity is in tests/test_distributed.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from pycocotools import mask as mask_utils

EVAL = ["data.val.size=12", "data.test.size=6", "batch_size=5", "generation.max_new_tokens=6"]


def test_predictions_file_in_dataset_order_with_masks_and_ious(compose_cfg, stamp_ckpt, tmp_path):
    from stamp.cli.eval import run

    cfg = compose_cfg(
        [f"ckpt={stamp_ckpt}", *EVAL, "data.eval_splits=[val]", "save_predictions=true"], "eval"
    )
    results = run(cfg)
    lines = (tmp_path / "run" / "predictions" / "val.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    val = instantiate(cfg.data.val)
    assert [r["index"] for r in records] == list(range(len(val)))
    assert [r["id"] for r in records] == [val[i].id for i in range(len(val))]
    n_masks, ious = 0, []
    for r in records:
        s = val[r["index"]]
        assert r["question"] == s.prompt[-1]["content"] and isinstance(r["answer"], str)
        if s.masks:
            assert len(r["masks"]) == len(s.masks)
            for m, truth in zip(r["masks"], s.masks, strict=True):
                pred = mask_utils.decode({**m["rle"], "counts": m["rle"]["counts"].encode()}).astype(bool)
                union = (pred | truth).sum()
                assert m["iou"] == pytest.approx(1.0 if union == 0 else (pred & truth).sum() / union)
                ious.append(m["iou"])
                n_masks += 1
        elif "truth" in r:  # a VQA question: exact match after normalising case and punctuation

            def clean(t: str) -> str:
                return t.replace("<|seg|>", "").strip().strip(".!").lower()

            assert r["correct"] == (clean(r["answer"]) == clean(r["truth"]))
    assert n_masks == results["val"]["expressions"]
    assert np.mean(ious) == pytest.approx(results["val"]["giou"], abs=1e-9)  # gIoU is their mean
    assert any(i > 0 for i in ious)  # a trained model: the comparison means something


def test_rerun_skips_finished_splits_and_nothing_is_written_half(
    compose_cfg, stamp_ckpt, tmp_path, monkeypatch
):
    import stamp.model.checkpoints as checkpoints
    from stamp.cli.eval import run

    base = [f"ckpt={stamp_ckpt}", *EVAL, "data.eval_splits=[val,test]"]
    first = run(compose_cfg(base, "eval"))
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["test.json", "val.json"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded: a finished split was evaluated again")

    monkeypatch.setattr(checkpoints, "load_stamp", no_model)
    assert run(compose_cfg(base, "eval")) == first  # both skipped
    with pytest.raises(AssertionError, match="loaded"):
        run(compose_cfg([*base, "overwrite=true"], "eval"))
    with pytest.raises(AssertionError, match="loaded"):  # other settings: evaluated again
        run(compose_cfg([*base, "generation.max_new_tokens=7"], "eval"))
    monkeypatch.undo()

    # a split that fails leaves no results of its own and no results.json; finished splits stay
    from stamp.training.evaluate import EvalWriter

    shutil.rmtree(out)
    start = EvalWriter.on_test_epoch_start

    def fail_on_test(self, trainer, pl_module):
        if self.split == "test":
            raise RuntimeError("interrupted")
        start(self, trainer, pl_module)

    monkeypatch.setattr(EvalWriter, "on_test_epoch_start", fail_on_test)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(compose_cfg(base, "eval"))
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["val.json"]
    assert not (out / "results.json").exists()
    assert json.loads((out / "splits" / "val.json").read_text())["metrics"] == first["val"]


def test_unknown_split_and_missing_head(compose_cfg, stamp_ckpt, tmp_path):
    from stamp.cli.eval import run

    with pytest.raises(
        ValueError, match=r"unknown split 'dev' in data.eval_splits; valid splits: \['test', 'val'\]"
    ):
        run(compose_cfg([f"ckpt={stamp_ckpt}", "data.eval_splits=[dev]"], "eval"))
    headless = tmp_path / "headless"
    shutil.copytree(stamp_ckpt, headless)
    (headless / "stamp_head.safetensors").unlink()
    with pytest.raises(ValueError, match="mask head"):
        run(compose_cfg([f"ckpt={headless}", *EVAL, "data.eval_splits=[val]"], "eval"))


def test_eval_table_merges_runs_in_the_paper_layout(tmp_path):
    from stamp.cli.eval_table import main

    def results(name: str, splits: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"ckpt": f"ckpts/{name}", "splits": splits}))
        return d

    two_b = results(
        "2b",
        {
            "refcoco_val": {"ciou": 0.801, "giou": 0.82},
            "refcocog_test": {"ciou": 0.7444},
            "grefcoco_val": {"giou": 0.7, "ciou": 0.65, "n_acc": 0.6, "t_acc": 0.95},
            "reasonseg_val": {"giou": 0.5, "ciou": 0.45},
            "val": {"ciou_cell": 0.658, "vqa_acc": 0.813},
        },
    )
    seven_b = results("7b", {"refcoco_val": {"ciou": 0.8123}, "refcoco+_testA": {"ciou": 0.7}})
    main([str(two_b), str(seven_b / "results.json"), "--out", str(tmp_path / "cmp" / "ablation")])
    md = (tmp_path / "cmp" / "ablation.md").read_text().splitlines()
    assert md[0] == (
        "| checkpoint | refcoco_val ciou | refcoco+_testA ciou | refcocog_test ciou | grefcoco_val giou | "
        "grefcoco_val ciou | grefcoco_val n_acc | grefcoco_val t_acc | reasonseg_val giou | reasonseg_val ciou | "
        "val ciou_cell | val vqa_acc |"
    )
    assert (
        md[2]
        == "| ckpts/2b | 80.10 | - | 74.44 | 70.00 | 65.00 | 60.00 | 95.00 | 50.00 | 45.00 | 65.80 | 81.30 |"
    )
    assert md[3] == "| ckpts/7b | 81.23 | 70.00 | - | - | - | - | - | - | - | - | - |"
    rows = list(csv.reader((tmp_path / "cmp" / "ablation.csv").open()))
    assert rows[0][0] == "checkpoint" and rows[1][1] == "80.10" and len(rows) == 3
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
