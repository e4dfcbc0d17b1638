"""The embedded default backbone: a tiny, randomly initialised Qwen2-VL built offline.

It uses transformers' real Qwen2-VL classes and is saved as an ordinary Hugging Face checkpoint
directory (config, safetensors, tokenizer, processor with its chat template), so it is loaded by
exactly the same ``from_pretrained`` code as Qwen2-VL-2B/7B. Its byte-level BPE tokenizer is
trained on the synthetic corpus.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from stamp.data.synthetic import corpus
from stamp.model.tokens import add_stamp_tokens, resize_embeddings

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


def tiny_config(
    tokenizer,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vision_dim: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 4,
    init_std: float = 0.06,
) -> Qwen2VLConfig:
    """A few-million-parameter Qwen2-VL with the special-token ids of ``tokenizer``.

    ``init_std`` is the standard deviation of the random weights. transformers' default, 0.02,
    suits hidden sizes in the thousands; at 128 it leaves every attention nearly uniform at the
    start, and the tiny model takes longer to read the words (docs/PERFORMANCE.md).
    """
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t, h, w; sums to head_dim / 2
    vocab = -(-len(tokenizer) // 64) * 64 + 64  # padded, with room for added tokens, like Qwen's
    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "initializer_range": init_std,
        },
        vision_config={
            "depth": vision_layers,
            "embed_dim": vision_dim,
            "hidden_size": hidden,
            "num_heads": vision_heads,
            "mlp_ratio": 2,
            "initializer_range": init_std,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    min_pixels: int = 16 * 28 * 28,
    max_pixels: int = 256 * 28 * 28,
    vocab_size: int = 512,
    **arch,
) -> Path:
    """Build and save the tiny checkpoint directory; return its path."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus(seed=seed), vocab_size=vocab_size)
    config = tiny_config(tokenizer, **arch)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def random_backbone(
    arch: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | dict = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A Qwen2-VL of the architecture ``arch`` (a model config's ``arch:`` block) with random
    weights, and a processor around the tiny model's tokenizer: the paper's widths and depths
    without a download, for end-to-end runs and benchmarks at real shapes.

    The embedding keeps ``arch``'s vocabulary size (its memory and compute are real); the
    tokenizer is the small synthetic one, so the special-token ids come from it.
    """
    tokenizer = train_tokenizer(corpus(seed=seed))
    add_stamp_tokens(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    arch = {k: v for k, v in arch.items() if k != "tokenizer_len"}
    arch.update(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    config = Qwen2VLConfig(**arch, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(dtype)
    resize_embeddings(model, len(tokenizer))  # grows only if arch's vocabulary is smaller
    image_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
