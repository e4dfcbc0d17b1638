"""The mask block: where its tokens sit (M-RoPE positions) and what they may attend to.

Everything here is plain tensor code shared by training (fused and two-pass) and inference
(cache reuse), so that the three paths cannot drift apart.

Attention is described per token by four integer vectors, which ``attention_mask`` turns into
a boolean ``B x 1 x Q x K`` mask (True = may attend):

* ``key_text_index``  (B, K): the key's index in the text sequence, or -1 for keys that are not
  text (mask-block tokens, padding). A query sees a text key iff the key's index is at most the
  query's ``query_limit``.
* ``key_group``       (B, K): the mask block the key belongs to, or -1.
* ``query_limit``     (B, Q): last text index the query may see (its own index for text, the
  position of its ``<|seg|>`` for a mask token, -1 for padding).
* ``query_group``     (B, Q): the query's mask block (-1 for text); mask tokens see every key of
  their own block (bidirectional) and nothing of any other block.

Every query also sees itself, so no row is empty (padding rows would otherwise give NaNs).

``hybrid_spans`` states the same rule without a (Q, K) mask, as contiguous query and key ranges
(``attention.Spans``) for the ``sdpa_hybrid`` attention: each row's text causally, each block
against its prefix up to its ``<|seg|>`` and itself.
"""

from __future__ import annotations

import torch

from stamp.model.attention import HYBRID, Span, Spans
from stamp.model.attention import NAME as SDPA_FP32

POSITION_MODES = ("sequential", "grid")


def attention_mask(
    key_text_index: torch.Tensor,
    key_group: torch.Tensor,
    query_limit: torch.Tensor,
    query_group: torch.Tensor,
    query_key_index: torch.Tensor,
) -> torch.Tensor:
    """Build the hybrid mask (B, 1, Q, K), True = may attend. See the module docstring.

    ``query_key_index`` (B, Q) is each query's own column among the keys.
    """
    kt = key_text_index[:, None, :]
    prefix = (kt >= 0) & (kt <= query_limit[:, :, None])
    qg = query_group[:, :, None]
    block = (qg >= 0) & (key_group[:, None, :] == qg)
    keys = torch.arange(key_text_index.shape[1], device=key_text_index.device)
    itself = keys[None, None, :] == query_key_index[:, :, None]
    return (prefix | block | itself)[:, None]


def causal_only(mask: torch.Tensor, query_key_index: torch.Tensor) -> torch.Tensor:
    """Restrict a mask to keys at or before each query's own column (the 'causal' ablation)."""
    keys = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (keys[None, None, None, :] <= query_key_index[:, None, :, None])


