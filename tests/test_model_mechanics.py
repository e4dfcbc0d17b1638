"""The mask block's mechanics: attention, positions, equivalences (docs/METHOD.md sections 2 and 5).

Every test that takes ``tiny`` or ``make_model`` runs once per backbone family (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL), each on its embedded tiny model.
"""

from __future__ import annotations

import functools

import pytest
import torch

from stamp.data.collate import StampCollator
from stamp.data.synthetic import SyntheticScenes
from stamp.inference.generate import answer_starts, generate_with_masks, mask_forward, prefill
from stamp.model.families import MASK_MAPPING_FAMILIES
from stamp.model.mask_block import attention_mask, block_positions, pack_plan
from stamp.model.tokens import SEG_TOKEN
from tests.conftest import FAMILIES
from tests.helpers import qwen_inputs, square_sample


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family, tiny_of):
    """This module's ``tiny``: the family's tiny model (session-scoped per family)."""
    return tiny_of(family)


@pytest.fixture
def make_model(family, make_model_of):
    """This module's ``make_model``: fresh models of the family's tiny backbone."""
    return functools.partial(make_model_of, family)


def _masks(model, processor, samples):
    batch = StampCollator(processor)(samples)
    with torch.no_grad():
        return model(batch, return_lm_logits=True), batch


