"""stamp-prepare-data: the prepared form loads the same samples, resumes, and re-runs as a no-op."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from stamp.data import prepare
from stamp.data.grefer import GReferSegDataset
from stamp.data.reasonseg import ReasonSegDataset
from stamp.data.refer import ReferSegDataset
from tests.fixtures_data import COCO_DIR, write_playground

BIN = Path(sys.executable).parent


def datasets(root: Path, prepared: Path | None) -> list:
    kw = {"prepared_dir": prepared, "seed": 5}
    return [
        ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR, repeats=2, **kw),
        ReferSegDataset(root / "refer_seg", "refcoco", "val", root / COCO_DIR, prompt_choice="fixed", **kw),
        GReferSegDataset(root / "refer_seg/grefcoco", "val", root / COCO_DIR, **kw),
        ReasonSegDataset(root / "reason_seg/ReasonSeg", "val", **kw),
        ReasonSegDataset(root / "reason_seg/ReasonSeg", "val", texts="first", **kw),
    ]


def assert_same_samples(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert (x.id, x.kind, x.messages) == (y.id, y.kind, y.messages)
        assert len(x.masks) == len(y.masks)
        for mx, my in zip(x.masks, y.masks, strict=True):
            np.testing.assert_array_equal(mx, my)
        assert (x.ignore is None) == (y.ignore is None)
        if x.ignore is not None:
            np.testing.assert_array_equal(x.ignore, y.ignore)


def test_prepared_form_gives_identical_samples_and_rerun_is_a_noop(tmp_path):
    root, prepared = tmp_path / "data", tmp_path / "prepared"
    write_playground(root)
    results = [prepare.prepare_dataset(ds, chunk_size=1, progress=False) for ds in datasets(root, prepared)]
    assert [(r.name, r.records, r.samples, r.status) for r in results] == [
        ("refcoco|unc|train", 3, 4, "prepared"),
        ("refcoco|unc|val", 2, 3, "prepared"),
        ("grefcoco|unc|val", 3, 4, "prepared"),
        ("reasonseg|val", 2, 3, "prepared"),
        ("reasonseg|val", 2, 3, "up to date"),
    ]
    assert not list(prepared.glob("*.parts"))
    line = json.loads((prepared / "refcoco_unc_val.jsonl").read_text().splitlines()[0])
    assert isinstance(line["masks"][0][0]["counts"], str)  # one compressed RLE per target
    for raw, fast in zip(datasets(root, None), datasets(root, prepared), strict=True):
        fast.load()
        assert fast.from_prepared and not raw.from_prepared
        assert_same_samples(raw, fast)
    stamps = {p: p.stat().st_mtime_ns for p in prepared.iterdir()}
    again = [prepare.prepare_dataset(ds, progress=False) for ds in datasets(root, prepared)]
    assert {r.status for r in again} == {"up to date"}
    assert {p: p.stat().st_mtime_ns for p in prepared.iterdir()} == stamps


def test_changed_raw_files_are_not_served_stale(tmp_path, caplog):
    root, prepared = tmp_path / "data", tmp_path / "prepared"
    write_playground(root)
    ds = datasets(root, prepared)[1]
    prepare.prepare_dataset(ds, progress=False)
    inst = root / "refer_seg/refcoco/instances.json"
    data = json.loads(inst.read_text())
    data["annotations"][3]["segmentation"] = [[0, 0, 4, 0, 4, 4, 0, 4]]  # ann 202 edited
    inst.write_text(json.dumps(data))
    fresh = datasets(root, prepared)[1]
    assert fresh[0].masks[0].sum() == 16 and not fresh.from_prepared
    assert "changed since" in caplog.text
    assert prepare.prepare_dataset(fresh, progress=False).status == "prepared"
    assert datasets(root, prepared)[1][0].masks[0].sum() == 16


def test_interrupted_preparation_resumes(tmp_path, monkeypatch):
    root, prepared = tmp_path / "data", tmp_path / "prepared"
    write_playground(root)
    ds = ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR, prepared_dir=prepared)
    real, calls = prepare.write_part, []

    def flaky(records, path):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the run after two chunks
        real(records, path)

    monkeypatch.setattr(prepare, "write_part", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(ds, chunk_size=1, progress=False)
    assert sorted(p.name for p in (prepared / "refcoco_unc_train.parts").glob("part-*.jsonl")) == [
        "part-00000.jsonl",
        "part-00001.jsonl",
    ]
    assert not (prepared / "refcoco_unc_train.meta.json").exists()
    calls.clear()
    result = prepare.prepare_dataset(ds, chunk_size=1, progress=False)
    assert calls == ["part-00002.jsonl"] and result.status == "prepared" and result.records == 3
    assert_same_samples(
        ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR),
        ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR, prepared_dir=prepared),
    )


def test_worker_processes(tmp_path):
    root, prepared = tmp_path / "data", tmp_path / "prepared"
    write_playground(root)
    ds = GReferSegDataset(root / "refer_seg/grefcoco", "val", root / COCO_DIR, prepared_dir=prepared)
    assert prepare.prepare_dataset(ds, workers=2, chunk_size=1, progress=False).samples == 4
    assert_same_samples(
        GReferSegDataset(root / "refer_seg/grefcoco", "val", root / COCO_DIR),
        GReferSegDataset(root / "refer_seg/grefcoco", "val", root / COCO_DIR, prepared_dir=prepared),
    )


def test_config_walk_finds_every_split(tmp_path, compose_cfg):
    root = tmp_path / "data"
    cfg = compose_cfg(["data=res_mix", f"paths.data_dir={root}"])
    found = prepare.find_datasets(cfg.data)
    names = sorted(ds.name for ds in found.values())
    assert names == sorted(
        [
            "refcoco|unc|train",
            "refcoco+|unc|train",
            "refcocog|umd|train",
            "refclef|unc|train",
            "refcoco|unc|val",
            "refcoco|unc|testA",
            "refcoco|unc|testB",
            "refcoco+|unc|val",
            "refcoco+|unc|testA",
            "refcoco+|unc|testB",
            "refcocog|umd|val",
            "refcocog|umd|test",
        ]
    )
    assert all(str(ds.prepared_dir) == str(root / "prepared") for ds in found.values())
    assert isinstance(instantiate(cfg.data.splits.refcoco_val), ReferSegDataset)


def test_cli_prints_counts_and_is_idempotent(tmp_path, capsys):
    root = tmp_path / "data"
    write_playground(root)
    args = [str(BIN / "stamp-prepare-data"), "data=grefcoco", f"paths.data_dir={root}", "--workers", "1"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    rows = {line.split()[0]: line.split()[1:5] for line in first.stdout.splitlines()[1:]}
    assert rows == {
        "grefcoco|unc|train": ["1", "1", "0", "prepared"],
        "grefcoco|unc|val": ["3", "4", "0", "prepared"],
        "grefcoco|unc|testA": ["1", "1", "0", "prepared"],
        "grefcoco|unc|testB": ["1", "1", "0", "prepared"],
    }
    capsys.readouterr()
    again = prepare.run(["data=grefcoco", f"paths.data_dir={root}"], progress=False)
    assert [r.status for r in again] == ["up to date"] * 4 and capsys.readouterr().out.count(
        "up to date"
    ) == 4
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['grefcoco\|unc\|dev'\] in --only; valid: \["):
        prepare.run(["data=grefcoco", f"paths.data_dir={root}"], only=["grefcoco|unc|dev"], progress=False)
    only = prepare.run(["data=grefcoco", f"paths.data_dir={root}"], only=["grefcoco_unc_val"], progress=False)
    assert [(r.name, r.status) for r in only] == [("grefcoco|unc|val", "up to date")]


def break_refcoco(root: Path) -> None:
    """Make two refcoco annotations unreadable: a mask of the wrong size (ann 202, val ref 3) and
    a polygon of odd length (ann 101, train refs 0 and testA ref 5)."""
    path = root / "refer_seg/refcoco/instances.json"
    inst = json.loads(path.read_text())
    for ann in inst["annotations"]:
        if ann["id"] == 202:
            ann["segmentation"]["size"] = [10, 10]
        if ann["id"] == 101:
            ann["segmentation"] = [[8, 8, 24, 8, 24]]
    path.write_text(json.dumps(inst))


def test_cli_counts_and_names_unreadable_records_and_fails_unless_allowed(tmp_path):
    root = tmp_path / "data"
    write_playground(root)
    break_refcoco(root)
    args = [str(BIN / "stamp-prepare-data"), "data=refcoco", f"paths.data_dir={root}", "--workers", "1"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 1
    rows = {line.split()[0]: line.split()[1:5] for line in first.stdout.splitlines()[1:5]}
    assert rows == {
        "refcoco|unc|train": ["3", "4", "1", "prepared"],
        "refcoco|unc|val": ["2", "3", "1", "prepared"],
        "refcoco|unc|testA": ["1", "1", "1", "prepared"],
        "refcoco|unc|testB": ["1", "1", "0", "prepared"],
    }
    out = first.stdout
    assert "refcoco|unc|val: 1 unreadable record(s), first 1:" in out
    assert "refs(unc).p ref 3 (ann 202): RLE mask is 10x10 (HxW) but its image is 56x72" in out
    assert "refs(unc).p ref 0 (ann 101): a segmentation piece must be a polygon" in out
    err = first.stderr.strip().splitlines()
    assert err[-1].startswith("stamp-prepare-data: error: unreadable records in refcoco|unc|train (1), ")
    assert "Traceback" not in first.stderr
    # accepted on request; the split is up to date and its errors are still counted
    second = subprocess.run(args + ["--allow-errors"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "refcoco|unc|val: 1 unreadable record(s)" in second.stdout and "up to date" in second.stdout


def test_train_and_eval_log_unreadable_records_per_source(tmp_path, compose_cfg, caplog):
    """At start, every source says how many of its records cannot be read (raw or prepared)."""
    from stamp.data.records import report_unreadable

    root = tmp_path / "data"
    write_playground(root)
    break_refcoco(root)
    cfg = compose_cfg(["data=res_mix", f"paths.data_dir={root}"])
    with caplog.at_level(logging.INFO, logger="stamp.data.records"):
        instantiate(cfg.data).setup("fit")  # as stamp-train does at start
    lines = [r.getMessage() for r in caplog.records if "data train" in r.getMessage()]
    assert "data train refcoco|unc|train: 1 of 3 records unreadable" in lines[0]  # raw: checked, not decoded
    assert "refs(unc).p ref 0 (ann 101): a segmentation piece must be a polygon" in lines[0]
    assert any(m.startswith("data train refcoco+|unc|train: 2 records, none unreadable") for m in lines)
    assert len(lines) == 4  # refcoco, refcoco+, refcocog, refclef
    prepare.run(["data=refcoco", f"paths.data_dir={root}"], progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stamp.data.records"):
        report_unreadable(instantiate(cfg.data.splits.refcoco_val), "refcoco_val")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("data refcoco_val refcoco|unc|val: 1 of 2 records unreadable")
    assert "RLE mask is 10x10" in line
