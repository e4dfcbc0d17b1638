"""The STAMP model: a Qwen VL backbone, a mask block per ``<|seg|>`` and a linear mask head.

The backbone is one of the families of ``stamp.model.families`` (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL), driven through public inputs only. Qwen3-VL's DeepStack (features of early vision
layers added to the image tokens after the first decoder layers) is passed to its language model
as ``visual_pos_masks``/``deepstack_visual_embeds`` (``Deepstack``), for the image tokens always
and for the mask-block tokens when ``deepstack_mask_tokens`` is set.

Training runs in one of two equivalent ways (``train_forward``):

* ``fused``    - one vision pass and one language pass per batch: every mask block is appended
  at the end of its sequence with the positions and attention it would have right after its
  ``<|seg|>`` (docs/METHOD.md section 5).
* ``two_pass`` - the released code's way, kept as the reference: one pass for the language
  loss, then one pass per ``<|seg|>`` over the sequence cut after it, re-encoding the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stamp.model.attention import HYBRID, Spans
from stamp.model.families import MASK_MAPPING_FAMILIES, family_of
from stamp.model.losses import seg_loss
from stamp.model.mask_block import (
    POSITION_MODES,
    attention_mask,
    block_positions,
    causal_only,
    hybrid_spans,
    pack_plan,
    packed_mask,
    to_attention_bias,
)
from stamp.model.patch_embed import linear_patch_embeddings

TRAIN_FORWARDS = ("fused", "two_pass")
MASK_ATTENTIONS = ("hybrid", "causal")


@dataclass
class Seg:
    """One ``<|seg|>`` in a batch: its row, its position, and the image its block copies."""

    row: int
    pos: int
    image: int  # global index into the batch's images
    grid_hw: tuple[int, int]  # merged cells (h, w)


class ImageFeatures(list):
    """One (N_i, D) tensor of merged vision features per image (a plain list of them) and, for a
    backbone with DeepStack (Qwen3-VL), ``deepstack[i]``: image i's features for the early
    decoder layers, one (N_i, D) tensor per layer (empty for the other families)."""

    def __init__(self, features=(), deepstack: list[list[torch.Tensor]] | None = None) -> None:
        super().__init__(features)
        self.deepstack = deepstack or []


@dataclass
class Deepstack:
    """DeepStack inputs of one language-model call: after decoder layer i, the token (b, t) gets
    ``features[i][index[b, t]]`` added to its hidden state (nothing where ``index`` is -1)."""

    index: torch.Tensor  # (B, T) long
    features: list[torch.Tensor]  # one (N, D) per early decoder layer

    def cat(self, other: Deepstack) -> Deepstack:
        """``other``'s tokens appended after this one's (along the sequence)."""
        n = self.features[0].shape[0]
        shifted = torch.where(other.index >= 0, other.index + n, -1)
        feats = [torch.cat([a, b]) for a, b in zip(self.features, other.features, strict=True)]
        return Deepstack(torch.cat([self.index, shifted], 1), feats)

    def take(self, rows: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> Deepstack:
        """The tokens at (``rows``, ``cols``), as ``run_packed`` lays them out (``valid``: real)."""
        return Deepstack(torch.where(valid, self.index[rows, cols], -1), self.features)

    def model_kwargs(self) -> dict:
        """The language model's own inputs: ``visual_pos_masks`` and ``deepstack_visual_embeds``."""
        where = self.index >= 0
        rows = self.index[where]
        return {"visual_pos_masks": where, "deepstack_visual_embeds": [f[rows] for f in self.features]}


@dataclass
class Blocks:
    """Mask blocks laid out row by row (Q = the longest row's total block length)."""

    embeds: torch.Tensor  # (B, Q, D)
    positions: torch.Tensor  # (3, B, Q)
    group: torch.Tensor  # (B, Q) block id, -1 for padding
    limit: torch.Tensor  # (B, Q) position of the block's <|seg|>, -1 for padding
    starts: list[int]  # first column of each block in its row
    deepstack: Deepstack | None = None  # the blocks' DeepStack inputs (Qwen3-VL)


@dataclass
class StampOutput:
    loss: torch.Tensor
    loss_lm: torch.Tensor
    loss_seg: torch.Tensor
    mask_logits: list[torch.Tensor] = field(default_factory=list)  # one (h, w) per <|seg|>
    lm_logits: torch.Tensor | None = None


