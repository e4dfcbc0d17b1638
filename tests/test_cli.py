"""The console entry points: real configs, real files, clear errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import square_sample

BIN = Path(sys.executable).parent


def cli(
    name: str, *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / name), *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def _kinds(split_cfg) -> list[str]:
    from hydra.utils import instantiate

    ds = instantiate(split_cfg)
    return [ds[i].kind for i in range(len(ds))]


def test_eval_writes_results(compose_cfg, stamp_ckpt, tmp_path):
    from stamp.cli.eval import run

    cfg = compose_cfg(
        [
            f"ckpt={stamp_ckpt}",
            "data.val.size=12",
            "data.test.size=6",
            "data.eval_splits=[val,test]",
            "batch_size=5",
            "generation.max_new_tokens=4",
            "save_masks=true",
        ],
        config="eval",
    )
    results = run(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["splits"]) == {"val", "test"} and saved["splits"] == results
    assert {"giou", "ciou", "n_acc", "t_acc", "ciou_cell", "ciou_oracle"} <= set(results["val"])
    if not any(ds_kind == "none" for ds_kind in _kinds(cfg.data.test)):  # N-acc only where it is defined
        assert "n_acc" not in results["test"]
    table = (out / "results.md").read_text()
    assert table.startswith("| split | giou | ciou |") and "| val |" in table and "| test |" in table
    assert len(list((out / "masks" / "val").glob("*.png"))) == int(results["val"]["expressions"])


def test_eval_unknown_split(compose_cfg, stamp_ckpt):
    from stamp.cli.eval import run

    cfg = compose_cfg([f"ckpt={stamp_ckpt}", "data.eval_splits=[dev]"], config="eval")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*valid splits: \['test', 'val'\]"):
        run(cfg)


def _write(tmp_path: Path, name: str, image: Image.Image) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


@pytest.mark.slow
def test_predict_synthetic_and_real_photo(stamp_ckpt, tmp_path):
    from skimage import data as skdata

    synthetic = _write(tmp_path, "shapes.png", square_sample(size=224).image)
    photo = _write(tmp_path, "astronaut.png", Image.fromarray(skdata.astronaut()))
    for image in (synthetic, photo):
        out = tmp_path / image.stem
        r = cli(
            "stamp-predict",
            f"ckpt={stamp_ckpt}",
            f"image={image}",
            "query=Please segment the person.",
            f"out_dir={out}",
            "generation.max_new_tokens=6",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        )
        assert r.returncode == 0, r.stderr
        assert "answer:" in r.stdout
        # an untrained model may or may not emit <|seg|>; force one with the known-answer path below
    from stamp.cli.predict import save_outputs
    from stamp.inference import Segmenter

    seg = Segmenter.from_pretrained(stamp_ckpt, device="cpu")
    img = Image.open(photo).convert("RGB")
    result = seg.segment(img, "Please segment the person.", answer="Sure, it is <|seg|>")
    mask_path, overlay_path = save_outputs(img, result, tmp_path / "out", "photo", 0.5)
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (img.height, img.width) and set(np.unique(mask)) <= {0, 255}
    over = np.asarray(Image.open(overlay_path).convert("RGB"))
    changed = (over != np.asarray(img)).any(-1)
    # outside the mask only its outline and its number tag (at the mask's top-left pixel) change
    from stamp.utils.overlay import outline

    _, ring = outline(mask > 0)
    ys, xs = np.nonzero(changed & ~(mask > 0) & ~ring)
    y0 = np.nonzero(mask > 0)[0].min()
    x0 = np.nonzero(mask[y0] > 0)[0].min()
    assert ((ys >= y0 - 2) & (ys <= y0 + 16) & (xs >= x0 - 2) & (xs <= x0 + 16)).all()


def test_empty_masks_are_named():
    """An empty mask is the model's "nothing matches": predict and the web demo say so."""
    from stamp.utils.overlay import empty_masks_note

    full, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    assert empty_masks_note([full, full]) is None and empty_masks_note([]) is None
    assert empty_masks_note([full, empty]) == "Mask 2 is empty: nothing in the image matches."
    assert empty_masks_note([empty, full, empty]) == "Masks 1, 3 are empty: nothing in the image matches."