def to_attention_bias(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Express a boolean mask in the form the attention implementation consumes.

    sdpa (and ``sdpa_fp32``, its float32 form) takes booleans; eager adds the mask to the scores,
    so it needs 0 / -inf floats.
    """
    if implementation in ("sdpa", SDPA_FP32, HYBRID):
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    raise ValueError(
        f"attention implementation {implementation!r} cannot apply STAMP's 4-D mask; use 'sdpa', '{SDPA_FP32}' or 'eager'"
    )


def block_positions(seg_position: torch.Tensor, grid_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """M-RoPE positions (3, N) of a mask block whose ``<|seg|>`` sits at ``seg_position`` (3,).

    ``sequential``: the N tokens continue the 1-D text positions after the ``<|seg|>``.
    ``grid``: the block takes the image's (t, h, w) grid layout, offset to start right after
    the ``<|seg|>``, as if it were a second copy of the image (one temporal step).
    """
    h, w = grid_hw
    start = seg_position.max() + 1
    device = seg_position.device
    if mode == "sequential":
        return (start + torch.arange(h * w, device=device)).expand(3, -1).clone()
    if mode == "grid":
        hh = torch.arange(h, device=device).repeat_interleave(w)
        ww = torch.arange(w, device=device).repeat(h)
        return torch.stack([torch.zeros_like(hh), hh, ww]) + start
    raise ValueError(f"unknown model.mask_positions {mode!r}; expected one of {POSITION_MODES}")


def pack_plan(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the kept tokens of B rows into fewer rows (first-fit decreasing).

    ``keep`` (B, T) marks each row's real tokens (text without padding, then its mask blocks).
    A row's tokens stay together and in order; a packed row holds whole rows, as many as fit in
    the longest one. Returns ``src_row``, ``src_col`` (R, C): where each packed token comes
    from, and ``valid`` (R, C): False for the packed rows' own padding.
    """
    lengths = keep.sum(1).tolist()
    capacity = max(lengths, default=0)
    bins: list[list[int]] = []
    fill: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, used in enumerate(fill):
            if used + lengths[b] <= capacity:
                bins[r].append(b)
                fill[r] += lengths[b]
                break
        else:
            bins.append([b])
            fill.append(lengths[b])
    R, C = len(bins), capacity
    src_row = torch.zeros(R, C, dtype=torch.long, device=keep.device)
    src_col = torch.zeros(R, C, dtype=torch.long, device=keep.device)
    valid = torch.zeros(R, C, dtype=torch.bool, device=keep.device)
    for r, rows in enumerate(bins):
        rows.sort()
        cols = [torch.nonzero(keep[b], as_tuple=True)[0] for b in rows]
        n = sum(len(c) for c in cols)
        src_row[r, :n] = torch.cat([torch.full_like(c, b) for b, c in zip(rows, cols, strict=True)])
        src_col[r, :n] = torch.cat(cols)
        valid[r, :n] = True
    return src_row, src_col, valid


def packed_mask(
    mask: torch.Tensor, src_row: torch.Tensor, src_col: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The (R, 1, C, C) mask of packed rows: each token keeps the keys it had in its own row
    (``mask`` (B, 1, T, T)) and sees nothing of the other rows packed beside it."""
    same = (src_row[:, :, None] == src_row[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    own = mask[:, 0][src_row[:, :, None], src_col[:, :, None], src_col[:, None, :]]
    itself = torch.eye(src_row.shape[1], dtype=torch.bool, device=mask.device)[None]
    return ((own & same) | itself)[:, None]


# -- the same rule as spans: attention paid only where allowed ------------------------------


def text_run(valid_row: list[bool]) -> tuple[int, int] | None:
    """``[a, b)`` if the row's real tokens are one contiguous run, else None."""
    cols = [i for i, v in enumerate(valid_row) if v]
    if not cols or cols[-1] - cols[0] + 1 != len(cols):
        return None
    return cols[0], cols[-1] + 1


def hybrid_spans(
    valid: torch.Tensor,
    blocks: list[tuple[int, int, int, int]],
    block_offset: int,
    with_text: bool,
    causal_blocks: bool,
) -> Spans | None:
    """The hybrid rule as spans, or None where a row's text is not one contiguous run.

    ``valid`` (B, C): the text (or cached) keys of each row; ``blocks``: (row, start, length,
    seg position) of each mask block, ``start`` among the block tokens, which sit at
    ``block_offset + start`` among the keys; ``with_text``: the text tokens are queries too
    (training) rather than only cached keys (inference). Queries and keys share columns when
    ``with_text``; otherwise the queries are the block tokens alone, numbered from 0.
    """
    runs = [text_run(r) for r in valid.tolist()]
    spans = []
    if with_text:
        for b, run in enumerate(runs):
            if run is None:
                if any(r == b for r, *_ in blocks) or valid[b].any():
                    return None
                continue
            spans.append(Span(b, run[0], run[1], (run,), "causal"))
    for row, start, n, seg in blocks:
        run = runs[row]
        if run is None or not run[0] <= seg < run[1]:
            return None
        k0 = block_offset + start
        q0 = k0 if with_text else start
        kind = "block_causal" if causal_blocks else "full"
        spans.append(Span(row, q0, q0 + n, ((run[0], seg + 1), (k0, k0 + n)), kind))
    return Spans(tuple(spans))
