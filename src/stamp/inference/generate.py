"""Answers from the backbone's own ``generate()``, then ONE batched mask forward over its cache.

The image is encoded once (its features go to ``generate`` as ``mm_encoder_outputs`` and into
the mask blocks); transformers generates the answers (greedy, sampling or beam search, under a
``GenerationConfig`` made from ``conf/generation/``); then every mask block of every
``<|seg|>`` in the batch runs in a single forward whose queries are the blocks and whose keys
are the cache ``generate`` returned plus the blocks. Each block sees the cache up to its own
``<|seg|>`` only (the attention mask hides the text after it), so no prefix is recomputed.

Two cases need the language model once more before the mask forward, both handled by
``extend``: ``generate`` never feeds its last token, so a ``<|seg|>`` generated last is run
into the cache first; and under beam search the returned cache's rows do not follow the chosen
beams, so the chosen answers are run again in one prefill (the documented fallback).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from stamp.model.mask_block import attention_mask, hybrid_spans
from stamp.model.stamp import Seg, StampModel
from stamp.model.tokens import IM_END, SEG_TOKEN
from stamp.utils.config import CONF_DIR

STOP_TOKENS = (IM_END, "<|endoftext|>")
SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # values that change nothing
UNUSED = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # transformers' defaults: not warned about


@dataclass
class RowOutput:
    """What one batch row produced."""

    text: str  # the answer, with <|seg|> kept and chat tokens removed
    token_ids: list[int]
    cell_logits: list[torch.Tensor] = field(default_factory=list)  # one (h, w) per <|seg|>


def generation_settings() -> dict[str, Any]:
    """The defaults of ``generation.*``: ``conf/generation/default.yaml`` (read once)."""
    return dict(_default_settings())


@functools.cache
def _default_settings() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "generation" / "default.yaml"))


def generation_config(generation: GenerationConfig | Mapping | int | None, tokenizer) -> GenerationConfig:
    """A complete ``GenerationConfig`` from ``generation.*`` settings (a mapping over the
    defaults, or just ``max_new_tokens`` as an int), stopping at ``<|im_end|>``. A given
    ``GenerationConfig`` is taken as it is, with STAMP's stop and pad tokens set."""
    if isinstance(generation, GenerationConfig):
        config = GenerationConfig.from_dict(generation.to_dict())
    else:
        settings = generation_settings()
        given = {"max_new_tokens": generation} if isinstance(generation, int) else dict(generation or {})
        unknown = sorted(set(given) - set(settings))
        if unknown:
            raise ValueError(f"unknown generation.{unknown[0]}; expected one of {sorted(settings)}")
        settings.update(given)
        if not settings["do_sample"]:  # unused knobs at transformers' own defaults, so that
            for key, off in SAMPLING_OFF.items():  # no checkpoint default fills them in
                if settings[key] == off:
                    settings[key] = UNUSED[key]
        config = GenerationConfig(**settings)
    config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    config.pad_token_id = tokenizer.pad_token_id
    config.return_dict_in_generate = True  # the cache comes back with the answers
    if config.num_return_sequences not in (None, 1):
        raise ValueError("generation: one answer per question (num_return_sequences 1)")
    try:
        config.validate(strict=True)
    except ValueError as e:
        raise ValueError(f"generation settings: {e}") from e
    return config


class AnswerStreamer(BaseStreamer):
    """Hands the answer so far (decoded, ``<|seg|>`` kept, stop token dropped) to ``on_text``
    each time ``generate`` produces a token that completes a character. One row only."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stop = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
        self.ids: list[int] | None = None  # None until the prompt has passed
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:  # generate() first hands over the prompt
            if value.ndim > 1 and value.shape[0] > 1:
                raise ValueError("streaming answers one question at a time (batch size 1)")
            self.ids = []
            return
        for token in value.reshape(-1).tolist():
            if self.done or token in self.stop:
                self.done = True
                return
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.on_text(text)

    def end(self) -> None:
        pass


def answer_starts(ids: torch.Tensor, header: list[int]) -> list[int]:
    """Per row, the column right after the last ``<|im_start|>assistant\\n`` header."""
    n, starts = len(header), []
    for row in ids.tolist():
        hits = [i + n for i in range(len(row) - n + 1) if row[i : i + n] == header]
        starts.append(hits[-1] if hits else len(row))
    return starts


def until_stop(tokens: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(B, T) True for the generated tokens up to and including each row's first stop token."""
    hit = torch.isin(tokens, stop).long()
    return (hit.cumsum(1) - hit) == 0


def extended_positions(positions: torch.Tensor, n: int) -> torch.Tensor:
    """The prompt's M-RoPE positions (3, B, P) followed by ``n`` generated tokens: text after
    the image has t = h = w, one more per token (padding columns included, as in ``generate``)."""
    start = positions.amax(dim=(0, 2)) + 1
    new = start[:, None] + torch.arange(n, device=positions.device)
    return torch.cat([positions, new.expand(3, -1, -1)], 2)


def extend(model: StampModel, ids, valid, positions, features, cache: DynamicCache) -> torch.Tensor | None:
    """Run the columns of ``ids`` (B, L) that ``cache`` does not hold yet through the language
    model, each token causally over the valid tokens before it (a prefill when it holds none);
    return their last hidden states."""
    start, (B, L) = cache.get_seq_length(), ids.shape
    if start >= L:
        return None
    idx = torch.arange(L, device=ids.device).expand(B, L)
    key_text = torch.where(valid, idx, -1)
    if start == 0:
        embeds, deepstack = model.embed(ids, features), model.text_deepstack(ids, features)
        spans = hybrid_spans(valid, [], 0, with_text=True, causal_blocks=False) if model.uses_spans else None
    else:  # generated tokens only: no image in them
        embeds, deepstack, spans = model.language_model.embed_tokens(ids[:, start:]), None, None
    query = key_text[:, start:]
    none = torch.full_like(query, -1)
    mask = (
        spans
        if spans is not None
        else attention_mask(key_text, torch.full_like(idx, -1), query, none, idx[:, start:])
    )
    return model.run_language_model(embeds, positions[..., start:], mask, cache, deepstack)


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


