"""``sdpa_fp32``: transformers' sdpa attention, computed in float32 inside a bf16 autocast.

With ``trainer.precision=bf16-mixed`` on a CPU, matrix products gain ~2x in bf16 (AVX512-BF16)
but PyTorch's CPU flash-attention kernel is slower in bf16 than in float32; this implementation
keeps the projections in bf16 and runs only the attention itself in float32. It is registered
through transformers' public ``AttentionInterface`` (no modeling code is patched) and honours the
4-D STAMP mask exactly as ``sdpa`` does. Select it with ``model.attn_implementation=sdpa_fp32``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_fp32"


def sdpa_fp32_attention_forward(module, query, key, value, attention_mask, **kwargs):
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out, weights


AttentionInterface.register(NAME, sdpa_fp32_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
