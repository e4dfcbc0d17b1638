"""Parameter counts and a training-memory estimate from the architecture alone (``train.dry_run``).

The STAMP model is built on the meta device (shapes, no storage): nothing is downloaded or
loaded. The memory estimate covers what lives for the whole run - weights, gradients of the
trained parameters, AdamW's two moment buffers and, where the strategy keeps one, an fp32
master copy - per model replica (plain DDP), before any ZeRO/FSDP sharding, and without
activations, the CUDA context, or allocator fragmentation.

Which dtype holds what (Lightning 2.x with ``torch.optim.AdamW``):

* ``bf16-true`` / ``16-true`` / ``64-true`` convert the module to that dtype; ``32-true``,
  ``bf16-mixed`` and ``16-mixed`` keep the dtype it was loaded in (``model.dtype``) and, for
  the mixed ones, compute in 16 bits under autocast.
* AdamW keeps its moments, and autograd the gradients, in the parameters' dtype.
* DeepSpeed (``fp32_master=True``) holds 16-bit weights and gradients, plus an fp32 master copy
  of the trained weights and fp32 moments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# precision -> the dtype Lightning converts the module to (None: keeps the loaded dtype)
PRECISIONS: dict[str, str | None] = {
    "64-true": "float64",
    "32-true": None,
    "bf16-true": "bfloat16",
    "16-true": "float16",
    "bf16-mixed": None,
    "16-mixed": None,
}
LEGACY_PRECISIONS = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
GIB = 1024**3


def normalise_precision(precision: str | int) -> str:
    p = LEGACY_PRECISIONS.get(str(precision), str(precision))
    if p not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r} is not one the memory estimate knows; "
            f"expected one of {sorted(PRECISIONS)}"
        )
    return p


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held for the whole training run (activations excluded)."""

    param_dtype: str  # dtype the parameters are held in during training
    weights: int
    gradients: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq
    master: int  # fp32 master copy of the trained weights (0 when the weights are the master)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.master

    @property
    def low_precision_updates(self) -> bool:
        """True when the optimizer updates 16-bit weights directly (no fp32 copy anywhere)."""
        return self.master == 0 and BYTES[self.param_dtype] < 4 and self.optimizer > 0


def estimate_training_memory(
    total_params: int,
    trainable_params: int,
    precision: str | int,
    model_dtype: str = "float32",
    fp32_master: bool = False,
) -> MemoryEstimate:
    """Memory of weights + gradients + AdamW states (+ fp32 master) for one model replica.

    Args:
        total_params: every parameter held in memory (frozen ones included).
        trainable_params: parameters with ``requires_grad`` (gradients and optimizer states).
        precision: the trainer's precision (``bf16-mixed``, ``bf16-true``, ``32-true``, ...).
        model_dtype: the dtype the model is loaded in (``model.dtype``).
        fp32_master: the strategy keeps 16-bit weights and an fp32 master copy (DeepSpeed).
    """
    precision = normalise_precision(precision)
    if model_dtype not in BYTES:
        raise ValueError(f"model.dtype={model_dtype!r}: expected one of {sorted(BYTES)}")
    if not 0 <= trainable_params <= total_params:
        raise ValueError(f"need 0 <= trainable ({trainable_params}) <= total ({total_params}) parameters")
    if fp32_master and precision.endswith("-mixed"):
        half = "bfloat16" if precision.startswith("bf16") else "float16"
        return MemoryEstimate(
            param_dtype=half,
            weights=total_params * BYTES[half],
            gradients=trainable_params * BYTES[half],
            optimizer=2 * trainable_params * 4,
            master=trainable_params * 4,
        )
    dtype = PRECISIONS[precision] or model_dtype
    b = BYTES[dtype]
    return MemoryEstimate(
        param_dtype=dtype,
        weights=total_params * b,
        gradients=trainable_params * b,
        optimizer=2 * trainable_params * b,
        master=0,
    )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of ``module``; shared tensors counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def meta_stamp(model_cfg: Mapping[str, Any]):
    """The STAMP model of ``model_cfg`` on the meta device, and the backbone's own parameter count.

    The architecture comes from ``model.arch`` or, without one, from the ``config.json`` and
    tokenizer of a local checkpoint directory ``model.backbone``.
    """
    from stamp.model.backbone import build_on_meta
    from stamp.model.build import stamp_with_token_ids

    arch = model_cfg.get("arch")
    if arch is not None:
        arch = dict(arch)
        if "tokenizer_len" not in arch:
            raise ValueError(
                "model.arch has no tokenizer_len (the tokenizer's length before STAMP's two tokens)"
            )
        seg_id = int(arch["tokenizer_len"])  # add_stamp_tokens appends <|seg|> then <|mask|>
        backbone = build_on_meta(arch)
    else:
        from stamp.model.tiny import ensure_configured_tiny

        ensure_configured_tiny(model_cfg)  # an embedded tiny model: built on first use, as training does
        backbone, seg_id = _meta_from_checkpoint(str(model_cfg.get("backbone")))
    backbone_params, _ = count_parameters(backbone)
    with_head = stamp_with_token_ids(backbone, seg_id, seg_id + 1, model_cfg)
    return with_head, backbone_params


