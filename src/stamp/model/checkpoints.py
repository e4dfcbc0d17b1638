"""Loading STAMP checkpoints: our own directories and the original project's released layouts.

* ours: a Qwen2-VL checkpoint + ``stamp_head.safetensors`` + ``stamp.json`` (``build.save_stamp``).
* released full (STAMP-2B): Qwen2-VL weights saved by transformers 4.x with legacy key names,
  ``classifier.weight``/``classifier.bias`` for the mask head, a tokenizer that already holds
  ``<|seg|>``, ``<|mask|>``, ``<|yes|>``, ``<|no|>``.
* released LoRA (STAMP-7B): a peft adapter directory (``adapter_config.json`` naming the base
  model; ``modules_to_save`` = embed_tokens, lm_head, classifier).

Released models were trained with ``mask_positions=sequential``; that is what they load with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stamp.model.backbone import check_source, load_backbone
from stamp.model.build import HEAD_FILE, load_head, read_settings, stamp_from_backbone
from stamp.model.stamp import StampModel

RELEASED_SETTINGS = {"mask_positions": "sequential", "mask_attention": "hybrid", "add_patch_features": True}


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def find_tensors(files: list[Path], suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names end with one of ``suffixes`` (matched by suffix), from safetensors files."""
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                for suffix in suffixes:
                    if key == suffix or key.endswith("." + suffix):
                        found[suffix] = st.get_tensor(key)
    return found


def released_head(files: list[Path]) -> dict[str, torch.Tensor] | None:
    """``classifier.weight``/``classifier.bias`` (also under peft prefixes), as mask-head tensors."""
    found = find_tensors(files, ("classifier.weight", "classifier.bias"))
    found.update(
        find_tensors(
            files, ("classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias")
        )
    )
    weight = found.get("classifier.weight", found.get("classifier.modules_to_save.default.weight"))
    bias = found.get("classifier.bias", found.get("classifier.modules_to_save.default.bias"))
    if weight is None or bias is None:
        return None
    return {"mask_head.weight": weight.reshape(1, -1), "mask_head.bias": bias.reshape(1)}


def _set_head(model: StampModel, state: dict[str, torch.Tensor], where: Path) -> None:
    head = model.mask_head
    if state["mask_head.weight"].shape != head.weight.shape:
        raise ValueError(
            f"{where}: mask head weight {tuple(state['mask_head.weight'].shape)} does not fit "
            f"hidden size {head.weight.shape[1]}"
        )
    with torch.no_grad():
        head.weight.copy_(state["mask_head.weight"].to(head.weight))
        head.bias.copy_(state["mask_head.bias"].to(head.bias))


def modern_key(key: str, prefix: str = "base_model.model.") -> str:
    """Adapter key under transformers 4.x module names -> the current Qwen2-VL module names
    (``model.layers`` -> ``model.language_model.layers``, ``visual`` -> ``model.visual``)."""
    if not key.startswith(prefix):
        return key
    rest = key[len(prefix) :]
    if rest.startswith("visual."):
        rest = "model." + rest
    elif rest.startswith("model.") and not rest.startswith(("model.language_model.", "model.visual.")):
        rest = "model.language_model." + rest[len("model.") :]
    return prefix + rest


def no_head_error(path: Path) -> ValueError:
    return ValueError(
        f"checkpoint directory {str(path)!r} has no mask head ({HEAD_FILE} or classifier.* weights): it looks "
        "like a plain Qwen2-VL checkpoint. Train it with stamp-train, or point to a STAMP checkpoint."
    )


def check_stamp_dir(path: Path) -> None:
    """Point a user who passed a training run's folder or checkpoint file to its exported model."""
    if path.is_file() and path.suffix == ".ckpt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise ValueError(
            f"ckpt={str(path)!r} is a Lightning training checkpoint (for resuming with stamp-train "
            f"ckpt_path=...); pass the run's exported model directory instead: ckpt={run / 'model'}"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "model" / "config.json").is_file():
            raise ValueError(
                f"ckpt={str(path)!r} is a training run folder; pass its model: ckpt={path / 'model'}"
            )
        if (path / "checkpoints").is_dir():
            raise ValueError(
                f"ckpt={str(path)!r} is a training run folder without an exported model (it ran with "
                f"export=false); export one from {path / 'checkpoints'} or pass ckpt=<run>/model of another run"
            )


def load_stamp(
    path: str | Path, dtype: str = "float32", base_model: str | None = None, **overrides: Any
) -> tuple[StampModel, Any]:
    """Load any supported STAMP checkpoint directory; ``overrides`` change model settings."""
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file():
        return _load_lora(path, dtype, base_model, overrides)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    check_stamp_dir(path)
    check_source(str(path))
    settings = {**(read_settings(path) or RELEASED_SETTINGS), **overrides}
    backbone, processor = load_backbone(
        str(path),
        dtype=dtype,
        attn_implementation=settings.pop("attn_implementation", "sdpa"),
        vision_attn_implementation=settings.pop("vision_attn_implementation", None),
    )
    model = stamp_from_backbone(backbone, processor, settings)
    if (path / HEAD_FILE).is_file():
        load_head(model, path / HEAD_FILE)
    else:
        head = released_head(_weight_files(path))
        if head is None:
            raise no_head_error(path)
        _set_head(model, head, path)
    return model.to(backbone.dtype), processor


def _load_lora(path: Path, dtype: str, base_model: str | None, overrides: dict) -> tuple[StampModel, Any]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; pass base_model=...")
    files = [f for f in _weight_files(path) if f.name.startswith("adapter_model")]
    if not files:
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    head = released_head(files)
    if head is None:
        raise no_head_error(path)
    settings = {**RELEASED_SETTINGS, **overrides}
    backbone, processor = load_backbone(
        base, dtype=dtype, attn_implementation=settings.pop("attn_implementation", "sdpa"), key="base_model"
    )
    # the adapter directory carries the tokenizer with STAMP's tokens, when it was saved with one
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))
    state = load_file(str(files[0]))
    embed = next((v for k, v in state.items() if "embed_tokens" in k), None)
    if embed is not None and embed.shape[0] != backbone.get_input_embeddings().weight.shape[0]:
        backbone.resize_token_embeddings(embed.shape[0], mean_resizing=False)
    lora = LoraConfig.from_pretrained(str(path))
    lora.modules_to_save = [m for m in (lora.modules_to_save or []) if m != "classifier"]
    lora.inference_mode = True
    peft_model = get_peft_model(backbone, lora)
    state = {modern_key(k): v for k, v in state.items() if "classifier" not in k}
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise ValueError(f"{path}: adapter weights that fit no module: {unexpected[:5]}")
    model = stamp_from_backbone(peft_model, processor, settings)
    _set_head(model, head, path)
    return model.to(backbone.dtype), processor