@pytest.mark.slow
def test_predict_chat_three_turns(stamp_ckpt, tmp_path):
    image = _write(tmp_path, "shapes.png", square_sample(size=224).image)
    r = cli(
        "stamp-predict",
        f"ckpt={stamp_ckpt}",
        f"image={image}",
        "--chat",
        "generation.max_new_tokens=4",
        f"out_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        stdin="Segment the red square.\nNow the left one.\nWhat colour is it?\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("answer:") == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["unreadable", "directory", "empty_query", "missing_sam", "no_mask_head", "no_ckpt"]
)
def test_predict_bad_input(case, stamp_ckpt, tiny_dir, tmp_path):
    image = _write(tmp_path, "ok.png", square_sample().image)
    args = {"ckpt": str(stamp_ckpt), "image": str(image), "query": "Segment it."}
    expected = {
        "unreadable": "cannot read",
        "directory": "is a directory",
        "empty_query": "the query is empty",
        "missing_sam": "SAM checkpoint",
        "no_mask_head": "has no mask head",
        "no_ckpt": "does not exist",
    }[case]
    if case == "unreadable":
        (tmp_path / "bad.jpg").write_text("this is not a jpeg")
        args["image"] = str(tmp_path / "bad.jpg")
    elif case == "directory":
        args["image"] = str(tmp_path)
    elif case == "empty_query":
        args["query"] = "' '"
    elif case == "no_mask_head":
        args["ckpt"] = str(tiny_dir)
    elif case == "no_ckpt":
        args["ckpt"] = str(tmp_path / "nothing-here")
    extra = [f"sam.checkpoint={tmp_path / 'sam_vit_h_4b8939.pth'}"] if case == "missing_sam" else []
    r = cli(
        "stamp-predict", *[f"{k}={v}" for k, v in args.items()], *extra, f"hydra.run.dir={tmp_path / 'hydra'}"
    )
    assert r.returncode == 1
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ckpt_last", "mask_positions", "no_data", "full_error"])
def test_train_user_errors_are_one_line(case, tiny_dir, tmp_path):
    """stamp-train reports a user error as stamp-eval does: one line, exit 1, no traceback
    (unless HYDRA_FULL_ERROR=1)."""
    args, expected = {
        "ckpt_last": (["ckpt_path=last"], "ckpt_path=last: no checkpoint at"),
        "mask_positions": (["model.mask_positions=diagonal"], "diagonal"),
        "no_data": (["data=refcoco", f"paths.data_dir={tmp_path / 'no-data'}"], "no-data"),
        "full_error": (["model.mask_positions=diagonal"], "diagonal"),
    }[case]
    cmd = [str(BIN / "stamp-train"), *args, f"paths.tiny_dir={tiny_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    cmd += ["trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if case == "full_error" else "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    if case == "full_error":
        assert "Traceback" in r.stderr and expected in r.stderr
        return
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stamp-train: error: ") and expected in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_instantiation_errors_are_reported_with_their_key():
    from hydra.errors import InstantiationException

    from stamp.cli import user_error_message

    try:
        try:
            raise FileNotFoundError("refs(unc).p does not exist")
        except FileNotFoundError as cause:
            raise InstantiationException(
                "Error in call to target 'x':\nFileNotFoundError(...)\nfull_key: data.train"
            ) from cause
    except InstantiationException as e:
        assert user_error_message(e) == "refs(unc).p does not exist (building data.train)"
    assert user_error_message(KeyError("a bug")) is None


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "no network"])
def test_hub_id_without_network_fails_at_once_naming_the_setting(why, monkeypatch):
    import time

    from stamp.model import backbone

    if why == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(backbone, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(OSError, match=r"model\.backbone='stamp-tests/no-such-model' is a hub id") as err:
        backbone.load_backbone("stamp-tests/no-such-model")
    assert time.monotonic() - start < 10
    assert "set model.backbone=/path/to/local/copy" in str(err.value)
    assert ("HF_HUB_OFFLINE is set" if why == "HF_HUB_OFFLINE" else "cannot be reached") in str(err.value)


def test_cuda_device_without_cuda_says_what_to_do(monkeypatch):
    import torch

    from stamp.cli.eval import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device=cuda: this machine has no CUDA device .* use device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


def test_run_folder_or_training_checkpoint_as_ckpt_points_to_the_model(tmp_path):
    from stamp.model.checkpoints import load_stamp

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"is a training run folder; pass its model: ckpt={run / 'model'}$"):
        load_stamp(run)
    with pytest.raises(ValueError, match=rf"Lightning training checkpoint .* ckpt={run / 'model'}$"):
        load_stamp(run / "checkpoints" / "last.ckpt")
