"""The embedded backbones: tiny, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL built offline.

Each uses transformers' real classes of its family and is saved as an ordinary Hugging Face
checkpoint directory (config, safetensors, tokenizer, processor with its chat template), so it is
loaded by exactly the same ``from_pretrained`` code as the released models of its family. The
byte-level BPE tokenizer is trained on the synthetic corpus and is the same for every family
(Qwen2-VL, Qwen2.5-VL and Qwen3-VL share their chat and vision special tokens).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from stamp.data.synthetic import corpus
from stamp.model.families import FAMILIES, config_class, family_of, model_class
from stamp.model.tokens import add_stamp_tokens, resize_embeddings

log = logging.getLogger(__name__)

# Qwen2's pre-tokenisation (split on letters, digits, punctuation and spaces, then byte level).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same layout as Qwen2-VL's template (no default system prompt, to keep sequences short).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokeniser and chat special tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": SPECIAL_TOKENS[1:]}, replace_extra_special_tokens=False
    )
    return tokenizer


def patch_size(family: str) -> int:
    """Pixels per vision patch of a family (a mask cell is ``merge`` x ``merge`` patches)."""
    return 16 if family == "qwen3_vl" else 14


def tiny_config(
    tokenizer,
    family: str = "qwen2_vl",
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vision_dim: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 4,
    init_std: float = 0.06,
) -> PreTrainedConfig:
    """A few-million-parameter backbone of ``family`` with the special-token ids of ``tokenizer``.

    ``init_std`` is the standard deviation of the random weights. transformers' default, 0.02,
    suits hidden sizes in the thousands; at 128 it leaves every attention nearly uniform at the
    start, and the tiny model takes longer to read the words (docs/PERFORMANCE.md).

    The family's own mechanics are kept at tiny scale: Qwen2.5-VL's vision tower has window
    attention (112-px windows) in its first blocks and full attention in its last; Qwen3-VL has
    16-px patches, interleaved M-RoPE and a DeepStack feature from every vision block.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {sorted(FAMILIES)}")
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    vocab = -(-len(tokenizer) // 64) * 64 + 64  # padded, with room for added tokens, like Qwen's
    text: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "initializer_range": init_std,
    }
    if family == "qwen3_vl":  # Qwen3-VL's [24, 20, 20] of 64, scaled; t, h, w interleaved
        hw = 5 * head_dim // 32
        rope = {"mrope_section": [head_dim // 2 - 2 * hw, hw, hw], "mrope_interleaved": True}
        text["head_dim"] = head_dim
    else:  # t, h, w; sums to head_dim / 2
        rope = {"mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    if family == "qwen2_vl":
        vision = {"depth": vision_layers, "embed_dim": vision_dim, "hidden_size": hidden,
                  "num_heads": vision_heads, "mlp_ratio": 2}  # fmt: skip
    else:
        vision = {"depth": vision_layers, "hidden_size": vision_dim, "out_hidden_size": hidden,
                  "intermediate_size": 2 * vision_dim, "num_heads": vision_heads}  # fmt: skip
    if family == "qwen2_5_vl":
        vision.update(window_size=112, fullatt_block_indexes=[vision_layers - 1])
    if family == "qwen3_vl":
        vision.update(patch_size=16, num_position_embeddings=256,
                      deepstack_visual_indexes=list(range(vision_layers)))  # fmt: skip
    vision["initializer_range"] = init_std
    return config_class(family)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def family_processor(
    family: str, tokenizer, min_pixels: int | None = None, max_pixels: int | None = None
) -> ProcessorMixin:
    """A processor of ``family`` around ``tokenizer`` with the tiny chat template.

    Qwen3-VL's image processor is Qwen2-VL's with 16-px patches and mean = std = 0.5 (as its
    released ``preprocessor_config.json`` sets them), so its cells are 32 px.
    """
    image_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    if family == "qwen3_vl":
        image = Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, **image_kwargs
        )
        return Qwen3VLProcessor(
            image_processor=image,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
    processor = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    family: str = "qwen2_vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    vocab_size: int = 512,
    replace: bool = True,
    **arch,
) -> Path:
    """Build and save the tiny checkpoint directory of ``family``; return its path.

    The pixel limits default to 16 and 256 cells of the family (28 px, or 32 px for Qwen3-VL).
    The directory is written beside ``out_dir`` and moved into place when complete, so a
    concurrent reader (another rank, another job) never sees half of it; with ``replace=False``
    a directory that appeared meanwhile is kept and the new copy dropped.
    """
    out = Path(out_dir)
    cell = 2 * patch_size(family)
    tokenizer = train_tokenizer(corpus(seed=seed), vocab_size=vocab_size)
    config = tiny_config(tokenizer, family=family, **arch)
    torch.manual_seed(seed)
    model = model_class(family)(config)
    processor = family_processor(
        family, tokenizer, min_pixels or 16 * cell * cell, max_pixels or 256 * cell * cell
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists() and replace:
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:
        if replace or not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its copy
    return out


def ensure_configured_tiny(model_cfg: Mapping[str, Any]) -> None:
    """``model.tiny_family``: the embedded tiny of that family is built on first use, at its home
    ``model.tiny_home`` only; a missing ``model.backbone`` anywhere else (a mistyped path) stays
    the error it is instead of getting a fresh random tiny."""
    family, home = model_cfg.get("tiny_family"), model_cfg.get("tiny_home")
    if family and home and Path(str(model_cfg["backbone"])).absolute() == Path(str(home)).absolute():
        ensure_tiny(str(home), family)


def ensure_tiny(path: str | Path, family: str) -> Path:
    """The tiny checkpoint of ``family`` at ``path``, built there first if it is not yet
    (``model.tiny_family``: the embedded tiny models are made on first use)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        log.info("building the tiny %s backbone in %s (first use; stamp-make-tiny does the same)", family, p)
        make_tiny(p, family=family, replace=False)
    return p


def random_backbone(
    arch: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | dict = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A backbone of the architecture ``arch`` (a model config's ``arch:`` block, its family
    named by ``model_type``) with random weights, and a processor of that family around the tiny
    model's tokenizer: the paper's widths and depths without a download, for end-to-end runs and
    benchmarks at real shapes.

    The embedding keeps ``arch``'s vocabulary size (its memory and compute are real); the
    tokenizer is the small synthetic one, so the special-token ids come from it.
    """
    tokenizer = train_tokenizer(corpus(seed=seed))
    add_stamp_tokens(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    family = family_of(arch, "model.arch")
    arch = {k: v for k, v in arch.items() if k not in ("tokenizer_len", "model_type")}
    arch.update(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    text_ids = {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    if "text_config" in arch:  # nested, as Qwen3-VL's config.json
        arch["text_config"] = {**arch["text_config"], **text_ids}
    else:
        arch.update(text_ids)
    config = config_class(family)(**arch, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = model_class(family)(config).to(dtype)
    resize_embeddings(model, len(tokenizer))  # grows only if arch's vocabulary is smaller
    return model, family_processor(family, tokenizer, min_pixels, max_pixels)
