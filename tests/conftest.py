"""Shared fixtures: the tiny checkpoint (built once per session), models, processors, configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stamp.cli import CONF_DIR

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The embedded tiny Qwen2-VL, as ``stamp-make-tiny`` writes it."""
    from stamp.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2vl", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(StampModel, processor) on the tiny backbone, in eval mode, float32."""
    from stamp.model.build import build_stamp

    torch.manual_seed(0)
    model, processor = build_stamp({"backbone": str(tiny_dir)})
    return model.eval(), processor


@pytest.fixture
def make_model(tiny_dir):
    """Factory of fresh tiny StampModels with settings overridden."""
    from stamp.model.build import build_stamp

    def make(**overrides):
        torch.manual_seed(0)
        model, processor = build_stamp({"backbone": str(tiny_dir), **overrides})
        return model, processor

    return make


@pytest.fixture
def compose_cfg(tiny_dir, tmp_path):
    """Compose the real Hydra config with test overrides (CPU, tmp output, the session's tiny)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    def compose_(overrides: list[str] = (), config: str = "train"):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.tiny_dir = str(tiny_dir)
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        return cfg

    return compose_


@pytest.fixture(scope="session")
def stamp_ckpt(tiny, tmp_path_factory) -> Path:
    """A STAMP checkpoint directory of the (untrained) tiny model."""
    from stamp.model.build import save_stamp

    model, processor = tiny
    return save_stamp(model, processor, tmp_path_factory.mktemp("stamp") / "model")
