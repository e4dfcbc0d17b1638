"""Checkpoint directories: ours round-trips; both released layouts load (written here in those layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from stamp.data.collate import StampCollator
from stamp.model.build import save_stamp
from stamp.model.checkpoints import load_stamp
from stamp.model.tokens import LEGACY_TOKENS, MASK_TOKEN, SEG_TOKEN
from tests.helpers import qwen_inputs, square_sample


def _logits(model, processor):
    batch = StampCollator(processor)([square_sample()])
    with torch.no_grad():
        out = model(batch, return_lm_logits=True)
    return out.mask_logits[0], out.lm_logits


def test_own_checkpoint_round_trip(tiny, tmp_path):
    model, processor = tiny
    with torch.no_grad():
        model.mask_head.bias.fill_(0.25)
    save_stamp(model, processor, tmp_path / "ckpt")
    loaded, proc2 = load_stamp(tmp_path / "ckpt")
    loaded.eval()
    assert loaded.mask_positions == model.mask_positions
    for a, b in zip(_logits(model, processor), _logits(loaded, proc2), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _legacy_name(key: str) -> str:
    """transformers 5 key -> the transformers 4.x legacy name the released files use."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def write_released_full(tiny_dir: Path, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A STAMP-2B-style directory: legacy key names, classifier.*, flat legacy config, 4 extra tokens."""
    processor = AutoProcessor.from_pretrained(tiny_dir)
    processor.tokenizer.add_special_tokens(
        {"extra_special_tokens": [SEG_TOKEN, MASK_TOKEN, *LEGACY_TOKENS]}, replace_extra_special_tokens=False
    )
    out.mkdir(parents=True)
    processor.save_pretrained(out)
    state = load_file(str(tiny_dir / "model.safetensors"))
    cfg = json.loads((tiny_dir / "config.json").read_text())
    hidden = cfg["text_config"]["hidden_size"]
    torch.manual_seed(1)
    weight, bias = torch.randn(1, hidden), torch.randn(1)
    legacy = {_legacy_name(k): v for k, v in state.items()}
    legacy.update({"classifier.weight": weight, "classifier.bias": bias})
    save_file(legacy, str(out / "model.safetensors"), metadata={"format": "pt"})
    flat = {k: v for k, v in cfg["text_config"].items() if k not in ("model_type", "rope_parameters")}
    rope = cfg["text_config"]["rope_parameters"]
    flat.update(
        architectures=["SegQwenVL"],
        model_type="qwen2_vl",
        vision_config=cfg["vision_config"],
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        tie_word_embeddings=cfg["tie_word_embeddings"],
        **{
            k: cfg[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        },
    )
    (out / "config.json").write_text(json.dumps(flat, indent=2))
    return weight, bias


def test_released_full_checkpoint(tiny_dir, tmp_path):
    weight, bias = write_released_full(tiny_dir, tmp_path / "STAMP-2B")
    assert any(
        k.startswith("model.layers.") for k in load_file(str(tmp_path / "STAMP-2B" / "model.safetensors"))
    )
    model, processor = load_stamp(tmp_path / "STAMP-2B")
    assert model.mask_positions == "sequential"
    torch.testing.assert_close(model.mask_head.weight.data, weight)
    torch.testing.assert_close(model.mask_head.bias.data, bias)
    assert all(t in processor.tokenizer.get_vocab() for t in LEGACY_TOKENS)
    # the backbone weights really arrived under their new names
    ref = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir)
    torch.testing.assert_close(
        model.qwen.model.language_model.layers[0].self_attn.q_proj.weight,
        ref.model.language_model.layers[0].self_attn.q_proj.weight,
    )
    torch.testing.assert_close(
        model.qwen.model.visual.blocks[0].attn.qkv.weight, ref.model.visual.blocks[0].attn.qkv.weight
    )


class SegQwenVL(Qwen2VLForConditionalGeneration):
    """Stands in for the original project's model class: Qwen2-VL with a ``classifier``."""

    def __init__(self, config):
        super().__init__(config)
        self.classifier = torch.nn.Linear(config.text_config.hidden_size, 1)