def test_mask_logits_ignore_text_after_seg(tiny):
    model, processor = tiny
    follow_a = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "red"}]
    follow_b = [
        {"role": "user", "content": "And how many shapes are there in total?"},
        {"role": "assistant", "content": "three, I think"},
    ]
    a, _ = _masks(model, processor, [square_sample(extra_turns=follow_a)])
    b, _ = _masks(model, processor, [square_sample(extra_turns=follow_b)])
    c, _ = _masks(model, processor, [square_sample(question="Segment the grey background.")])
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0], rtol=0, atol=1e-5)
    # ...while text before the <|seg|> does matter (the test can fail)
    assert (a.mask_logits[0] - c.mask_logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("attention, bidirectional", [("hybrid", True), ("causal", False)])
def test_block_attention_is_bidirectional(make_model, monkeypatch, attention, bidirectional):
    model, processor = make_model(mask_attention=attention)
    model.eval()
    batch = StampCollator(processor)([square_sample()])
    with torch.no_grad():
        _, before = model.fused_pass(batch)
        original = model.block_embeddings

        def perturbed(features, mask_emb):  # change only the LAST mask token of the block
            emb = original(features, mask_emb).clone()
            emb[-1] += 3.0
            return emb

        monkeypatch.setattr(model, "block_embeddings", perturbed)
        _, after = model.fused_pass(batch)
    first_before, first_after = before[0].flatten()[0], after[0].flatten()[0]
    assert (before[0].flatten()[-1] - after[0].flatten()[-1]).abs() > 1e-4  # the changed token itself
    changed = (first_before - first_after).abs() > 1e-5
    assert bool(changed) == bidirectional


def test_padding_never_leaks(tiny):
    model, processor = tiny
    short = square_sample(question="Segment it.", sid="short")
    long = square_sample(
        question="Please segment the red square in the middle of this grey picture.", sid="long"
    )
    alone, batch_alone = _masks(model, processor, [short])
    both, batch_both = _masks(model, processor, [short, long])
    L = batch_alone["input_ids"].shape[1]
    assert batch_both["input_ids"].shape[1] > L  # the short row really is padded
    torch.testing.assert_close(both.mask_logits[0], alone.mask_logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both.lm_logits[0, :L], alone.lm_logits[0], rtol=0, atol=1e-4)
    # garbage in the padding changes nothing either
    garbage = dict(batch_both)
    ids = batch_both["input_ids"].clone()
    ids[0, L:] = processor.tokenizer(" the", add_special_tokens=False).input_ids[0]
    garbage["input_ids"] = ids
    with torch.no_grad():
        g = model(garbage, return_lm_logits=True)
    for x, y in zip(g.mask_logits, both.mask_logits, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    torch.testing.assert_close(g.lm_logits[1], both.lm_logits[1], rtol=0, atol=1e-5)


def test_positions_hand_computed(tiny, monkeypatch):
    """112x112 image: 8x8 patches, 4x4 cells (16 image tokens). With the image starting at
    position s, cell (i, j) gets (t, h, w) = (s, s+i, s+j); the text after it restarts at
    s + max(4, 4) and runs on by one per token."""
    model, processor = tiny
    sample = square_sample(size=112, question="Go.", answer=SEG_TOKEN)
    batch = StampCollator(processor)([sample])
    assert batch["grid_hw"] == [(4, 4)]
    ids = batch["input_ids"][0].tolist()
    tok = processor.tokenizer
    vs = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    seg = ids.index(tok.convert_tokens_to_ids(SEG_TOKEN))
    seen = {}
    real = model.run_language_model

    def spy(embeds, positions, mask, cache=None, deepstack=None):
        seen["positions"] = positions.clone()
        return real(embeds, positions, mask, cache, deepstack)

    monkeypatch.setattr(model, "run_language_model", spy)
    rows = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    cols = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    L = batch["input_ids"].shape[1]
    for mode in ("sequential", "grid"):
        monkeypatch.setattr(model, "mask_positions", mode)
        with torch.no_grad():
            model.fused_pass(batch)
        pos = seen["positions"][:, 0]
        assert pos[:, : vs + 1].tolist() == [list(range(vs + 1))] * 3
        s = vs + 1
        assert pos[:, s : s + 16].tolist() == [[s] * 16, [s + r for r in rows], [s + c for c in cols]]
        p_seg = s + 4 + (seg - (s + 16))  # <|vision_end|> sits at s + 4
        assert pos[:, s + 16].tolist() == [s + 4] * 3
        assert pos[:, seg].tolist() == [p_seg] * 3
        block = pos[:, L : L + 16].tolist()
        q = p_seg + 1
        if mode == "sequential":
            assert block == [list(range(q, q + 16))] * 3
        else:
            assert block == [[q] * 16, [q + r for r in rows], [q + c for c in cols]]


def test_block_positions_unknown_mode():
    with pytest.raises(ValueError, match="mask_positions"):
        block_positions(torch.tensor([3, 3, 3]), (2, 2), "diagonal")


def test_attention_mask_rules():
    # keys: text 0..3 (3 is padding), block A = cols 4,5 (seg at 1), block B = cols 6,7 (seg at 2)
    key_text = torch.tensor([[0, 1, 2, -1, -1, -1, -1, -1]])
    group = torch.tensor([[-1, -1, -1, -1, 0, 0, 1, 1]])
    limit = torch.tensor([[0, 1, 2, -1, 1, 1, 2, 2]])
    m = attention_mask(key_text, group, limit, group, torch.arange(8)[None])[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],  # padding sees only itself
            [1, 1, 0, 0, 1, 1, 0, 0],  # block A: prefix through its seg + its whole block
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0, 1, 1],  # block B never sees block A
            [1, 1, 1, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_no_seg_equals_transformers_forward(tiny):
    model, processor = tiny
    vqa = [s for s in (SyntheticScenes("val", size=60)[i] for i in range(60)) if s.kind == "vqa"][:3]
    out, batch = _masks(model, processor, vqa)
    assert out.mask_logits == []
    with torch.no_grad():
        ref = model.qwen(**qwen_inputs(batch)).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.lm_logits[valid], ref[valid], rtol=0, atol=1e-5)


def _mixed_batch(processor):
    """Two samples of each kind: several <|seg|> per row, VQA rows without any, padding."""
    ds = SyntheticScenes("val", size=200)
    samples = []
    for kind in ("pair", "vqa", "refer", "multi"):
        samples += [s for s in (ds[i] for i in range(60)) if s.kind == kind][:2]
    return samples


def _assert_same_outputs(a, b, batch, atol: float) -> None:
    """Two forwards of ``batch`` agree: every mask map, the LM logits of real tokens, the losses."""
    for x, y in zip(a.mask_logits, b.mask_logits, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(a.lm_logits[valid], b.lm_logits[valid], rtol=0, atol=atol)
    for name in ("loss", "loss_lm", "loss_seg"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol)


@pytest.mark.parametrize("positions", ["sequential", "grid"])
def test_fused_equals_two_pass(make_model, positions):
    model, processor = make_model(mask_positions=positions)
    model.eval()
    batch = StampCollator(processor)(_mixed_batch(processor))
    with torch.no_grad():
        fused = model(batch, return_lm_logits=True)
        model.train_forward = "two_pass"
        ref = model(batch, return_lm_logits=True)
    assert len(fused.mask_logits) == len(batch["seg_targets"]) >= 8
    _assert_same_outputs(fused, ref, batch, atol=1e-4)


def test_lm_weight_scales_the_language_loss(make_model):
    model, processor = make_model(lm_weight=2.5)
    model.eval()
    with torch.no_grad():
        out = model(StampCollator(processor)(_mixed_batch(processor)))
    assert out.loss_lm > 0 and out.loss_seg > 0
    torch.testing.assert_close(out.loss, 2.5 * out.loss_lm + out.loss_seg)


def test_pack_plan_hand_example():
    keep = torch.tensor(
        [
            [1, 1, 1, 0, 1, 1],  # 5 tokens: the longest row sets the capacity
            [1, 1, 0, 0, 0, 0],  # 2
            [1, 1, 1, 0, 0, 0],  # 3: fits beside the 2
            [1, 0, 0, 0, 1, 0],  # 2: a row of its own (5 is full, 2 + 3 = 5 is full)
        ],
        dtype=torch.bool,
    )
    src_row, src_col, valid = pack_plan(keep)
    got = [
        [(r, c) for r, c, v in zip(rr.tolist(), cc.tolist(), vv.tolist(), strict=True) if v]
        for rr, cc, vv in zip(src_row, src_col, valid, strict=True)
    ]
    assert got == [
        [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5)],
        [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)],
        [(3, 0), (3, 4)],
    ]


