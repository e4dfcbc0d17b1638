"""Every experiment and trainer config composes, resolves fully, and carries the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stamp.cli import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (Path(CONF_DIR) / "trainer").glob("*.yaml"))
DATA = sorted(p.stem for p in (Path(CONF_DIR) / "data").glob("*.yaml"))
# docs/METHOD.md section 6: (backbone, LoRA, per-GPU batch, epochs, data config's train target)
PAPER = {
    "paper_2b_res": ("Qwen/Qwen2-VL-2B-Instruct", False, 12, 5, "stamp.data.mixing.MixedDataset"),
    "paper_7b_lora_res": ("Qwen/Qwen2-VL-7B-Instruct", True, 8, 5, "stamp.data.mixing.MixedDataset"),
    "paper_2b_uni": ("Qwen/Qwen2-VL-2B-Instruct", False, 12, 2, "stamp.data.mixing.MixedDataset"),
    "grefcoco_7b_lora": ("Qwen/Qwen2-VL-7B-Instruct", True, 8, 2, "stamp.data.grefer.GReferSegDataset"),
}


def _without_hydra(cfg):
    """The job's config without the hydra node (whose resolvers need a running Hydra app)."""
    from omegaconf import open_dict

    copy = cfg.copy()
    with open_dict(copy):
        copy.pop("hydra", None)
    return copy


def test_the_paper_experiments_exist():
    assert set(PAPER) <= set(EXPERIMENTS)