class StampModel(nn.Module):
    """A Qwen VL backbone + STAMP mask prediction.

    Args:
        backbone: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
            or ``Qwen3VLForConditionalGeneration`` (or a peft model wrapping one).
        seg_token_id, mask_token_id: ids of ``<|seg|>`` and ``<|mask|>``.
        mask_positions: ``sequential`` or ``grid`` (see ``mask_block.block_positions``).
        mask_attention: ``hybrid`` (bidirectional block, the method) or ``causal`` (ablation).
        add_patch_features: add the patch's vision feature to each mask token's embedding.
        bce_weight, dice_weight: weights of the two terms of the mask loss.
        lm_weight: weight of the language loss in the total (docs/METHOD.md section 3: 1).
        train_forward: ``fused`` or ``two_pass``.
        pack_rows: in training passes, pack the batch's rows (text and mask blocks, without
            padding) into as few rows as fit the longest one: the same results with less
            padding to compute (see ``run_packed``).
        deepstack_mask_tokens: with a DeepStack backbone (Qwen3-VL), add each patch's DeepStack
            features to its mask token after the first decoder layers, as the backbone does for
            the patch's image token (the mask token carries the patch's features, so it is treated
            as one more view of the patch); False: the mask tokens get none. No effect on the
            other families. docs/BACKBONES.md has the measurement behind the default.
    """

    def __init__(
        self,
        backbone: nn.Module,
        seg_token_id: int,
        mask_token_id: int,
        mask_positions: str = "sequential",
        mask_attention: str = "hybrid",
        add_patch_features: bool = True,
        bce_weight: float = 0.3,
        dice_weight: float = 0.7,
        lm_weight: float = 1.0,
        train_forward: str = "fused",
        pack_rows: bool = False,
        deepstack_mask_tokens: bool = True,
    ) -> None:
        super().__init__()
        for name, value, valid in (
            ("mask_positions", mask_positions, POSITION_MODES),
            ("mask_attention", mask_attention, MASK_ATTENTIONS),
            ("train_forward", train_forward, TRAIN_FORWARDS),
        ):
            if value not in valid:
                raise ValueError(f"unknown model.{name} {value!r}; expected one of {list(valid)}")
        self.backbone = backbone
        linear_patch_embeddings(backbone)  # the patch Conv3d as the matrix product it is (patch_embed.py)
        self.seg_token_id, self.mask_token_id = seg_token_id, mask_token_id
        self.mask_positions, self.mask_attention = mask_positions, mask_attention
        self.add_patch_features = add_patch_features
        self.bce_weight, self.dice_weight, self.lm_weight = bce_weight, dice_weight, lm_weight
        self.train_forward, self.pack_rows = train_forward, pack_rows
        cfg = self.qwen.config
        self.family = family_of(cfg)
        self.image_token_id = cfg.image_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.merge = cfg.vision_config.spatial_merge_size
        self.has_deepstack = bool(getattr(cfg.vision_config, "deepstack_visual_indexes", None))
        self.deepstack_mask_tokens = deepstack_mask_tokens
        hidden = cfg.text_config.hidden_size
        self.mask_head = nn.Linear(hidden, 1, device=self.qwen.lm_head.weight.device)
        self.check_attention()

    # -- the backbone's parts ---------------------------------------------------------------

    @property
    def qwen(self) -> nn.Module:
        """The underlying ``...ForConditionalGeneration`` of the family (unwrapping peft)."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    @property
    def language_model(self) -> nn.Module:
        return self.qwen.model.language_model

    def vision(self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None):
        """Vision encoder + merger, as transformers returns it (``pooler_output``: one (N_i, D)
        tensor of merged features per image; ``generate`` takes it as ``mm_encoder_outputs``),
        or None without images."""
        if pixel_values is None:
            return None
        return self.qwen.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def encode_images(
        self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> ImageFeatures:
        """One (N_i, D) tensor of merged features per image (and, for Qwen3-VL, each image's
        DeepStack features)."""
        return self.image_features(self.vision(pixel_values, image_grid_thw))

    @staticmethod
    def image_features(out) -> ImageFeatures:
        """``ImageFeatures`` from the output of ``vision`` (empty for None)."""
        if out is None:
            return ImageFeatures()
        layers = getattr(out, "deepstack_features", None) or []  # per layer, per image
        return ImageFeatures(out.pooler_output, [list(per_image) for per_image in zip(*layers, strict=True)])

    def text_deepstack(self, input_ids: torch.Tensor, features: ImageFeatures) -> Deepstack | None:
        """DeepStack inputs of a text sequence: each image's features at its ``<|image_pad|>``
        tokens, in the order ``embed`` places the merged features (None without DeepStack)."""
        if not getattr(features, "deepstack", None):
            return None
        slots = input_ids == self.image_token_id
        index = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        index[slots] = torch.arange(int(slots.sum()), device=input_ids.device)
        per_layer = [torch.cat(layer) for layer in zip(*features.deepstack, strict=True)]
        return Deepstack(index, per_layer)

    def embed(self, input_ids: torch.Tensor, image_features: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each image's features placed at its ``<|image_pad|>`` tokens."""
        return self.place_images(self.language_model.embed_tokens(input_ids), input_ids, image_features)

    def embed_with_mask_token(
        self, input_ids: torch.Tensor, image_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed`` and the ``<|mask|>`` embedding (D,), looked up in the same call.

        One lookup per forward matters at real vocabularies: the embedding's backward makes a
        dense gradient of the whole table (151,936 x 1536 floats, 0.93 GB, for the 2B) per call.
        """
        ids = torch.cat([input_ids.reshape(-1), input_ids.new_tensor([self.mask_token_id])])
        table = self.language_model.embed_tokens(ids)
        embeds = table[:-1].view(*input_ids.shape, -1)
        return self.place_images(embeds, input_ids, image_features), table[-1]

    def place_images(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, image_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """``embeds`` with each image's features placed at its ``<|image_pad|>`` tokens."""
        if image_features:
            feats = torch.cat(image_features).to(embeds.dtype)
            slots = input_ids == self.image_token_id
            if int(slots.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} <|image_pad|> tokens but {feats.shape[0]} image features in the batch"
                )
            embeds = embeds.masked_scatter(slots[..., None], feats)
        return embeds

    def text_positions(self, batch: dict) -> torch.Tensor:
        """M-RoPE positions (3, B, L) of the text sequence (padding gets position 0), from the
        family's own ``get_rope_index`` (by keyword: Qwen2.5-VL's takes ``second_per_grid_ts``,
        for videos, in fifth place)."""
        pos, _ = self.qwen.model.get_rope_index(
            input_ids=batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=None,
            attention_mask=batch["attention_mask"],
        )
        return pos

    def mask_embedding(self, device: torch.device) -> torch.Tensor:
        """The ``<|mask|>`` embedding (D,)."""
        embed = self.language_model.embed_tokens  # called, not indexed: peft may wrap it (new rows)
        return embed(torch.tensor([self.mask_token_id], device=device))[0]

    def block_embeddings(self, features: torch.Tensor, mask_emb: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of a mask block: ``<|mask|>`` embedding + the patch features."""
        if not self.add_patch_features:
            return mask_emb.expand(features.shape[0], -1)
        return mask_emb + features.to(mask_emb.dtype)

    def find_segs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw, start: int = 0
    ) -> list[Seg]:
        """Every ``<|seg|>`` at or after column ``start``, in (row, position) order."""
        segs = []
        if image_grid_thw is None:
            image_grid_thw = torch.zeros(0, 3, dtype=torch.long)
        per_row = (input_ids == self.vision_start_id).sum(1).tolist()
        first = [sum(per_row[:b]) for b in range(len(per_row))]
        rows, cols = torch.nonzero((input_ids == self.seg_token_id) & attention_mask.bool(), as_tuple=True)
        for b, s in zip(rows.tolist(), cols.tolist(), strict=True):
            if s < start:
                continue
            n_before = int((input_ids[b, :s] == self.vision_start_id).sum())
            if n_before == 0:
                raise ValueError(f"batch row {b}: the <|seg|> token at position {s} has no image before it")
            img = first[b] + n_before - 1
            t, h, w = (int(v) for v in image_grid_thw[img])
            segs.append(Seg(b, s, img, (h // self.merge, w // self.merge)))
        return segs

    # -- the language-model call ------------------------------------------------------------

    @property
    def attn_implementation(self) -> str:
        """The language model's attention, read from the backbone's config each time, so that
        transformers' ``set_attn_implementation({"text_config": ...})`` switches STAMP's masks too."""
        return self.qwen.config.text_config._attn_implementation

    def check_attention(self) -> None:
        """Refuses ``sdpa_hybrid`` for a family whose spans could not reach the layers."""
        if self.attn_implementation == HYBRID and self.family not in MASK_MAPPING_FAMILIES:
            raise ValueError(
                f"model.attn_implementation={HYBRID!r} is not available for the {self.family} family: its "
                "language model builds its own mask from attention_mask instead of handing a prepared one "
                "to the layers, so STAMP's spans would not reach them; use 'sdpa' (same logits)"
            )

    @property
    def uses_spans(self) -> bool:
        """The language model runs ``sdpa_hybrid``: masks are given as ``Spans``, not (Q, K)."""
        self.check_attention()
        return self.attn_implementation == HYBRID

    def run_language_model(
        self, embeds, positions, mask, cache=None, deepstack: Deepstack | None = None
    ) -> torch.Tensor:
        """Last hidden states for ``embeds`` (B, Q, D) under a boolean mask (B, 1, Q, K) or
        ``Spans`` (handed to every layer as it is, through the layer-type mapping), with the
        DeepStack inputs of these tokens (Qwen3-VL; None: none)."""
        if isinstance(mask, Spans):
            bias = dict.fromkeys(("full_attention", "sliding_attention"), mask)
        else:
            bias = to_attention_bias(mask, self.attn_implementation, embeds.dtype)
        extra = deepstack.model_kwargs() if deepstack is not None else {}
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=bias,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            **extra,
        )
        return out.last_hidden_state

    def run_packed(self, embeds, positions, mask, keep, deepstack: Deepstack | None = None) -> torch.Tensor:
        """``run_language_model`` with the rows' kept tokens (``keep`` (B, T)) packed together.

        Each token keeps its positions and the keys it may see, so the hidden states equal the
        unpacked ones (up to float rounding); they come back in the unpacked (B, T, D) layout,
        with zeros at the tokens not kept.
        """
        src_row, src_col, valid = pack_plan(keep)
        if src_row.shape[0] == embeds.shape[0]:  # nothing to gain
            return self.run_language_model(embeds, positions, mask, deepstack=deepstack)
        if isinstance(mask, Spans):  # where each kept token lands among the packed rows
            packed_row, packed_col = torch.nonzero(valid, as_tuple=True)
            row_of = torch.full_like(keep, -1, dtype=torch.long)
            col_of = row_of.clone()
            row_of[src_row[valid], src_col[valid]] = packed_row
            col_of[src_row[valid], src_col[valid]] = packed_col
            mask = mask.remap(row_of, col_of)
        else:
            mask = packed_mask(mask, src_row, src_col, valid)
        packed = self.run_language_model(
            embeds[src_row, src_col] * valid[..., None],
            positions[:, src_row, src_col] * valid,
            mask,
            deepstack=deepstack.take(src_row, src_col, valid) if deepstack is not None else None,
        )
        out = packed.new_zeros(embeds.shape)
        out[src_row[valid], src_col[valid]] = packed[valid]
        return out

    def restrict(self, mask: torch.Tensor, query_key_index: torch.Tensor) -> torch.Tensor:
        return causal_only(mask, query_key_index) if self.mask_attention == "causal" else mask

    # -- training forwards ------------------------------------------------------------------

    def forward(self, batch: dict, return_lm_logits: bool = False) -> StampOutput:
        """Losses and mask logits for a collated training batch.

        ``batch`` holds ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids``
        (B, L), optionally ``pixel_values`` and ``image_grid_thw``, and ``seg_targets``: one
        (h, w) float cell mask per ``<|seg|>`` in (row, position) order.
        """
        if self.train_forward == "fused":
            hidden, mask_logits = self.fused_pass(batch)
        else:
            hidden, mask_logits = self.two_pass(batch)
        return self.losses(hidden, batch, mask_logits, return_lm_logits)

    def blocks(
        self,
        segs: list[Seg],
        features: ImageFeatures,
        positions: torch.Tensor,
        batch_size: int,
        mask_emb: torch.Tensor | None = None,
    ) -> Blocks:
        """Lay out the mask blocks of ``segs`` row by row; ``positions`` are the text's (3, B, L);
        ``mask_emb``: the ``<|mask|>`` embedding (looked up here, once, if not given).

        With DeepStack features, ``Blocks.deepstack`` gives each mask token its patch's (when
        ``deepstack_mask_tokens``; otherwise none, with the same layer count, for ``Deepstack.cat``).
        """
        starts, fill = [], [0] * batch_size
        for sg in segs:
            starts.append(fill[sg.row])
            fill[sg.row] += sg.grid_hw[0] * sg.grid_hw[1]
        Q, device = max(fill, default=0), positions.device
        dim = self.qwen.config.text_config.hidden_size
        embeds = torch.zeros(batch_size, Q, dim, dtype=self.qwen.lm_head.weight.dtype, device=device)
        pos = positions.new_zeros(3, batch_size, Q)
        group = torch.full((batch_size, Q), -1, dtype=torch.long, device=device)
        limit = torch.full((batch_size, Q), -1, dtype=torch.long, device=device)
        if segs and mask_emb is None:
            mask_emb = self.mask_embedding(device)
        for k, (sg, a) in enumerate(zip(segs, starts, strict=True)):
            n = sg.grid_hw[0] * sg.grid_hw[1]
            embeds[sg.row, a : a + n] = self.block_embeddings(features[sg.image], mask_emb).to(embeds.dtype)
            pos[:, sg.row, a : a + n] = block_positions(
                positions[:, sg.row, sg.pos], sg.grid_hw, self.mask_positions
            )
            group[sg.row, a : a + n] = k
            limit[sg.row, a : a + n] = sg.pos
        return Blocks(embeds, pos, group, limit, starts, self.block_deepstack(segs, features, starts, group))

    def block_deepstack(
        self, segs: list[Seg], features: ImageFeatures, starts: list[int], group: torch.Tensor
    ) -> Deepstack | None:
        """The DeepStack inputs of the mask blocks (see ``blocks``); None without DeepStack."""
        deep = getattr(features, "deepstack", None)
        if not deep:
            return None
        index = torch.full_like(group, -1)
        if not self.deepstack_mask_tokens:
            return Deepstack(index, [f[:0] for f in deep[0]])
        per_layer: list[list[torch.Tensor]] = [[] for _ in deep[0]]
        offset = 0
        for sg, a in zip(segs, starts, strict=True):
            n = sg.grid_hw[0] * sg.grid_hw[1]
            index[sg.row, a : a + n] = offset + torch.arange(n, device=group.device)
            offset += n
            for layer, feat in zip(per_layer, deep[sg.image], strict=True):
                layer.append(feat)
        return Deepstack(
            index, [torch.cat(x) if x else f[:0] for x, f in zip(per_layer, deep[0], strict=True)]
        )

    def read_masks(
        self, hidden: torch.Tensor, segs: list[Seg], starts: list[int], offset: int = 0
    ) -> list[torch.Tensor]:
        """Mask-head logits, one (h, w) map per seg, from the hidden states of its block."""
        out = []
        for sg, a in zip(segs, starts, strict=True):
            h, w = sg.grid_hw
            block = hidden[sg.row, offset + a : offset + a + h * w]
            out.append(self.mask_head(block).squeeze(-1).float().view(h, w))
        return out

    def fused_pass(
        self, batch: dict, segs: list[Seg] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One vision pass and one language pass; mask blocks appended after the text.

        Returns the text hidden states (B, L, D) and one (h, w) logit map per ``<|seg|>``.
        """
        input_ids, valid = batch["input_ids"], batch["attention_mask"].bool()
        B, L = input_ids.shape
        features = self.encode_images(batch.get("pixel_values"), batch.get("image_grid_thw"))
        text_pos = self.text_positions(batch)
        if segs is None:
            segs = self.find_segs(input_ids, valid, batch.get("image_grid_thw"))
        text_embeds, mask_emb = self.embed_with_mask_token(input_ids, features)
        blk = self.blocks(segs, features, text_pos, B, mask_emb)
        embeds = torch.cat([text_embeds, blk.embeds], 1)
        positions = torch.cat([text_pos, blk.positions], 2)
        mask = self.fused_mask(valid, segs, blk)
        deepstack = self.text_deepstack(input_ids, features)
        if deepstack is not None:
            deepstack = deepstack.cat(blk.deepstack)
        if self.pack_rows:
            keep = torch.cat([valid, blk.group >= 0], 1)
            hidden = self.run_packed(embeds, positions, mask, keep, deepstack)
        else:
            hidden = self.run_language_model(embeds, positions, mask, deepstack=deepstack)
        return hidden[:, :L], self.read_masks(hidden, segs, blk.starts, offset=L)

    def fused_mask(self, valid: torch.Tensor, segs: list[Seg], blk: Blocks) -> torch.Tensor | Spans:
        """Who sees whom in the fused layout (text (B, L), then the blocks): ``Spans`` under
        ``sdpa_hybrid`` where they can express it, else the dense (B, 1, T, T) mask."""
        B, L = valid.shape
        if self.uses_spans:
            blocks = [
                (sg.row, a, sg.grid_hw[0] * sg.grid_hw[1], sg.pos)
                for sg, a in zip(segs, blk.starts, strict=True)
            ]
            spans = hybrid_spans(
                valid, blocks, L, with_text=True, causal_blocks=self.mask_attention == "causal"
            )
            if spans is not None:
                return spans
        idx = torch.arange(L, device=valid.device).expand(B, L)
        text_index = torch.where(valid, idx, -1)
        key_text = torch.cat([text_index, torch.full_like(blk.group, -1)], 1)
        group = torch.cat([torch.full_like(idx, -1), blk.group], 1)
        limit = torch.cat([text_index, blk.limit], 1)
        self_index = torch.arange(L + blk.group.shape[1], device=valid.device).expand(B, -1)
        return self.restrict(attention_mask(key_text, group, limit, group, self_index), self_index)

    def two_pass(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reference form: a text pass, then per ``<|seg|>`` a pass over the cut sequence."""
        hidden, _ = self.fused_pass(batch, segs=[])
        segs = self.find_segs(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"))
        grid = batch.get("image_grid_thw")
        patches = grid.prod(-1).tolist() if grid is not None else []
        offsets = [sum(patches[:i]) for i in range(len(patches) + 1)]
        per_row = (batch["input_ids"] == self.vision_start_id).sum(1).tolist()
        mask_logits = []
        for sg in segs:
            r = sg.row
            first_img = sum(per_row[:r])
            imgs = range(first_img, first_img + per_row[r])
            cut = {
                "input_ids": batch["input_ids"][r : r + 1, : sg.pos + 1],
                "attention_mask": batch["attention_mask"][r : r + 1, : sg.pos + 1],
                "mm_token_type_ids": batch["mm_token_type_ids"][r : r + 1, : sg.pos + 1],
                "pixel_values": batch["pixel_values"][offsets[imgs.start] : offsets[imgs.stop]],
                "image_grid_thw": grid[imgs.start : imgs.stop],
            }
            local = Seg(0, sg.pos, sg.image - first_img, sg.grid_hw)
            _, logits = self.fused_pass(cut, segs=[local])
            mask_logits += logits
        return hidden, mask_logits

    def losses(self, hidden, batch, mask_logits, return_lm_logits: bool) -> StampOutput:
        labels = batch["labels"]
        target = labels[:, 1:]
        keep = target != -100
        lm_head = self.qwen.lm_head
        logits = lm_head(hidden[:, :-1][keep]).float()
        loss_lm = F.cross_entropy(logits, target[keep]) if keep.any() else logits.sum() * 0.0
        targets = batch.get("seg_targets", [])
        if len(targets) != len(mask_logits):
            raise ValueError(
                f"{len(mask_logits)} <|seg|> tokens in the batch but {len(targets)} ground-truth masks"
            )
        if mask_logits:
            loss_seg = torch.stack(
                [
                    seg_loss(p, g.to(p.device), self.bce_weight, self.dice_weight)
                    for p, g in zip(mask_logits, targets, strict=True)
                ]
            ).mean()
        else:  # keep the head in the graph so that DDP sees every parameter used
            loss_seg = sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        full = lm_head(hidden).float() if return_lm_logits else None
        return StampOutput(
            self.lm_weight * loss_lm + loss_seg, loss_lm.detach(), loss_seg.detach(), mask_logits, full
        )