@pytest.mark.parametrize("attention", ["hybrid", "causal"])
def test_packed_rows_equal_padded_rows(make_model, attention, monkeypatch):
    """Packing rows together changes nothing but the amount of padding computed."""
    model, processor = make_model(mask_attention=attention, mask_positions="grid")
    model.eval()
    batch = StampCollator(processor)(_mixed_batch(processor))
    shapes = []
    real = model.run_language_model

    def spy(embeds, *args, **kwargs):
        shapes.append(tuple(embeds.shape[:2]))
        return real(embeds, *args, **kwargs)

    monkeypatch.setattr(model, "run_language_model", spy)
    with torch.no_grad():
        model.pack_rows = False
        padded = model(batch, return_lm_logits=True)
        model.pack_rows = True
        packed = model(batch, return_lm_logits=True)
    (b, t), (r, c) = shapes
    assert r < b and r * c < b * t, f"nothing was packed: {shapes}"
    assert len(packed.mask_logits) == len(batch["seg_targets"]) >= 8
    _assert_same_outputs(padded, packed, batch, atol=1e-5)


def _cached_and_training_logits(model, processor) -> tuple[list, list]:
    """The mask logits of the mixed batch from the cached inference path (teacher forcing) and
    from the training forward."""
    model.eval()
    samples = _mixed_batch(processor)
    with torch.no_grad():
        train_logits = model(StampCollator(processor)(samples)).mask_logits
    batch = StampCollator(processor, "generate", teacher_forcing=True)(samples)
    rows = generate_with_masks(model, batch, processor.tokenizer, teacher_forcing=True)
    return [lg for r in rows for lg in r.cell_logits], train_logits