@pytest.mark.parametrize("model", [None, "qwen2vl_2b", "qwen2vl_7b_lora", "qwen25vl_3b", "qwen3vl_2b"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(compose_cfg, experiment, model):
    """As `stamp-train -m experiment=<e> model=qwen2vl_2b,qwen2vl_7b_lora` would compose each job."""
    overrides = [f"experiment={experiment}"] + ([f"model={model}"] if model else [])
    cfg = compose_cfg(overrides)
    plain = OmegaConf.to_container(_without_hydra(cfg), resolve=True)
    assert plain["task_name"] and plain["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    if model == "qwen2vl_7b_lora":
        assert plain["model"]["backbone"] == "Qwen/Qwen2-VL-7B-Instruct" and plain["model"]["lora"]["r"] == 64
    elif model == "qwen2vl_2b":
        assert plain["model"]["backbone"] == "Qwen/Qwen2-VL-2B-Instruct" and plain["model"]["lora"] is None
    elif model in ("qwen25vl_3b", "qwen3vl_2b"):  # the cross-family sweep of the README
        family = {"qwen25vl_3b": "qwen2_5_vl", "qwen3vl_2b": "qwen3_vl"}[model]
        assert plain["model"]["arch"]["model_type"] == family and plain["model"]["lora"] is None
        assert plain["model"]["tiny_family"] is None


def _keys(node, prefix: str = "") -> set[str]:
    """Every key path under a plain dict (``train.datasets.refcoco.repeats``, ...)."""
    out = set()
    for k, v in node.items():
        out.add(prefix + str(k))
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_every_data_config(compose_cfg, experiment, data):
    """`stamp-train experiment=<e> data=<d>`: the experiment adds no key that the data config
    lacks (settings of one dataset do not leak into another), and every key reaches a target
    that takes it (what `instantiate` would otherwise fail on, deep in a TypeError)."""
    from stamp.utils.config import check_arguments

    composed = compose_cfg([f"experiment={experiment}", f"data={data}"]).data
    alone = compose_cfg([f"data={data}"]).data
    plain = {k: OmegaConf.to_container(c, resolve=False) for k, c in (("with", composed), ("alone", alone))}
    assert _keys(plain["with"]) <= _keys(plain["alone"])
    check_arguments(composed, "data")


def test_check_arguments_names_the_key_a_target_does_not_take():
    from stamp.utils.config import check_arguments

    node = OmegaConf.create(
        {"_target_": "stamp.data.mixing.MixedDataset", "datasets": {}, "train": {"shared": [0.4, 0.2]}}
    )
    with pytest.raises(
        ValueError, match=r"^data\.train: stamp\.data\.mixing\.MixedDataset takes no argument 'train'"
    ):
        check_arguments(node, "data")
    bad = {"_target_": "stamp.data.synthetic.SyntheticScenes", "split": "train", "colour": "red"}
    with pytest.raises(ValueError, match=r"data\.val\.colour: .*SyntheticScenes takes no argument 'colour'"):
        check_arguments({"val": bad}, "data")
    good = {k: v for k, v in bad.items() if k != "colour"}
    check_arguments({"val": good, "batch_size": 2}, "data")  # keys outside a target are not checked


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_recipe(compose_cfg, experiment):
    backbone, lora, batch, epochs, train_target = PAPER[experiment]
    cfg = compose_cfg([f"experiment={experiment}"])
    m, t = cfg.model, cfg.trainer
    assert m.backbone == backbone and m.gradient_checkpointing
    # the language model must honour the 4-D mask; flash-attention only in the vision encoder
    assert m.attn_implementation == "sdpa" and m.vision_attn_implementation == "flash_if_installed"
    # bf16 autocast over fp32 weights (the optimizer's master copy)
    assert t.precision == "bf16-mixed" and m.dtype == "float32"
    if lora:
        assert (m.lora.r, m.lora.alpha, m.lora.use_rslora, m.lora.dropout) == (64, 128, True, 0.05)
        assert set(m.lora.target_modules) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
        assert set(m.lora.modules_to_save) == {"embed_tokens", "lm_head"}
    else:
        assert m.lora is None and not m.freeze_vision
    o, s = cfg.optimizer, cfg.scheduler
    assert o._target_ == "torch.optim.AdamW" and o.lr == 3e-5 and o.weight_decay == 0.0
    assert s.warmup_ratio == 0.03 and s.warmup_steps is None
    assert t.gradient_clip_val == 1.0
    assert (cfg.data.batch_size, t.accumulate_grad_batches, t.devices) == (batch, 4, 8)
    assert (t.max_steps, t.max_epochs) == (-1, epochs)
    assert t.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert cfg.data.train._target_ == train_target
    assert {"csv", "wandb"} <= set(cfg.logger)


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_trainer_settings_are_accepted_by_lightning(compose_cfg, experiment):
    """The epoch-based schedule (max_steps -1, validation every epoch) builds a Trainer (on CPU here)."""
    cfg = compose_cfg(
        [
            f"experiment={experiment}",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.strategy=auto",
            "trainer.num_nodes=1",
        ]
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs and trainer.max_steps == -1
    assert trainer.accumulate_grad_batches == 4 and trainer.check_val_every_n_epoch == 1


def test_7b_uses_the_2b_recipe_with_its_own_batch(compose_cfg):
    a, b = compose_cfg(["experiment=paper_2b_res"]), compose_cfg(["experiment=paper_7b_lora_res"])
    for key in ("optimizer", "scheduler"):
        assert a[key] == b[key]
    assert a.trainer.max_epochs == b.trainer.max_epochs == 5
    assert (a.data.batch_size, b.data.batch_size) == (12, 8)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_configs_compose(compose_cfg, trainer):
    cfg = compose_cfg([f"trainer={trainer}"])
    plain = OmegaConf.to_container(_without_hydra(cfg), resolve=True)["trainer"]
    assert isinstance(plain.get("num_nodes", 1), int)
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy):  # deepspeed is a name (deepspeed is not installed here)
        instantiate(strategy)


def test_distributed_trainers(compose_cfg, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLVisionBlock

    monkeypatch.setenv("SLURM_NNODES", "2")
    ddp = compose_cfg(["trainer=ddp"]).trainer
    assert ddp.num_nodes == 2 and ddp.precision == "bf16-mixed" and ddp.sync_batchnorm is False
    assert isinstance(instantiate(ddp.strategy), DDPStrategy)
    cpu = compose_cfg(["trainer=ddp_cpu"]).trainer
    assert (cpu.accelerator, cpu.devices, cpu.num_nodes) == ("cpu", 2, 1)
    assert instantiate(cpu.strategy)._process_group_backend == "gloo"
    fsdp = instantiate(compose_cfg(["trainer=fsdp"]).trainer.strategy)
    assert isinstance(fsdp, FSDPStrategy)
    wrapped = fsdp.kwargs["auto_wrap_policy"]._module_classes
    assert set(wrapped) == {Qwen2VLDecoderLayer, Qwen2VLVisionBlock}
    assert set(fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == set(wrapped)
    ds = compose_cfg(["trainer=deepspeed"]).trainer
    assert ds.strategy == "deepspeed_stage_2" and ds.precision == "bf16-mixed"
