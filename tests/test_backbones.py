"""The paper's backbones build from their configs on the meta device (no weights)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from stamp.model.backbone import build_on_meta, check_source, load_backbone
from stamp.model.build import apply_lora


def _arch(compose_cfg, name):
    cfg = compose_cfg([f"model={name}"])
    return cfg, OmegaConf.to_container(cfg.model.arch, resolve=True)


def test_2b_full_finetune_on_meta(compose_cfg):
    cfg, arch = _arch(compose_cfg, "qwen2vl_2b")
    model = build_on_meta(arch)
    n = sum(p.numel() for p in model.parameters())
    assert 2.15e9 < n < 2.25e9, n
    assert cfg.model.lora is None and cfg.model.dtype == "bfloat16"
    assert (
        cfg.optimizer.lr == 3e-5 and cfg.optimizer.weight_decay == 0.0 and cfg.scheduler.warmup_ratio == 0.03
    )
    assert cfg.trainer.gradient_clip_val == 1.0


@pytest.mark.slow
def test_7b_lora_on_meta(compose_cfg):
    cfg, arch = _arch(compose_cfg, "qwen2vl_7b_lora")
    model = build_on_meta(arch)
    total = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < total < 8.4e9, total
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.use_rslora, lora.dropout) == (64, 128, True, 0.05)
    # expected trainable count, computed from the architecture: r * (in + out) per adapted Linear
    # of the language model, plus embed_tokens and lm_head in full
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    kv = arch["num_key_value_heads"] * h // arch["num_attention_heads"]
    per_layer = lora.r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)
    expected = per_layer * arch["num_hidden_layers"] + 2 * arch["vocab_size"] * h
    peft_model = apply_lora(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".visual." in n)


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_source(str(tmp_path / "empty"))


def test_flash_attention_is_refused_for_the_language_model(tiny_dir):
    with pytest.raises(ValueError, match="flash-attention ignores the 4-D hybrid mask"):
        load_backbone(str(tiny_dir), attn_implementation="flash_attention_2")


def test_tiny_tokenizer_has_whole_words_for_the_chat(tiny):
    """The tiny tokenizer is trained on what the chats say, the chat template's role names
    included: "user", "assistant" and a caption's words are one token each, not runs of letters."""
    _, processor = tiny
    tok = processor.tokenizer
    chat = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "There"}]
    ids = tok(processor.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert "user" in pieces and "assistant" in pieces and "There" in pieces, pieces
    for word in ("are", "three", "shapes", "red", "star", "circle", "triangle", "square"):
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("installed", [False, True])
def test_flash_if_installed_picks_flash_attention_or_sdpa_and_logs_it(monkeypatch, caplog, installed):
    """The paper configs' vision encoder: flash-attention where it can run, sdpa otherwise."""
    import logging

    from stamp.model import backbone

    monkeypatch.setattr(backbone, "is_flash_attn_2_available", lambda: installed)
    expected = "flash_attention_2" if installed else "sdpa"
    with caplog.at_level(logging.INFO, logger="stamp.model.backbone"):
        kwargs = backbone.attn_kwargs("sdpa", "flash_if_installed")
    chosen = kwargs["attn_implementation"]
    assert (chosen["vision_config"] if isinstance(chosen, dict) else chosen) == expected
    assert f"the vision encoder uses {expected}" in caplog.text


def test_flash_if_installed_loads_without_flash_attn(tiny_dir):
    from stamp.model.backbone import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is usable here; the fallback is what this test checks")
    model, _ = load_backbone(str(tiny_dir), vision_attn_implementation="flash_if_installed")
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
