"""Building a ``StampModel`` from a model config, and saving/loading STAMP checkpoint directories.

A STAMP checkpoint directory is an ordinary checkpoint of its backbone family (``save_pretrained`` of the
backbone and the processor, tokenizer with ``<|seg|>``/``<|mask|>``) plus two files:
``stamp_head.safetensors`` (the mask head) and ``stamp.json`` (the STAMP settings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stamp.model.backbone import attn_kwargs, load_backbone, parse_dtype
from stamp.model.stamp import StampModel
from stamp.model.tokens import MASK_TOKEN, SEG_TOKEN

HEAD_FILE = "stamp_head.safetensors"
SETTINGS_FILE = "stamp.json"
SETTINGS = ("mask_positions", "mask_attention", "add_patch_features")


def apply_lora(backbone, lora: Mapping[str, Any], new_tokens: list[int] = ()):
    """Wrap the backbone with peft LoRA adapters (``modules_to_save`` are trained in full).

    With ``lora.new_token_rows_only``, ``embed_tokens`` and ``lm_head`` in ``modules_to_save``
    are not copied and trained whole: only their rows of ``new_tokens`` (``<|seg|>``,
    ``<|mask|>``) are, through peft's ``trainable_token_indices``.
    """
    from peft import LoraConfig, get_peft_model

    save = list(lora.get("modules_to_save") or [])
    rows = {}
    if lora.get("new_token_rows_only"):
        rows = {m: list(new_tokens) for m in save if m in ("embed_tokens", "lm_head")}
        save = [m for m in save if m not in rows]
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0),
        use_rslora=lora.get("use_rslora", False),
        target_modules=list(lora["target_modules"]),
        modules_to_save=save,
        trainable_token_indices=rows or None,
        # Qwen2-VL's and Qwen3-VL's vision towers have no module with these names; Qwen2.5-VL's
        # MLPs do, and its config excludes them (lora.exclude_modules)
        exclude_modules=lora.get("exclude_modules") or None,
    )
    return get_peft_model(backbone, config)


def stamp_from_backbone(backbone, processor, cfg: Mapping[str, Any]) -> StampModel:
    """Apply the tuning choices of ``cfg`` to a loaded backbone and add the STAMP head."""
    tok = processor.tokenizer
    return stamp_with_token_ids(
        backbone, tok.convert_tokens_to_ids(SEG_TOKEN), tok.convert_tokens_to_ids(MASK_TOKEN), cfg
    )


def stamp_with_token_ids(
    backbone, seg_token_id: int, mask_token_id: int, cfg: Mapping[str, Any]
) -> StampModel:
    """``stamp_from_backbone`` given the ``<|seg|>``/``<|mask|>`` ids (no processor needed)."""
    if cfg.get("gradient_checkpointing"):
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.get("lora"):
        backbone = apply_lora(backbone, cfg["lora"], [seg_token_id, mask_token_id])
    if cfg.get("freeze_vision"):
        vis = (
            backbone.get_base_model().model.visual
            if hasattr(backbone, "get_base_model")
            else backbone.model.visual
        )
        vis.requires_grad_(False)
    return StampModel(
        backbone,
        seg_token_id=seg_token_id,
        mask_token_id=mask_token_id,
        mask_positions=cfg.get("mask_positions", "sequential"),
        mask_attention=cfg.get("mask_attention", "hybrid"),
        add_patch_features=cfg.get("add_patch_features", True),
        bce_weight=cfg.get("bce_weight", 0.3),
        dice_weight=cfg.get("dice_weight", 0.7),
        lm_weight=cfg.get("lm_weight", 1.0),
        train_forward=cfg.get("train_forward", "fused"),
        pack_rows=cfg.get("pack_rows", False),
        deepstack_mask_tokens=cfg.get("deepstack_mask_tokens", True),
    )


def build_stamp(cfg: Mapping[str, Any]) -> tuple[StampModel, Any]:
    """Load the backbone named by ``cfg["backbone"]`` and build the STAMP model around it.

    If the backbone directory is itself a STAMP checkpoint, its mask head is loaded too. With
    ``cfg["tiny_family"]`` (the embedded tiny models), a missing backbone directory at
    ``cfg["tiny_home"]`` is built first (``stamp-make-tiny --family ...`` does the same).
    """
    if cfg.get("random_weights"):
        backbone, processor = random_backbone_from(cfg)
        return stamp_from_backbone(backbone, processor, cfg), processor
    from stamp.model.tiny import ensure_configured_tiny

    ensure_configured_tiny(cfg)
    backbone, processor = load_backbone(
        str(cfg["backbone"]),
        dtype=cfg.get("dtype", "float32"),
        attn_implementation=cfg.get("attn_implementation", "sdpa"),
        vision_attn_implementation=cfg.get("vision_attn_implementation"),
        min_pixels=cfg.get("min_pixels"),
        max_pixels=cfg.get("max_pixels"),
    )
    model = stamp_from_backbone(backbone, processor, cfg)
    head = Path(str(cfg["backbone"])) / HEAD_FILE
    if head.is_file():
        load_head(model, head)
    return model, processor


def random_backbone_from(cfg: Mapping[str, Any]):
    """``model.random_weights=true``: the ``arch:`` block's architecture with random weights."""
    from stamp.model.tiny import random_backbone

    if not cfg.get("arch"):
        raise ValueError(
            "model.random_weights=true needs the model config's arch: block (see conf/model/qwen2vl_2b.yaml)"
        )
    return random_backbone(
        cfg["arch"],
        dtype=parse_dtype(cfg.get("dtype", "float32")),
        attn_implementation=attn_kwargs(
            cfg.get("attn_implementation", "sdpa"), cfg.get("vision_attn_implementation")
        )["attn_implementation"],
        min_pixels=cfg.get("min_pixels"),
        max_pixels=cfg.get("max_pixels"),
    )


def load_head(model: StampModel, path: str | Path) -> None:
    state = load_file(str(path))
    missing = {"weight", "bias"} - {k.split(".")[-1] for k in state}
    if missing:
        raise ValueError(f"{path}: mask head file lacks {sorted(missing)}")
    head = model.mask_head
    with torch.no_grad():
        head.weight.copy_(state["mask_head.weight"].to(head.weight))
        head.bias.copy_(state["mask_head.bias"].to(head.bias))


def save_stamp(model: StampModel, processor, out_dir: str | Path) -> Path:
    """Write a STAMP checkpoint directory (LoRA adapters are merged into the weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):
        import copy

        backbone = copy.deepcopy(backbone).merge_and_unload()
    backbone.save_pretrained(out)
    processor.save_pretrained(out)
    save_file(
        {f"mask_head.{k}": v.detach().contiguous().cpu() for k, v in model.mask_head.state_dict().items()},
        str(out / HEAD_FILE),
    )
    settings = {k: getattr(model, k) for k in SETTINGS}
    if model.has_deepstack:
        settings["deepstack_mask_tokens"] = model.deepstack_mask_tokens
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out


def read_settings(path: str | Path) -> dict[str, Any]:
    f = Path(path) / SETTINGS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
