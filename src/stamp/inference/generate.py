"""Generation with the KV cache, then ONE batched mask forward that reuses it.

The image is encoded once; the answer is generated greedily; then every mask block of every
``<|seg|>`` in the batch is run in a single forward whose queries are the blocks and whose keys
are the cache plus the blocks. Each block sees the cache up to its own ``<|seg|>`` only (the
attention mask hides the text after it), so no prefix is recomputed and nothing is cut.

The three steps are separate functions (``prefill``, ``decode``, ``mask_forward``) so that
benchmarks can time them; ``generate_with_masks`` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from stamp.model.mask_block import attention_mask, hybrid_spans
from stamp.model.stamp import Seg, StampModel
from stamp.model.tokens import IM_END, SEG_TOKEN


@dataclass
class RowOutput:
    """What one batch row produced."""

    text: str  # the answer, with <|seg|> kept and chat tokens removed
    token_ids: list[int]
    cell_logits: list[torch.Tensor] = field(default_factory=list)  # one (h, w) per <|seg|>


@dataclass
class State:
    """A batch being generated: its tokens so far and the cache of all but the uncached tail."""

    ids: torch.Tensor  # (B, L)
    valid: torch.Tensor  # (B, L) bool, False for padding
    positions: torch.Tensor  # (3, B, L) M-RoPE positions
    cache: DynamicCache
    features: list[torch.Tensor]  # one (N_i, D) per image
    cached: int  # columns held by the cache
    next_token: torch.Tensor  # (B,) greedy prediction after the last cached column


def _causal(valid: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask (B, 1, L, L) for a fresh sequence."""
    B, L = valid.shape
    idx = torch.arange(L, device=valid.device).expand(B, L)
    key_text = torch.where(valid, idx, -1)
    none = torch.full_like(idx, -1)
    return attention_mask(key_text, none, key_text, none, idx)


def _step_mask(valid: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, 1, K) for one new token at the last column of ``valid`` (B, K)."""
    B, K = valid.shape
    idx = torch.arange(K, device=valid.device).expand(B, K)
    key_text = torch.where(valid, idx, -1)
    limit = torch.where(valid[:, -1], K - 1, -1)[:, None]
    none = torch.full((B, 1), -1, dtype=torch.long, device=valid.device)
    return attention_mask(key_text, torch.full_like(idx, -1), limit, none, torch.full_like(none, K - 1))


def answer_starts(ids: torch.Tensor, header: list[int]) -> list[int]:
    """Per row, the column right after the last ``<|im_start|>assistant\\n`` header."""
    n, starts = len(header), []
    for row in ids.tolist():
        hits = [i + n for i in range(len(row) - n + 1) if row[i : i + n] == header]
        starts.append(hits[-1] if hits else len(row))
    return starts


def prefill(model: StampModel, batch: dict) -> State:
    """Encode the images once and run the (left-padded) prompts through the language model."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    features = model.encode_images(batch.get("pixel_values"), batch.get("image_grid_thw"))
    positions = model.text_positions(batch)
    cache = DynamicCache(config=model.qwen.config.text_config)
    mask = hybrid_spans(valid, [], 0, with_text=True, causal_blocks=False) if model.uses_spans else None
    mask = _causal(valid) if mask is None else mask  # sdpa_hybrid: each prompt causally, no (L, L) mask
    deepstack = model.text_deepstack(ids, features)  # Qwen3-VL: at the image tokens; else None
    hidden = model.run_language_model(model.embed(ids, features), positions, mask, cache, deepstack)
    nxt = model.qwen.lm_head(hidden[:, -1]).argmax(-1)
    return State(ids, valid, positions, cache, features, ids.shape[1], nxt)


def feed(model: StampModel, state: State, tokens: torch.Tensor, live: torch.Tensor) -> None:
    """Append one column of tokens (``live`` False = padding), run it, predict the next."""
    new_pos = state.positions.amax(dim=(0, 2)) + 1  # text after the image: t = h = w
    B = tokens.shape[0]
    state.ids = torch.cat([state.ids, tokens[:, None]], 1)
    state.valid = torch.cat([state.valid, live[:, None]], 1)
    state.positions = torch.cat([state.positions, new_pos.expand(3, B)[..., None]], 2)
    embeds = model.language_model.embed_tokens(tokens)[:, None]
    hidden = model.run_language_model(embeds, state.positions[..., -1:], _step_mask(state.valid), state.cache)
    state.cached += 1
    state.next_token = model.qwen.lm_head(hidden[:, -1]).argmax(-1)


