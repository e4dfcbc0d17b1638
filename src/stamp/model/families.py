"""The backbone families STAMP runs on, and the ones it refuses.

A family is one of transformers' Qwen vision-language models whose language model STAMP drives
through public inputs only: a 4-D attention mask (the bidirectional mask block), explicit M-RoPE
``position_ids`` and ``inputs_embeds``. Each family is named by its ``model_type``:

* ``qwen2_vl``   - Qwen2-VL: 14-px patches merged 2x2 (28-px cells).
* ``qwen2_5_vl`` - Qwen2.5-VL: the same cells; a vision tower with window attention and a few
  full-attention blocks (internal to transformers' encoder, which returns the merged features in
  the image's row-major order, as Qwen2-VL's does).
* ``qwen3_vl``   - Qwen3-VL: 16-px patches (32-px cells), interleaved M-RoPE, and DeepStack:
  features of early vision layers added to the hidden states of the image tokens after the first
  decoder layers (``deepstack_visual_embeds``; see ``StampModel.deepstack_mask_tokens``).

A decoder with recurrent or linear-attention layers (``qwen3_5``, ``qwen3_next``, ...) cannot
give a block of tokens bidirectional attention through a mask: those layers carry a state from
token to token, which no attention mask reaches. Such backbones are refused (docs/BACKBONES.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import (
    PreTrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

FAMILIES: dict[str, tuple[type, type]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}
DEFAULT_FAMILY = "qwen2_vl"  # an arch: block without model_type (the Qwen2-VL configs)
# decoder layers whose attention a 4-D mask fully describes
MASKABLE_LAYERS = {"full_attention", "sliding_attention"}
# model types known to have recurrent / linear-attention decoder layers
RECURRENT_MODEL_TYPES = {
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_next",
    "mamba",
    "mamba2",
    "jamba",
    "zamba",
    "zamba2",
    "falcon_h1",
    "bamba",
    "lfm2",
    "lfm2_vl",
}
# families whose text model takes a prepared {layer type: mask} mapping (``sdpa_hybrid``'s Spans)
MASK_MAPPING_FAMILIES = {"qwen2_vl", "qwen2_5_vl"}


def _get(config: Mapping[str, Any] | PreTrainedConfig, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def refusal(config: Mapping[str, Any] | PreTrainedConfig) -> str | None:
    """Why STAMP cannot run on a backbone of this config (None: it can)."""
    model_type = _get(config, "model_type") or DEFAULT_FAMILY
    text = _get(config, "text_config") or config
    layer_types = list(_get(text, "layer_types") or _get(config, "layer_types") or [])
    other = sorted({t for t in layer_types if t not in MASKABLE_LAYERS})
    if other or model_type in RECURRENT_MODEL_TYPES:
        what = f"layer_types {other}" if other else f"model_type {model_type!r}"
        return (
            f"its decoder has recurrent/linear-attention layers ({what}): such a layer carries a state "
            "from token to token, so no attention mask can make STAMP's mask block bidirectional "
            "(the block would silently run causally); see docs/BACKBONES.md"
        )
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} is not a supported family; supported: {sorted(FAMILIES)}"
    return None


def family_of(config: Mapping[str, Any] | PreTrainedConfig, key: str = "model.backbone") -> str:
    """The family (``model_type``) of a backbone config; a clear error for one STAMP cannot run on
    (``key``: the setting that names the backbone, for the message)."""
    why = refusal(config)
    if why is not None:
        raise ValueError(f"{key}: STAMP cannot use this backbone: {why}")
    return _get(config, "model_type") or DEFAULT_FAMILY


def config_class(family: str) -> type:
    return FAMILIES[family][0]


def model_class(family: str) -> type:
    return FAMILIES[family][1]
