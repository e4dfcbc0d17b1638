"""Shared fixtures: the tiny checkpoint (built once per session), models, processors, configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stamp.cli import CONF_DIR

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the backbone families (stamp.model.families)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The embedded tiny Qwen2-VL, as ``stamp-make-tiny`` writes it."""
    from stamp.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2vl", seed=0)


@pytest.fixture(scope="session")
def tiny_dir_of(tmp_path_factory, tiny_dir):
    """The embedded tiny model of a family (``qwen2_vl``: ``tiny_dir``), built once per session
    when first asked for."""
    from stamp.model.tiny import make_tiny

    built = {"qwen2_vl": tiny_dir}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp("tiny") / f"tiny-{family}"
            built[family] = make_tiny(out, seed=0, family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_of(tiny_dir_of):
    """(StampModel, processor) on a family's tiny backbone, in eval mode, float32; one per
    family and session."""
    from stamp.model.build import build_stamp

    models = {}

    def get(family: str):
        if family not in models:
            backbone = str(tiny_dir_of(family))  # built first: building it draws random numbers
            torch.manual_seed(0)
            model, processor = build_stamp({"backbone": backbone})
            models[family] = (model.eval(), processor)
        return models[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_of):
    """(StampModel, processor) on the tiny backbone, in eval mode, float32."""
    return tiny_of("qwen2_vl")


@pytest.fixture
def make_model_of(tiny_dir_of):
    """Factory of fresh tiny StampModels of a family, with settings overridden."""
    from stamp.model.build import build_stamp

    def make(family: str, **overrides):
        # the family's tiny is built (on first use) before the seed: building it draws random
        # numbers, and two models made one after the other must get the same mask head
        backbone = str(tiny_dir_of(family))
        torch.manual_seed(0)
        model, processor = build_stamp({"backbone": backbone, **overrides})
        return model, processor

    return make


@pytest.fixture
def make_model(make_model_of):
    """Factory of fresh tiny (Qwen2-VL) StampModels with settings overridden."""

    def make(**overrides):
        return make_model_of("qwen2_vl", **overrides)

    return make


@pytest.fixture(scope="session")
def first_use_root(tmp_path_factory) -> Path:
    """Where the configs' other tiny backbones go (built there on first use, as in a fresh clone)."""
    return tmp_path_factory.mktemp("first-use")


@pytest.fixture
def compose_cfg(tiny_dir, first_use_root, tmp_path):
    """Compose the real Hydra config with test overrides (CPU, tmp output, the session's tiny)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    def compose_(overrides: list[str] = (), config: str = "train"):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.tiny_dir = str(tiny_dir)
            cfg.paths.tiny_qwen25vl_dir = str(first_use_root / "tiny-qwen25vl")
            cfg.paths.tiny_qwen3vl_dir = str(first_use_root / "tiny-qwen3vl")
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
