"""Attention implementations STAMP registers through transformers' public ``AttentionInterface``
(no modeling code is patched); select one with ``model.attn_implementation``.

* ``sdpa_fp32``: transformers' sdpa attention, computed in float32 inside a bf16 autocast. With
  ``trainer.precision=bf16-mixed`` on a CPU, matrix products gain ~2x in bf16 (AVX512-BF16) but
  PyTorch's CPU flash-attention kernel is slower in bf16 than in float32; this keeps the
  projections in bf16 and runs only the attention in float32. It honours the 4-D STAMP mask
  exactly as ``sdpa`` does.
* ``sdpa_hybrid``: attention paid only where the hybrid rule allows it. The model hands every
  layer a ``mask_block.Spans`` (through the language model's ``attention_mask`` mapping, which
  transformers passes to the layers as it is) instead of a (Q, K) mask: each row's text runs as
  one causal sdpa call (``is_causal``, no mask, so the fused kernels apply) and each mask block as
  one unmasked call against its prefix up to its ``<|seg|>`` and itself. Any other mask (prefill
  and decoding in inference) goes to plain sdpa.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_fp32"
HYBRID = "sdpa_hybrid"


@dataclass(frozen=True)
class Span:
    """Queries ``[q0, q1)`` of batch row ``row`` and the key ranges they may see, concatenated
    in order. ``kind``: ``causal`` (the queries are the keys, seen causally: text), ``full``
    (every key: a mask block against its prefix and itself) or ``block_causal`` (every key but
    the last range, which is the block itself, seen causally: the ``causal`` ablation)."""

    row: int
    q0: int
    q1: int
    keys: tuple[tuple[int, int], ...]
    kind: str


@dataclass(frozen=True)
class Spans:
    """The hybrid mask of a batch as a list of dense attention problems (``Span``), for the
    ``sdpa_hybrid`` attention: no (Q, K) mask is built, the text runs with ``is_causal`` and each
    block attends only to its prefix and itself. Queries outside every span get zeros (padding)."""

    spans: tuple[Span, ...]

    def remap(self, row_of: torch.Tensor, col_of: torch.Tensor) -> Spans:
        """The spans after moving token (b, t) to (``row_of[b, t]``, ``col_of[b, t]``), as packing
        does; every range must stay contiguous (packing keeps a row's kept tokens together)."""
        rows, cols = row_of.tolist(), col_of.tolist()

        def move(b: int, r: tuple[int, int]) -> tuple[int, tuple[int, int]]:
            return rows[b][r[0]], (cols[b][r[0]], cols[b][r[0]] + r[1] - r[0])

        out = []
        for sp in self.spans:
            row, (q0, q1) = move(sp.row, (sp.q0, sp.q1))
            out.append(Span(row, q0, q1, tuple(move(sp.row, k)[1] for k in sp.keys), sp.kind))
        return Spans(tuple(out))


def sdpa_fp32_attention_forward(module, query, key, value, attention_mask, **kwargs):
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out, weights


def _block_causal(sp: Span, device: torch.device) -> torch.Tensor:
    """(Q, K) mask of a ``block_causal`` span: the prefix in full, the block up to the query."""
    n, prefix = sp.q1 - sp.q0, sum(b - a for a, b in sp.keys[:-1])
    keys = torch.arange(prefix + n, device=device)
    return keys[None, :] <= (prefix + torch.arange(n, device=device))[:, None]


def _ranges_of(x: torch.Tensor, ranges: list[tuple[int, int]]) -> Callable[..., torch.Tensor]:
    """``take(r1, r2, ...)``: ranges of ``x`` (H, T, D) along T, concatenated. ``x`` is split once
    at every edge of ``ranges`` and each range is made of those views: slicing ``x`` per range
    instead would make each slice's backward fill a zero gradient of ``x``'s whole size."""
    edges = sorted({0, x.shape[1], *(e for r in ranges for e in r)})
    parts = dict(zip(edges[:-1], x.split([b - a for a, b in itertools.pairwise(edges)], 1), strict=True))

    def take(*rs: tuple[int, int]) -> torch.Tensor:
        chosen = [parts[e] for a, b in rs for e in edges if a <= e < b]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen, 1)

    return take


def sdpa_hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``query`` (B, H, Q, D), ``key``/``value`` (B, H_kv, K, D) -> (B, Q, H, D), as sdpa returns."""
    if not isinstance(attention_mask, Spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    B, H, Q, D = query.shape
    rows = []
    for b, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0), strict=True)):
        spans = sorted((sp for sp in attention_mask.spans if sp.row == b), key=lambda sp: sp.q0)
        key_ranges = [r for sp in spans for r in sp.keys]
        qs = _ranges_of(q, [(sp.q0, sp.q1) for sp in spans])
        ks, vs = _ranges_of(k, key_ranges), _ranges_of(v, key_ranges)
        out, at = [], 0
        for sp in spans:
            if sp.q0 > at:  # queries outside every span (padding) get zeros
                out.append(query.new_zeros(sp.q0 - at, H, D))
            o, _ = sdpa_attention_forward(
                module,
                qs((sp.q0, sp.q1))[None],
                ks(*sp.keys)[None],
                vs(*sp.keys)[None],
                _block_causal(sp, query.device) if sp.kind == "block_causal" else None,
                is_causal=sp.kind == "causal",
                **kwargs,
            )
            out.append(o[0])
            at = sp.q1
        if at < Q:
            out.append(query.new_zeros(Q - at, H, D))
        rows.append(out[0] if len(out) == 1 else torch.cat(out, 0))
    return (rows[0][None] if B == 1 else torch.stack(rows)), None


AttentionInterface.register(NAME, sdpa_fp32_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(HYBRID, sdpa_hybrid_attention_forward)
AttentionMaskInterface.register(HYBRID, sdpa_mask)