def _meta_from_checkpoint(path: str):
    from transformers import AutoConfig, AutoTokenizer

    from stamp.model.backbone import build_on_meta
    from stamp.model.tokens import MASK_TOKEN, SEG_TOKEN, add_stamp_tokens

    if not (Path(path) / "config.json").is_file():
        raise ValueError(
            f"model.backbone={path!r} is not a local checkpoint directory and the model config has no "
            "arch: block; a dry run needs the architecture without downloading (see conf/model/qwen2vl_2b.yaml)"
        )
    tok = AutoTokenizer.from_pretrained(path)
    add_stamp_tokens(tok)
    arch = AutoConfig.from_pretrained(path).to_dict()  # its model_type names the family
    arch["tokenizer_len"] = len(tok)
    seg_id, mask_id = tok.convert_tokens_to_ids(SEG_TOKEN), tok.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id != seg_id + 1:
        raise ValueError(
            f"{path}: expected <|mask|> right after <|seg|> in the tokenizer, got ids {seg_id}, {mask_id}"
        )
    return build_on_meta(arch, extra_tokens=0), seg_id


def _n(x: int) -> str:
    return f"{x:,} ({x / 1e9:.2f} B)" if x >= 1e8 else f"{x:,}"


def dry_run(model_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any]) -> dict[str, float]:
    """Print parameter counts and the training-memory estimate of the configured run; return them."""
    model, backbone_params = meta_stamp(model_cfg)
    total, trainable = count_parameters(model)
    _, head_trainable = count_parameters(model.mask_head)
    strategy = trainer_cfg.get("strategy")
    strategy_name = strategy if isinstance(strategy, str) else (strategy or {}).get("_target_", "")
    fp32_master = "deepspeed" in str(strategy_name).lower()
    precision = trainer_cfg.get("precision", "32-true")
    mem = estimate_training_memory(
        total, trainable, precision, model_cfg.get("dtype", "float32"), fp32_master
    )
    b = BYTES[mem.param_dtype]
    lines = [
        "STAMP dry run: model built on the meta device (no weights loaded, no data read)",
        f"  backbone             {model_cfg.get('backbone')}",
        f"  backbone parameters  {_n(backbone_params)}",
        f"  parameters in memory {_n(total)}"
        + (
            "  (with LoRA adapters and peft's trained copies of modules_to_save)"
            if model_cfg.get("lora")
            else ""
        ),
        f"  trainable parameters {_n(trainable)} = backbone {trainable - head_trainable:,} + mask head {head_trainable:,}",
        f"  ESTIMATED training memory per model replica, EXCLUDING activations (trainer.precision={precision}, "
        f"parameters in {mem.param_dtype}{', DeepSpeed fp32 master' if fp32_master else ''}):",
        f"    weights           {mem.weights / GIB:8.2f} GiB  (all parameters x {b} bytes)",
        f"    gradients         {mem.gradients / GIB:8.2f} GiB  (trainable x {b} bytes)",
        f"    AdamW states      {mem.optimizer / GIB:8.2f} GiB  (2 x trainable x {mem.optimizer // max(1, 2 * trainable)} bytes)",
        f"    fp32 master copy  {mem.master / GIB:8.2f} GiB",
        f"    total             {mem.total / GIB:8.2f} GiB  (ZeRO/FSDP shard the states over the GPUs)",
    ]
    out = {
        "dry_run/backbone_params": float(backbone_params),
        "dry_run/params": float(total),
        "dry_run/trainable_params": float(trainable),
        "dry_run/memory_gib": mem.total / GIB,
    }
    lora = dict(model_cfg.get("lora") or {})
    if {"embed_tokens", "lm_head"} & set(lora.get("modules_to_save") or []):
        lines.append("  embed_tokens and lm_head (lora.new_token_rows_only), same estimate:")
        for rows_only in (False, True):
            variant, _ = meta_stamp({**model_cfg, "lora": {**lora, "new_token_rows_only": rows_only}})
            v_total, v_trainable = count_parameters(variant)
            v_mem = estimate_training_memory(
                v_total, v_trainable, precision, model_cfg.get("dtype", "float32"), fp32_master
            )
            what = "only the rows of <|seg|>, <|mask|>" if rows_only else "full copies trained"
            lines.append(
                f"    {str(rows_only).lower():5}  {what:36} parameters {_n(v_total)}, trainable {_n(v_trainable)}, "
                f"estimate {v_mem.total / GIB:.2f} GiB"
            )
            key = "rows_only" if rows_only else "full_copies"
            out[f"dry_run/trainable_params_{key}"] = float(v_trainable)
            out[f"dry_run/memory_gib_{key}"] = v_mem.total / GIB
    if mem.low_precision_updates:
        lines.append(
            f"  note: AdamW updates {mem.param_dtype} weights directly (no fp32 master copy); small updates "
            "can be lost. For fp32 master weights use model.dtype=float32 with trainer.precision=bf16-mixed."
        )
    print("\n".join(lines), flush=True)
    return out