@dataclass
class Context:
    """A batch with its answers, and the language model's cache of it."""

    ids: torch.Tensor  # (B, L) prompts (left-padded) and answers
    valid: torch.Tensor  # (B, L) bool: False for padding and for what follows a stop token
    positions: torch.Tensor  # (3, B, L) M-RoPE positions
    features: list[torch.Tensor]  # one (N_i, D) per image
    cache: DynamicCache  # of the first columns of ``ids`` (all, or all but the last)
    starts: list[int]  # per row, the answer's first column


def prefill(model: StampModel, batch: dict, starts: list[int] | None = None) -> Context:
    """The batch as it is (prompts and given answers) run into a new cache; ``starts``: where
    the answers begin (default: after the whole batch)."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    features = model.encode_images(batch.get("pixel_values"), batch.get("image_grid_thw"))
    positions = model.text_positions(batch)
    cache = DynamicCache(config=model.qwen.config.text_config)
    extend(model, ids, valid, positions, features, cache)
    return Context(ids, valid, positions, features, cache, starts or [ids.shape[1]] * ids.shape[0])


def generate(model: StampModel, batch: dict, config: GenerationConfig, streamer=None) -> Context:
    """The answers from the backbone's ``generate()`` on the image features encoded once, and
    its cache (under beam search, whose cache rows are beams, a new prefill of the answers)."""
    ids, valid, grid = batch["input_ids"], batch["attention_mask"].bool(), batch.get("image_grid_thw")
    images = model.vision(batch.get("pixel_values"), grid)
    features = model.image_features(images)  # taken before generate() expands them (beam search)
    vision = {"image_grid_thw": grid, "mm_encoder_outputs": {"image": images}} if images is not None else {}
    positions = model.text_positions(batch)
    out = model.qwen.generate(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        position_ids=positions,  # ours, so that generate() need not compute them again
        mm_token_type_ids=batch["mm_token_type_ids"],
        generation_config=config,
        streamer=streamer,
        **vision,
    )
    P, seq = ids.shape[1], out.sequences
    eos = config.eos_token_id
    stop = torch.tensor(
        [] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=seq.device
    )
    ctx = Context(
        ids=seq,
        valid=torch.cat([valid, until_stop(seq[:, P:], stop)], 1),
        positions=extended_positions(positions, seq.shape[1] - P),
        features=features,
        cache=out.cache,
        starts=[P] * seq.shape[0],
    )
    if config.num_beams > 1:
        ctx.cache = DynamicCache(config=model.qwen.config.text_config)
        extend(model, ctx.ids, ctx.valid, ctx.positions, ctx.features, ctx.cache)
    return ctx


def predict_masks(model: StampModel, ctx: Context, grid: torch.Tensor | None) -> tuple[list[Seg], list]:
    """Every ``<|seg|>`` of the answers and its (h, w) cell logits, in one mask forward."""
    segs = [sg for sg in model.find_segs(ctx.ids, ctx.valid, grid) if sg.pos >= ctx.starts[sg.row]]
    if not segs:
        return [], []
    if max(sg.pos for sg in segs) >= ctx.cache.get_seq_length():  # generate() never feeds its last token
        extend(model, ctx.ids, ctx.valid, ctx.positions, ctx.features, ctx.cache)
    C = ctx.cache.get_seq_length()
    return segs, mask_forward(model, segs, ctx.features, ctx.positions[..., :C], ctx.valid[:, :C], ctx.cache)


@torch.no_grad()
def generate_with_masks(
    model: StampModel,
    batch: dict,
    tokenizer,
    generation: GenerationConfig | Mapping | int | None = None,
    teacher_forcing: bool = False,
    streamer: BaseStreamer | None = None,
) -> list[RowOutput]:
    """Answer each row of a left-padded ``generate``-mode batch and predict its masks.

    ``generation``: ``generation.*`` settings (see ``generation_config``). With
    ``teacher_forcing`` the batch already holds the answers; they are run in one prefill and
    only the masks are predicted. ``streamer`` is handed to ``generate`` (e.g. an ``AnswerStreamer``).
    """
    config = generation_config(generation, tokenizer)
    if teacher_forcing:
        header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        ctx = prefill(model, batch, answer_starts(batch["input_ids"], header))
    else:
        ctx = generate(model, batch, config, streamer)
    segs, logits = predict_masks(model, ctx, batch.get("image_grid_thw"))
    outputs = []
    for b, a in enumerate(ctx.starts):
        answer = ctx.ids[b, a:][ctx.valid[b, a:]].tolist()
        cut = next((i for i, t in enumerate(answer) if t in config.eos_token_id), len(answer))
        text = tokenizer.decode(answer[:cut], skip_special_tokens=False)
        outputs.append(RowOutput(text.strip(), answer[:cut]))
    for sg, lg in zip(segs, logits, strict=True):
        outputs[sg.row].cell_logits.append(lg)
    return outputs


def strip_seg(text: str) -> str:
    """The answer as a user reads it (``<|seg|>`` removed)."""
    return " ".join(text.replace(SEG_TOKEN, " ").split())