@pytest.mark.parametrize("attention", ["hybrid", "causal"])
def test_cached_mask_forward_equals_training_path(make_model, attention):
    """Inference (prefill + one batched block forward on the cache) = the training layout."""
    cached, train_logits = _cached_and_training_logits(*make_model(mask_attention=attention))
    assert len(cached) == len(train_logits)
    for a, b in zip(cached, train_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_vision_encoder_runs_once_per_image(tiny):
    model, processor = tiny
    samples = _mixed_batch(processor)
    calls = []
    handle = model.qwen.model.visual.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        batch = StampCollator(processor, "generate", teacher_forcing=True)(samples)
        generate_with_masks(model, batch, processor.tokenizer, teacher_forcing=True)
        assert len(calls) == 1  # one call encodes the whole batch of images
        calls.clear()
        batch = StampCollator(processor, "generate")(samples)
        generate_with_masks(model, batch, processor.tokenizer, 6)
        assert len(calls) == 1
    finally:
        handle.remove()


def test_sdpa_fp32_attention(make_model, monkeypatch):
    """``sdpa_fp32`` equals ``sdpa`` in float32; inside a bf16 autocast its attention runs in
    float32 while the projections run in bf16, and the outputs stay close to float32's."""
    from stamp.model import attention

    sdpa_model, processor = make_model()
    batch = StampCollator(processor)(_mixed_batch(None))
    with torch.no_grad():
        ref = sdpa_model.eval()(batch, return_lm_logits=True)
        model = make_model(attn_implementation="sdpa_fp32")[0].eval()
        _assert_same_outputs(model(batch, return_lm_logits=True), ref, batch, atol=1e-6)

        dtypes = []
        real = attention.sdpa_attention_forward

        def spy(module, q, k, v, mask, **kw):
            dtypes.append(q.dtype)
            out = real(module, q, k, v, mask, **kw)
            dtypes.append(out[0].dtype)
            return out

        monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
        head = []
        model.mask_head.register_forward_hook(lambda mod, inp, out: head.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch, return_lm_logits=True)
    assert dtypes and set(dtypes) == {torch.float32}
    assert head and set(head) == {torch.bfloat16}  # the linear layers did run in bf16
    for x, y in zip(low.mask_logits, ref.mask_logits, strict=True):
        torch.testing.assert_close(x.float(), y, rtol=0, atol=0.1)
    torch.testing.assert_close(low.loss, ref.loss, rtol=0.02, atol=0)


# -- sdpa_hybrid: the same rule as spans (no dense mask), equal to the dense path -------------


def _hybrid_and_dense(make_model, **settings):
    dense, processor = make_model(**settings)
    if dense.family not in MASK_MAPPING_FAMILIES:
        pytest.skip(f"sdpa_hybrid is refused for {dense.family} (test_hybrid_attention_refused_for_qwen3vl)")
    hybrid, _ = make_model(attn_implementation="sdpa_hybrid", **settings)
    return dense.eval(), hybrid.eval(), processor


@pytest.mark.parametrize(
    "settings",
    [
        {"mask_positions": "sequential", "pack_rows": False},
        {"mask_positions": "grid", "pack_rows": False},
        {"mask_positions": "sequential", "pack_rows": True},
        {"mask_positions": "grid", "pack_rows": True, "mask_attention": "causal"},
        {"mask_positions": "sequential", "pack_rows": False, "mask_attention": "causal"},
        {"mask_positions": "sequential", "pack_rows": True, "train_forward": "two_pass"},
        {
            "mask_positions": "grid",
            "pack_rows": True,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        },
    ],
)
def test_hybrid_attention_equals_dense(make_model, monkeypatch, settings):
    """Training forwards under ``sdpa_hybrid`` give the dense path's logits and losses, and no
    attention call of the language model gets a mask (the text runs with ``is_causal``)."""
    from stamp.model import attention

    dense, hybrid, processor = _hybrid_and_dense(make_model, **settings)
    batch = StampCollator(processor)(_mixed_batch(processor))
    with torch.no_grad():
        ref = dense(batch, return_lm_logits=True)
        masks, real = [], attention.sdpa_attention_forward

        def spy(module, q, k, v, mask, **kw):
            masks.append((mask is None, kw.get("is_causal")))
            return real(module, q, k, v, mask, **kw)

        monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
        out = hybrid(batch, return_lm_logits=True)
    assert len(out.mask_logits) == len(batch["seg_targets"]) >= 8
    _assert_same_outputs(out, ref, batch, atol=1e-4)
    layers = hybrid.qwen.config.text_config.num_hidden_layers
    causal_blocks = settings.get("mask_attention") == "causal"
    assert (True, True) in masks and len(masks) >= layers * (len(out.mask_logits) + 1)
    assert all(no_mask or causal_blocks for no_mask, _ in masks)


def test_hybrid_attention_gradients_equal_dense(make_model):
    """The backward pass through the spans gives the dense path's gradients (packed rows, LoRA,
    gradient checkpointing)."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}
    dense, hybrid, processor = _hybrid_and_dense(
        make_model, pack_rows=True, lora=lora, gradient_checkpointing=True
    )
    batch = StampCollator(processor)(_mixed_batch(processor))
    grads = []
    for model in (dense, hybrid):
        model.train()  # checkpointing is active in training only (no dropout is configured)
        assert model.language_model.gradient_checkpointing
        model.zero_grad()
        model(batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-4, msg=name)


def _header(processor) -> list[int]:
    return processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids


@pytest.mark.parametrize("attention", ["hybrid", "causal"])
def test_hybrid_cached_mask_forward_equals_dense(make_model, attention):
    """Inference under ``sdpa_hybrid`` (the blocks of an answer side by side on its cache row)
    gives the dense path's mask logits and leaves the cache as long as it was."""
    dense, hybrid, processor = _hybrid_and_dense(make_model, mask_attention=attention)
    samples = _mixed_batch(processor)
    batch = StampCollator(processor, "generate", teacher_forcing=True)(samples)
    ref = generate_with_masks(dense, batch, processor.tokenizer, teacher_forcing=True)
    out = generate_with_masks(hybrid, batch, processor.tokenizer, teacher_forcing=True)
    segs_only = [i for i, r in enumerate(ref) if r.cell_logits]  # every row has a block: no cache copy
    sub = StampCollator(processor, "generate", teacher_forcing=True)([samples[i] for i in segs_only])
    state = prefill(hybrid, sub)
    length = state.cache.get_seq_length()
    found = hybrid.find_segs(state.ids, state.valid, sub.get("image_grid_thw"))
    found = [sg for sg in found if sg.pos >= answer_starts(state.ids, _header(processor))[sg.row]]
    own = mask_forward(hybrid, found, state.features, state.positions, state.valid, state.cache)
    assert state.cache.get_seq_length() == length
    want_own = [lg for i in segs_only for lg in ref[i].cell_logits]
    for a, b in zip(own, want_own, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    got = [lg for r in out for lg in r.cell_logits]
    want = [lg for r in ref for lg in r.cell_logits]
    assert len(got) == len(want) >= 8 and max(len(r.cell_logits) for r in out) >= 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    generated = generate_with_masks(
        hybrid, StampCollator(processor, "generate")(samples[:4]), processor.tokenizer, 6
    )
    reference = generate_with_masks(
        dense, StampCollator(processor, "generate")(samples[:4]), processor.tokenizer, 6
    )
    assert [r.text for r in generated] == [r.text for r in reference]


def test_hybrid_attention_refused_for_qwen3vl(make_model_of):
    """Qwen3-VL's language model builds its own mask from ``attention_mask``: the spans could not
    reach its layers, so ``sdpa_hybrid`` is refused with the reason (not run as a causal block)."""
    with pytest.raises(
        ValueError, match=r"attn_implementation='sdpa_hybrid' is not available for the qwen3_vl"
    ):
        make_model_of("qwen3_vl", attn_implementation="sdpa_hybrid")


def test_attention_switched_through_transformers(make_model, monkeypatch):
    """transformers' ``set_attn_implementation`` on the backbone switches STAMP's masks with it: a
    model built with ``sdpa`` and switched to ``sdpa_hybrid`` hands its layers spans (no mask
    reaches an attention call) and gives the dense path's outputs; switched back, dense masks."""
    from stamp.model import attention

    model, processor = make_model(pack_rows=True)
    model.eval()
    batch = StampCollator(processor)(_mixed_batch(processor))
    with torch.no_grad():
        ref = model(batch, return_lm_logits=True)
    model.qwen.set_attn_implementation({"text_config": "sdpa_hybrid"})
    assert model.qwen.config.vision_config._attn_implementation == "sdpa"
    if model.family not in MASK_MAPPING_FAMILIES:
        with pytest.raises(ValueError, match="is not available for the qwen3_vl family"):
            model(batch)
        return
    masks, real = [], attention.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        masks.append(mask is None)
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    with torch.no_grad():
        out = model(batch, return_lm_logits=True)
    assert masks and all(masks)
    _assert_same_outputs(out, ref, batch, atol=1e-4)
    model.qwen.set_attn_implementation({"text_config": "sdpa"})
    masks.clear()
    with torch.no_grad():
        again = model(batch, return_lm_logits=True)
    assert not model.uses_spans and not masks  # the dense path does not go through sdpa_hybrid
    _assert_same_outputs(again, ref, batch, atol=0)


# -- Qwen3-VL's DeepStack ------------------------------------------------------------------------


def test_deepstack_reaches_the_image_tokens_and_the_switch_reaches_the_mask_tokens(make_model_of):
    """The image tokens get their DeepStack features in every setting (the LM path equals
    transformers' forward, which adds them); the mask tokens get them only with
    ``deepstack_mask_tokens``, which changes the mask logits but none of the text's."""
    samples = _mixed_batch(None)
    outs = {}
    for on in (True, False):
        model, processor = make_model_of("qwen3_vl", deepstack_mask_tokens=on)
        model.eval()
        batch = StampCollator(processor)(samples)
        with torch.no_grad():
            outs[on] = model(batch, return_lm_logits=True)
            ref = model.qwen(**qwen_inputs(batch)).logits
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(outs[on].lm_logits[valid], ref[valid], rtol=0, atol=1e-5)
    # the mask tokens' DeepStack features make a difference to the masks...
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(outs[True].mask_logits, outs[False].mask_logits, strict=True)
    )
    assert diff > 1e-3, diff
    # ...and none to the text, which never sees the blocks
    torch.testing.assert_close(outs[True].lm_logits[valid], outs[False].lm_logits[valid], rtol=0, atol=1e-6)
    # and the language model run without the DeepStack inputs gives other logits: they really count
    with torch.no_grad():
        feats = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        bare = model.language_model(
            inputs_embeds=model.embed(batch["input_ids"], feats),
            attention_mask=batch["attention_mask"],
            position_ids=model.text_positions(batch),
        ).last_hidden_state
    assert (model.qwen.lm_head(bare)[valid] - ref[valid]).abs().max() > 1e-3


def test_cached_inference_equals_training_without_mask_token_deepstack(make_model_of):
    """``deepstack_mask_tokens=false``: the cached mask forward still equals the training path."""
    cached, train_logits = _cached_and_training_logits(
        *make_model_of("qwen3_vl", deepstack_mask_tokens=False)
    )
    assert len(cached) == len(train_logits) >= 8
    for a, b in zip(cached, train_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_fused_forward_looks_up_embeddings_once(make_model):
    """Text and ``<|mask|>`` embeddings come from one call: each call's backward makes a dense
    gradient of the whole table (0.93 GB at the 2B's vocabulary), so not one per mask block."""
    model, processor = make_model()
    answer = f"Sure, {SEG_TOKEN} and {SEG_TOKEN} and {SEG_TOKEN}"
    batch = StampCollator(processor, "train")([square_sample(answer=answer), square_sample()])
    calls = []
    hook = model.language_model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model(batch)
    finally:
        hook.remove()
    assert len(out.mask_logits) == 4 and len(calls) == 1
