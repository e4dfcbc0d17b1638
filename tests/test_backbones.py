"""The paper's backbones build from their configs on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch
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


# -- the backbone families -----------------------------------------------------------------------

# parameter counts of the backbones as built from their arch: blocks (the published sizes:
# Qwen2.5-VL-3B 3.75 B, -7B 8.29 B; Qwen3-VL-2B 2.13 B, -4B 4.44 B, -8B 8.77 B)
FAMILY_CONFIGS = {
    "qwen25vl_3b": ("qwen2_5_vl", 3.70e9, 3.80e9),
    "qwen25vl_7b_lora": ("qwen2_5_vl", 8.2e9, 8.4e9),
    "qwen3vl_2b": ("qwen3_vl", 2.08e9, 2.18e9),
    "qwen3vl_4b": ("qwen3_vl", 4.39e9, 4.49e9),
    "qwen3vl_8b_lora": ("qwen3_vl", 8.7e9, 8.85e9),
}


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_family_configs_build_on_meta(compose_cfg, name):
    family, low, high = FAMILY_CONFIGS[name]
    cfg, arch = _arch(compose_cfg, name)
    model = build_on_meta(arch)
    assert model.config.model_type == family
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert low < n < high, n
    assert cfg.model.tiny_family is None and cfg.model.dtype == "bfloat16"
    cell = 32 if family == "qwen3_vl" else 28
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (1024 * cell * cell, 1280 * cell * cell)
    if name.endswith("_lora"):  # STAMP-7B's LoRA recipe
        lora = cfg.model.lora
        assert (lora.r, lora.alpha, lora.use_rslora, lora.dropout) == (64, 128, True, 0.05)
    else:
        assert cfg.model.lora is None and cfg.model.gradient_checkpointing


def _lora_trainable_vision(model, lora) -> list[str]:
    peft_model = apply_lora(model, lora)
    return [n for n, p in peft_model.named_parameters() if p.requires_grad and ".visual." in n]


def test_qwen25vl_lora_leaves_the_vision_tower_frozen(compose_cfg, tiny_dir_of):
    """Qwen2.5-VL's vision MLPs are named like the language model's (gate/up/down_proj): the
    7B LoRA config excludes them, so only the language model is adapted, as in STAMP-7B."""
    from stamp.model.backbone import load_backbone

    lora = OmegaConf.to_container(compose_cfg(["model=qwen25vl_7b_lora"]).model.lora, resolve=True)
    model, _ = load_backbone(str(tiny_dir_of("qwen2_5_vl")))
    assert _lora_trainable_vision(model, lora) == []
    model, _ = load_backbone(str(tiny_dir_of("qwen2_5_vl")))
    without = _lora_trainable_vision(model, {**lora, "exclude_modules": None})
    assert any("mlp.gate_proj.lora_A" in n for n in without), without  # what the exclusion prevents


def test_recurrent_and_unknown_backbones_are_refused(tmp_path):
    """A decoder with linear-attention layers cannot run a bidirectional block through a mask:
    refused with the reason, from its config alone (before any weight is read)."""
    from transformers import Qwen3_5Config

    from stamp.model.families import family_of

    with pytest.raises(
        ValueError, match=r"recurrent/linear-attention layers \(layer_types \['linear_attention'\]\)"
    ):
        family_of(Qwen3_5Config())
    with pytest.raises(ValueError, match=r"recurrent/linear-attention layers \(model_type 'qwen3_next'\)"):
        build_on_meta({"model_type": "qwen3_next"})
    with pytest.raises(ValueError, match=r"model_type 'llava' is not a supported family"):
        family_of({"model_type": "llava"})
    Qwen3_5Config().save_pretrained(tmp_path / "qwen35")  # a config, no weights at all
    with pytest.raises(ValueError, match=r"model.backbone: STAMP cannot use this backbone: its decoder"):
        load_backbone(str(tmp_path / "qwen35"))
    assert family_of({"model_type": "qwen3_vl"}) == "qwen3_vl"


def test_tiny_families_keep_their_mechanics(tiny_dir_of):
    """The tiny Qwen2.5-VL has window attention and a full-attention block; the tiny Qwen3-VL has
    16-px patches (32-px cells), interleaved M-RoPE and DeepStack from both vision blocks."""
    from transformers import AutoConfig, AutoProcessor

    from stamp.data.collate import cell_pixels

    q25 = AutoConfig.from_pretrained(tiny_dir_of("qwen2_5_vl"))
    assert q25.model_type == "qwen2_5_vl"
    assert (q25.vision_config.window_size, list(q25.vision_config.fullatt_block_indexes)) == (112, [1])
    q3 = AutoConfig.from_pretrained(tiny_dir_of("qwen3_vl"))
    assert q3.model_type == "qwen3_vl" and q3.vision_config.patch_size == 16
    assert list(q3.vision_config.deepstack_visual_indexes) == [0, 1]
    assert q3.text_config.rope_parameters["mrope_interleaved"] is True
    assert sum(q3.text_config.rope_parameters["mrope_section"]) == q3.text_config.head_dim // 2
    cells = {
        f: cell_pixels(AutoProcessor.from_pretrained(tiny_dir_of(f))) for f in ("qwen2_5_vl", "qwen3_vl")
    }
    assert cells == {"qwen2_5_vl": 28, "qwen3_vl": 32}


def test_make_tiny_cli_builds_each_family(tmp_path, capsys):
    """``stamp-make-tiny --family qwen2_5_vl`` writes a checkpoint of that family; a second call
    leaves it alone."""
    import json

    from stamp.cli.make_tiny import main

    out = tmp_path / "t25"
    main(["--family", "qwen2_5_vl", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert not list(tmp_path.glob(".t25.tmp-*"))  # written aside, then moved into place
    main(["--family", "qwen2_5_vl", "--out", str(out)])
    assert "exists (use --force to rebuild)" in capsys.readouterr().out


def test_patch_linear_equals_the_convolution():
    from stamp.model.patch_embed import PatchLinear, linear_patch_embeddings

    torch.manual_seed(0)
    for bias in (False, True):  # Qwen2-VL / Qwen2.5-VL have none, Qwen3-VL has one
        conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=bias)
        x = torch.randn(37, 3, 2, 14, 14, requires_grad=True)
        ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, stride=(2, 14, 14))
        (gx_ref, gw_ref) = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
        assert linear_patch_embeddings(conv) == 1 and type(conv) is PatchLinear
        out = conv(x)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, conv.weight))
        assert out.shape == ref.shape == (37, 16, 1, 1, 1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw, gw_ref, atol=1e-3, rtol=1e-4)
        # an input that is not one patch per row still gets the convolution
        wide = torch.randn(2, 3, 4, 28, 28)
        torch.testing.assert_close(
            conv(wide), torch.nn.functional.conv3d(wide, conv.weight, conv.bias, stride=(2, 14, 14))
        )
    # other convolutions are left alone
    other = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Conv3d(3, 4, 2, stride=2, padding=1))
    assert linear_patch_embeddings(other) == 0 and all(type(m) is torch.nn.Conv3d for m in other)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_stamp_models_embed_patches_as_a_matrix_product(tiny_of, family):
    from stamp.model.patch_embed import PatchLinear

    model, _ = tiny_of(family)
    proj = model.qwen.model.visual.patch_embed.proj
    assert type(proj) is PatchLinear
    assert "patch_embed.proj.weight" in model.qwen.model.visual.state_dict()  # the same state dict


def test_tiny_is_built_on_first_use_only_at_its_home(compose_cfg, tmp_path):
    """``model=tiny`` with a mistyped ``model.backbone`` fails naming the path; nothing is built there."""
    from stamp.model.build import build_stamp

    typo = tmp_path / "tiny-qwen2v1"
    cfg = compose_cfg(["model=tiny", f"model.backbone={typo}"])
    assert cfg.model.tiny_family == "qwen2_vl" and cfg.model.tiny_home != str(typo)
    with pytest.raises(FileNotFoundError, match=f"model path '{typo}' does not exist"):
        build_stamp(cfg.model)
    assert not typo.exists()
