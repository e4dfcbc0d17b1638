"""The paper experiments end to end on the CPU at their real widths (random weights, no download).

``model.random_weights=true`` builds the backbone from the model config's ``arch:`` block; the
depth is cut by override, everything else (widths, vocabulary, 1024-cell images, gradient
checkpointing, LoRA, bf16-mixed where the CPU has bf16 units) is the experiment's own.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.fixtures_data import write_playground

DEPTH = ["model.arch.num_hidden_layers=2", "model.arch.vision_config.depth=2"]


def test_random_weights_build_the_arch_at_its_resolution(compose_cfg):
    """The random backbone has the arch's widths and vocabulary, and its processor the recipe's
    resolution: a small fixture image becomes 1024 cells of 28 px."""
    from omegaconf import OmegaConf
    from PIL import Image

    from stamp.model.build import build_stamp

    cfg = compose_cfg(["experiment=paper_2b_res", "model.random_weights=true", *DEPTH])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["vision_attn_implementation"] = "sdpa"
    model, processor = build_stamp(model_cfg)
    text = model.qwen.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (1536, 2, 151936)
    assert model.qwen.config.vision_config.depth == 2 and model.qwen.config.vision_config.embed_dim == 1280
    assert model.language_model.gradient_checkpointing  # the recipe's
    grid = processor.image_processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")[
        "image_grid_thw"
    ]
    cells = int(grid.prod()) // 4
    assert 1024 <= cells <= 1280, cells


def _bf16_cpu() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.slow
@pytest.mark.paper
@pytest.mark.parametrize(
    "experiment, extra",
    [
        ("paper_2b_res", []),
        ("paper_7b_lora_res", ["model.lora.new_token_rows_only=true"]),  # copies: +17 GB, > this 24 GB CPU
        ("paper_2b_res", ["model.attn_implementation=sdpa_hybrid"]),
    ],
    ids=["2b", "7b_lora_rows_only", "2b_sdpa_hybrid"],
)
def test_paper_experiment_trains_and_validates_on_cpu(tmp_path, experiment, extra):
    """`stamp-train experiment=<paper run>` with 2 language + 2 vision layers, REFER fixture data:
    3 training steps and a validation at 1024 cells, through the same code as on GPUs."""
    root = tmp_path / "data"
    write_playground(root)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "stamp.cli.train",
        f"experiment={experiment}",
        "model.random_weights=true",
        *DEPTH,
        "model.vision_attn_implementation=sdpa",  # no flash-attention on a CPU
        "trainer=cpu",
        "trainer.devices=1",
        f"trainer.precision={'bf16-mixed' if _bf16_cpu() else '32-true'}",
        "trainer.max_steps=3",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null",
        "trainer.accumulate_grad_batches=1",
        "+trainer.limit_val_batches=1",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        f"paths.data_dir={root}",
        f"paths.output_dir={out}",
        f"hydra.run.dir={out}",
        "logger=csv",
        "generation.max_new_tokens=4",
        "export=false",
        "~callbacks.model_checkpoint",  # a 2B checkpoint with AdamW states is ~5 GB of disk
        "+callbacks.perf._target_=stamp.training.callbacks.StepPerf",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss_seg"] > 0
    assert metrics["val/expressions"] == 2 and "val/ciou_cell" in metrics
    print(
        f"\n{experiment} {' '.join(extra)}: last step {metrics['perf/step_s']:.1f} s, peak RSS {metrics['perf/peak_rss_gib']:.2f} GiB",
        flush=True,
    )
