"""Dry runs: parameter counts from the architecture and the training-memory estimate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from stamp.model.budget import GIB, count_parameters, estimate_training_memory

# ---- the estimate, against numbers worked out by hand ---------------------------------------


def test_full_precision_adamw():
    # 1000 parameters, 100 trained, all fp32: 4000 + 100*4 + 2*100*4
    m = estimate_training_memory(1000, 100, "32-true", "float32")
    assert (m.param_dtype, m.weights, m.gradients, m.optimizer, m.master) == ("float32", 4000, 400, 800, 0)
    assert m.total == 5200 and not m.low_precision_updates


def test_bf16_mixed_keeps_fp32_weights_as_master():
    m = estimate_training_memory(1000, 100, "bf16-mixed", "float32")
    assert (m.weights, m.gradients, m.optimizer, m.master, m.total) == (4000, 400, 800, 0, 5200)
    assert estimate_training_memory(1000, 100, "bf16", "float32") == m  # Lightning's old spelling


def test_half_true_converts_everything_to_16_bits():
    m = estimate_training_memory(1000, 100, "bf16-true", "float32")
    assert (m.param_dtype, m.weights, m.gradients, m.optimizer, m.master, m.total) == (
        "bfloat16",
        2000,
        200,
        400,
        0,
        2600,
    )
    assert m.low_precision_updates


def test_bf16_weights_under_mixed_precision_have_no_master_copy():
    m = estimate_training_memory(1000, 100, "bf16-mixed", "bfloat16")
    assert m.total == 2600 and m.low_precision_updates


def test_deepspeed_keeps_an_fp32_master_and_fp32_moments():
    # bf16 weights 1000*2, bf16 grads 100*2, fp32 moments 2*100*4, fp32 master 100*4
    m = estimate_training_memory(1000, 100, "bf16-mixed", "float32", fp32_master=True)
    assert (m.weights, m.gradients, m.optimizer, m.master, m.total) == (2000, 200, 800, 400, 3400)
    assert not m.low_precision_updates


def test_stamp_2b_full_finetune_in_bf16_mixed():
    # 2,208,987,137 parameters (backbone + mask head), all trained, 16 bytes each
    m = estimate_training_memory(2_208_987_137, 2_208_987_137, "bf16-mixed", "float32")
    assert m.total == 35_343_794_192
    assert round(m.total / GIB, 2) == 32.92


def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match="trainer.precision='8-bit'"):
        estimate_training_memory(10, 1, "8-bit")
    with pytest.raises(ValueError, match="model.dtype='int8'"):
        estimate_training_memory(10, 1, "32-true", "int8")
    with pytest.raises(ValueError, match="trainable"):
        estimate_training_memory(10, 11, "32-true")


# ---- dry runs through the real configs --------------------------------------------------------


@pytest.mark.parametrize("model, family", [("tiny", "qwen2_vl"), ("tiny_qwen3vl", "qwen3_vl")])
def test_dry_run_of_the_tiny_model_matches_the_loaded_model(
    compose_cfg, make_model_of, capsys, model, family
):
    """Built from the tiny checkpoint's config.json on the meta device = the real model's counts
    (the tiny Qwen3-VL is built on first use by the dry run itself)."""
    from stamp.cli.train import train

    cfg = compose_cfg([f"model={model}", "train.dry_run=true", "trainer.precision=32-true"])
    metrics = train(cfg)
    out = capsys.readouterr().out
    real, _ = make_model_of(family)
    total, trainable = count_parameters(real)
    assert metrics["dry_run/params"] == total and metrics["dry_run/trainable_params"] == trainable
    assert f"trainable parameters {trainable:,}" in out
    assert "EXCLUDING activations" in out and "ESTIMATED" in out
    assert metrics["dry_run/memory_gib"] == pytest.approx(16 * total / GIB)  # fp32, all trained


def _lora_trainable(arch: dict, r: int) -> int:
    """LoRA r * (in + out) per adapted Linear of the language model + embed_tokens and lm_head."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    kv = arch["num_key_value_heads"] * h // arch["num_attention_heads"]
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)
    return per_layer * arch["num_hidden_layers"] + 2 * arch["vocab_size"] * h