def write_released_lora(tiny_dir: Path, out: Path, legacy_keys: bool):
    """A STAMP-7B-style peft adapter directory, written by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    plain = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir)
    base = SegQwenVL(plain.config)  # the tiny weights + a fresh classifier
    missing, unexpected = base.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"} and not unexpected
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head", "classifier"],
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    if legacy_keys:  # the same tensors under transformers 4.x module names
        f = next(out.glob("adapter_model.safetensors"))
        state = load_file(str(f))
        renamed = {
            k.replace("model.model.language_model.", "model.model.").replace(
                "model.model.visual.", "model.visual."
            ): v
            for k, v in state.items()
        }
        assert renamed != state
        save_file(renamed, str(f), metadata={"format": "pt"})
    return peft_model


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_released_lora_adapter(tiny_dir, tmp_path, legacy_keys):
    ref = write_released_lora(tiny_dir, tmp_path / "STAMP-7B-lora", legacy_keys).eval()
    model, processor = load_stamp(tmp_path / "STAMP-7B-lora")
    model.eval()
    assert model.mask_positions == "sequential"
    head = ref.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(model.mask_head.weight.data, head.weight.data)
    batch = StampCollator(processor)([square_sample()])
    with torch.no_grad():
        ours = model(batch, return_lm_logits=True).lm_logits
        theirs = ref(**qwen_inputs(batch)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_plain_qwen_checkpoint_has_no_mask_head(tiny_dir):
    with pytest.raises(ValueError, match="has no mask head"):
        load_stamp(tiny_dir)


def test_released_checkpoint_loads_without_a_report_of_its_mask_head(tiny_dir, tmp_path, capfd, caplog):
    """transformers' load report named the released mask head (classifier.*) UNEXPECTED although
    stamp loads it; any other unused or missing weight is still reported."""
    import logging

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "STAMP-2B"
    write_released_full(tiny_dir, ckpt)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        load_stamp(ckpt)
    out = capfd.readouterr()
    assert "classifier" not in out.out + out.err + caplog.text
    assert "UNEXPECTED" not in out.out + out.err

    (weights,) = ckpt.glob("*.safetensors")
    state = load_file(weights)
    state["model.extra_probe.weight"] = torch.zeros(3)
    del state[next(k for k in state if k.endswith("layers.0.mlp.up_proj.weight"))]
    save_file(state, weights, metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_stamp(ckpt)
    assert "1 weight(s) not used (unexpected): " in caplog.text and "extra_probe.weight" in caplog.text
    assert (
        "1 weight(s) missing (newly initialised): " in caplog.text
        and "layers.0.mlp.up_proj.weight" in caplog.text
    )
    assert "classifier" not in caplog.text


@pytest.mark.parametrize("rows_only", [False, True])
def test_lora_checkpoints_of_either_kind_load_in_segmenter(make_model, tmp_path, rows_only):
    """LoRA with full copies of embed_tokens / lm_head, or with only the new tokens' rows trained
    (``lora.new_token_rows_only``): after a training step, the exported checkpoint loads in
    ``Segmenter`` and gives the trained model's logits."""
    from stamp.inference import Segmenter

    lora = {
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
        "new_token_rows_only": rows_only,
    }
    model, processor = make_model(lora=lora)
    embed = model.language_model.embed_tokens
    before = embed(torch.arange(model.mask_token_id + 1)).detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    copies = [n for n in trainable if "modules_to_save" in n]
    rows = [n for n in trainable if "trainable_tokens_delta" in n]
    assert (bool(copies), bool(rows)) == (not rows_only, rows_only), sorted(trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = StampCollator(processor)([square_sample()])
    model.train()
    model(batch).loss.backward()
    opt.step()
    model.eval()
    moved = (embed(torch.arange(model.mask_token_id + 1)) - before).abs().amax(-1) > 0
    new = {model.seg_token_id, model.mask_token_id}
    assert moved[sorted(new)].all()
    if rows_only:  # no other row of the embedding can change
        assert {i for i, m in enumerate(moved.tolist()) if m} <= new
    save_stamp(model, processor, tmp_path / "ckpt")
    seg = Segmenter.from_pretrained(tmp_path / "ckpt", device="cpu")
    for a, b in zip(_logits(model, processor), _logits(seg.model, seg.processor), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