def decode(model: StampModel, state: State, max_new_tokens: int, stop_ids: set[int], pad_id: int) -> State:
    """Greedy generation until every row has produced a stop token (or the length limit).

    Every generated token is fed, so the cache ends up holding the whole answer.
    """
    device = state.ids.device
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    done = torch.zeros(state.ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        tok = torch.where(done, torch.full_like(state.next_token, pad_id), state.next_token)
        feed(model, state, tok, ~done)
        done = done | torch.isin(tok, stop)
        if done.all():
            break
    return state


def rows_of_cache(cache: DynamicCache, rows: torch.Tensor, config) -> DynamicCache:
    """A new cache whose row i is row ``rows[i]`` of ``cache`` (the original is left as it is)."""
    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
    return out


def mask_forward(model: StampModel, segs: list[Seg], features, positions, valid, cache) -> list[torch.Tensor]:
    """One forward over the mask blocks of all ``segs`` against a cache of ``valid.shape[1]`` tokens.

    Each block gets a batch row of its own, over a copy of its row of the cache: the blocks of
    one answer never attend to each other, so laying them side by side in one sequence would
    only grow the attention as (K x N)^2 for K blocks of N cells; one row per block keeps the
    cost linear in K. The given cache is not extended.
    """
    if not segs:
        return []
    if model.uses_spans:
        return _mask_forward_spans(model, segs, features, positions, valid, cache)
    rows = torch.tensor([sg.row for sg in segs], device=valid.device)
    cache = rows_of_cache(cache, rows, model.qwen.config.text_config)
    valid, positions = valid[rows], positions[:, rows]
    segs = [replace(sg, row=i) for i, sg in enumerate(segs)]
    B, C = valid.shape
    blk = model.blocks(segs, features, positions, B)
    Q = blk.group.shape[1]
    idx = torch.arange(C, device=valid.device).expand(B, C)
    key_text = torch.cat([torch.where(valid, idx, -1), torch.full_like(blk.group, -1)], 1)
    key_group = torch.cat([torch.full_like(idx, -1), blk.group], 1)
    query_key = (C + torch.arange(Q, device=valid.device)).expand(B, Q)
    mask = model.restrict(attention_mask(key_text, key_group, blk.limit, blk.group, query_key), query_key)
    hidden = model.run_language_model(blk.embeds, blk.positions, mask, cache, blk.deepstack)
    return model.read_masks(hidden, segs, blk.starts)


def _mask_forward_spans(model: StampModel, segs, features, positions, valid, cache) -> list[torch.Tensor]:
    """``mask_forward`` under ``sdpa_hybrid``: the blocks of one answer side by side in its row,
    each attending to its prefix and itself only (``Spans``), so the cache is copied once per
    answer with a ``<|seg|>`` (not per block), and not at all when every row has one."""
    rows = sorted({sg.row for sg in segs})
    own = len(rows) == valid.shape[0]  # every row has a block: run on the caller's cache, then crop it
    if not own:
        index = torch.tensor(rows, device=valid.device)
        cache = rows_of_cache(cache, index, model.qwen.config.text_config)
        valid, positions = valid[index], positions[:, index]
    C = valid.shape[1]
    segs = [replace(sg, row=rows.index(sg.row)) for sg in segs]
    blk = model.blocks(segs, features, positions, valid.shape[0])
    blocks = [
        (sg.row, a, sg.grid_hw[0] * sg.grid_hw[1], sg.pos) for sg, a in zip(segs, blk.starts, strict=True)
    ]
    spans = hybrid_spans(valid, blocks, C, with_text=False, causal_blocks=model.mask_attention == "causal")
    if spans is None:
        raise ValueError("sdpa_hybrid: a row's cached tokens are not one contiguous run")
    try:
        hidden = model.run_language_model(blk.embeds, blk.positions, spans, cache, blk.deepstack)
    finally:
        if own:  # the block tokens were appended to the caller's cache: take them off again
            cache.crop(-blk.embeds.shape[1])
    return model.read_masks(hidden, segs, blk.starts)


@torch.no_grad()
def generate_with_masks(
    model: StampModel,
    batch: dict,
    tokenizer,
    max_new_tokens: int = 32,
    teacher_forcing: bool = False,
) -> list[RowOutput]:
    """Answer each row of a left-padded ``generate``-mode batch and predict its masks.

    With ``teacher_forcing`` the batch already holds the answers; they are run in the prefill
    and only the masks are predicted.
    """
    stop = {tokenizer.convert_tokens_to_ids(t) for t in (IM_END, "<|endoftext|>")}
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    P = batch["input_ids"].shape[1]
    state = prefill(model, batch)
    starts = answer_starts(state.ids, header) if teacher_forcing else [P] * state.ids.shape[0]
    if not teacher_forcing:
        decode(model, state, max_new_tokens, stop, tokenizer.pad_token_id)
    segs = [
        sg
        for sg in model.find_segs(state.ids, state.valid, batch.get("image_grid_thw"))
        if sg.pos >= starts[sg.row]
    ]
    logits = mask_forward(model, segs, state.features, state.positions, state.valid, state.cache)

    outputs = []
    for b in range(state.ids.shape[0]):
        answer = [
            t
            for t, v in zip(
                state.ids[b, starts[b] :].tolist(), state.valid[b, starts[b] :].tolist(), strict=True
            )
            if v
        ]
        cut = next((i for i, t in enumerate(answer) if t in stop), len(answer))
        text = tokenizer.decode(answer[:cut], skip_special_tokens=False)
        outputs.append(RowOutput(text.strip(), answer[:cut]))
    for sg, lg in zip(segs, logits, strict=True):
        outputs[sg.row].cell_logits.append(lg)
    return outputs


def strip_seg(text: str) -> str:
    """The answer as a user reads it (``<|seg|>`` removed)."""
    return " ".join(text.replace(SEG_TOKEN, " ").split())