def _counts(text: str, label: str) -> list[int]:
    return [int(v.replace(",", "")) for v in re.findall(rf"{label}\s+([\d,]+)", text)]


def test_dry_run_cli_for_both_backbones_offline(tiny_dir, tmp_path, compose_cfg):
    """`stamp-train -m model=qwen2vl_2b,qwen2vl_7b_lora train.dry_run=true`: no download, no data."""
    from omegaconf import OmegaConf

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }  # any network use fails
    cmd = [
        sys.executable,
        "-m",
        "stamp.cli.train",
        "-m",
        "model=qwen2vl_2b,qwen2vl_7b_lora",
        "train.dry_run=true",
        "trainer.precision=bf16-mixed",
        "model.dtype=float32",
        f"paths.log_dir={tmp_path / 'logs'}",
        "paths.data_dir=/nonexistent",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 150, elapsed
    out = proc.stdout
    backbone, total = _counts(out, "backbone parameters"), _counts(out, "parameters in memory")
    trainable = _counts(out, "trainable parameters")
    lora_backbone = [int(v.replace(",", "")) for v in re.findall(r"= backbone ([\d,]+)", out)]
    assert len(backbone) == len(total) == len(trainable) == 2, out
    assert 2.15e9 < backbone[0] < 2.25e9 and 8.2e9 < backbone[1] < 8.4e9
    assert f"({backbone[0] / 1e9:.2f} B)" == "(2.21 B)" and f"({backbone[1] / 1e9:.2f} B)" == "(8.29 B)"
    # 2B: everything trained (+ the mask head, hidden + 1); 7B: LoRA + embed_tokens + lm_head (+ head)
    assert trainable[0] == total[0] == backbone[0] + 1536 + 1
    arch = OmegaConf.to_container(compose_cfg(["model=qwen2vl_7b_lora"]).model.arch, resolve=True)
    assert lora_backbone[1] == _lora_trainable(arch, r=64) == 1_251_475_456
    assert trainable[1] == 1_251_475_456 + 3584 + 1
    # bf16-mixed with fp32 weights: 4 bytes for every parameter, 4 + 8 more for every trained one
    gib = [float(v) for v in re.findall(r"total\s+([\d.]+) GiB", out)]
    assert gib == [round((4 * t + 12 * tr) / GIB, 2) for t, tr in zip(total, trainable, strict=True)]
    assert out.count("EXCLUDING activations") == 2
    assert not list((tmp_path / "logs").rglob("model"))  # nothing trained, nothing exported


@pytest.mark.parametrize("rows_only", [False, True])
def test_dry_run_shows_both_ways_of_training_the_new_tokens(compose_cfg, capsys, rows_only):
    """7B LoRA: full copies of embed_tokens and lm_head, or only the rows of the two new tokens."""
    from omegaconf import OmegaConf

    from stamp.model.budget import dry_run

    cfg = compose_cfg(["model=qwen2vl_7b_lora", f"model.lora.new_token_rows_only={str(rows_only).lower()}"])
    model, trainer = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "trainer"))
    trainer["precision"], model["dtype"] = "bf16-mixed", "float32"  # as the paper experiments
    metrics = dry_run(model, trainer)
    out = capsys.readouterr().out
    h, v = model["arch"]["hidden_size"], model["arch"]["vocab_size"]
    full, rows = (
        metrics["dry_run/trainable_params_full_copies"],
        metrics["dry_run/trainable_params_rows_only"],
    )
    assert full == 1_251_475_456 + h + 1
    assert full - rows == 2 * v * h - 2 * 2 * h  # two V x H copies -> two rows in each of two matrices
    assert metrics["dry_run/trainable_params"] == (rows if rows_only else full)
    # fp32 weights under bf16-mixed: the copies' 4 bytes, and 4 + 8 per trained parameter, go away
    saved = metrics["dry_run/memory_gib_full_copies"] - metrics["dry_run/memory_gib_rows_only"]
    assert saved == pytest.approx((4 + 12) * (full - rows) / GIB)
    assert "only the rows of <|seg|>, <|mask|>" in out and "full copies trained" in out
