"""Generation through transformers' ``generate()`` (``stamp.inference.generate``), checked against
references that share none of its code: a greedy loop over transformers' own Qwen2-VL forward
without a cache (the answers), and the training forward on those answers (the mask logits).

The tiny model is untrained, so a bias on its language-model head makes it answer with a mix of
``<|seg|>``, one word and ``<|im_end|>``: answers of several masks, of different lengths, some
stopped early. The checkpoint-style generation defaults planted on the backbone (Qwen's
``repetition_penalty`` and friends) must not change anything: ``generation.*`` is the whole setting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stamp.inference.generate import AnswerStreamer, generate_with_masks, generation_config
from stamp.inference.segmenter import SegmentationResult, Segmenter
from stamp.model.tokens import IM_END, SEG_TOKEN
from tests.helpers import square_sample

# per family (its tiny model's random head differs): the word, and the bias of <|im_end|> beside
# 50 for <|seg|> and the word, picked so that the answers mix them (the test checks the mix)
BIAS = {"qwen2_vl": ("square", 50.0), "qwen2_5_vl": ("square", 48.5), "qwen3_vl": ("square", 49.0)}
MAX_NEW = 8
HISTORY = [("Segment the red square.", f"Sure, it is {SEG_TOKEN}."), ("And the other one?", f"{SEG_TOKEN}")]


def biased_segmenter(make_model_of, family: str = "qwen2_vl", **overrides) -> Segmenter:
    """A tiny model of ``family`` that answers with ``<|seg|>``, one word and ``<|im_end|>``
    (which one depends on the context), with the generation defaults of a real Qwen checkpoint
    planted on it."""
    model, processor = make_model_of(family, **overrides)
    tok = processor.tokenizer
    head = model.qwen.lm_head
    word, end = BIAS[family]
    chosen = [tok.convert_tokens_to_ids(SEG_TOKEN), tok(word, add_special_tokens=False).input_ids[0]]
    chosen.append(tok.convert_tokens_to_ids(IM_END))
    bias = torch.zeros(head.out_features)
    bias[chosen] = torch.tensor([50.0, 50.0, end])
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    gc = model.qwen.generation_config  # as Qwen2-VL-7B-Instruct's generation_config.json
    gc.repetition_penalty, gc.top_k, gc.top_p, gc.temperature = 1.3, 1, 0.001, 0.01
    return Segmenter(model, processor, generation=MAX_NEW)


def chats(n: int = 6):
    """``n`` chats about images of different sizes; odd ones carry two earlier turns."""
    images = [square_sample(size=112 + 28 * (i % 3)).image for i in range(n)]
    questions = [f"Segment the red square number {i}." for i in range(n)]
    histories = [HISTORY if i % 2 else None for i in range(n)]
    return images, questions, histories


@torch.no_grad()
def greedy_without_cache(model, batch: dict, stop: list[int], pad: int, steps: int) -> torch.Tensor:
    """The reference answers: each step runs transformers' own Qwen2-VL forward over the whole
    sequence so far (no cache) and takes the most likely token; finished rows get padding."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        out = model.qwen(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=types,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            use_cache=False,
        )
        tok = torch.where(done, torch.full_like(done, pad, dtype=torch.long), out.logits[:, -1].argmax(-1))
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], 1)
        types = torch.cat([types, torch.zeros_like(tok[:, None])], 1)
        done |= torch.isin(tok, torch.tensor(stop))
        if done.all():
            break
    return ids


@torch.no_grad()
def training_logits(model, batch: dict, answers: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """The mask logits of the training forward (no cache) on the prompts followed by ``answers``."""
    P = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], answers], 1)
    full = {
        "input_ids": ids,
        "attention_mask": torch.cat([batch["attention_mask"], valid.long()], 1),
        "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answers)], 1),
        "pixel_values": batch["pixel_values"],
        "image_grid_thw": batch["image_grid_thw"],
    }
    segs = [s for s in model.find_segs(ids, full["attention_mask"], batch["image_grid_thw"]) if s.pos >= P]
    return model.fused_pass(full, segs=segs)[1]


def until_stop(tokens: torch.Tensor, stop: list[int]) -> torch.Tensor:
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out[b, :n] = True
    return out


@pytest.mark.parametrize(
    "family,attention",
    [("qwen2_vl", "sdpa"), ("qwen2_vl", "sdpa_hybrid"), ("qwen2_5_vl", "sdpa"), ("qwen3_vl", "sdpa")],
)
def test_greedy_answers_and_masks_equal_references(make_model_of, family, attention):
    """Batched, left-padded, several <|seg|> per answer, multi-turn history, rows stopping early."""
    seg = biased_segmenter(make_model_of, family, attn_implementation=attention)
    model, tok = seg.model, seg.processor.tokenizer
    images, questions, histories = chats()
    batch, _ = seg.inputs(images, questions, None, histories)
    P = batch["input_ids"].shape[1]
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding in the batch
    stop = list(seg.generation.eos_token_id)
    reference = greedy_without_cache(model, batch, stop, tok.pad_token_id, MAX_NEW)[:, P:]
    valid = until_stop(reference, stop)

    rows = generate_with_masks(model, batch, tok, MAX_NEW)
    for b, row in enumerate(rows):
        answer = reference[b][valid[b]].tolist()
        assert row.token_ids == [t for t in answer if t not in stop], b
        assert len(row.cell_logits) == row.text.count(SEG_TOKEN) == answer.count(model.seg_token_id)
    counts = [len(r.cell_logits) for r in rows]
    assert max(counts) >= 2 and min(len(r.token_ids) for r in rows) < MAX_NEW - 1  # what the test covers

    expected = training_logits(model, batch, reference, valid)
    got = [lg for r in rows for lg in r.cell_logits]
    assert len(got) == len(expected) == sum(counts)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_seg_generated_last_is_run_into_the_cache(make_model_of, family):
    """``generate`` never feeds its last token: a <|seg|> generated last still gets its mask."""
    seg = biased_segmenter(make_model_of, family)
    seg.model.qwen.lm_head.bias[seg.model.seg_token_id] += 100.0  # nothing but <|seg|>
    images, questions, _ = chats(2)
    batch, _ = seg.inputs(images, questions)
    rows = generate_with_masks(seg.model, batch, seg.processor.tokenizer, 3)
    assert [r.text for r in rows] == [SEG_TOKEN * 3] * 2
    answers = torch.tensor([[seg.model.seg_token_id] * 3] * 2)
    expected = training_logits(seg.model, batch, answers, torch.ones_like(answers, dtype=torch.bool))
    got = [lg for r in rows for lg in r.cell_logits]
    assert len(got) == 6
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def answer_ids(rows, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated answers' token ids (B, T), right-padded, and which of them are real."""
    T = max(len(r.token_ids) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    return ids, torch.arange(T)[None] < torch.tensor([len(r.token_ids) for r in rows])[:, None]


@pytest.mark.parametrize(
    "family,settings",
    [
        ("qwen2_vl", {"do_sample": True, "temperature": 2.0, "top_k": 3}),
        ("qwen2_vl", {"num_beams": 3}),
        ("qwen3_vl", {"num_beams": 3}),
    ],
    ids=["sample", "beams", "beams-qwen3_vl"],
)
def test_sampling_and_beam_search_masks_equal_training_path(make_model_of, family, settings):
    """Other decoding modes: the masks of whatever was answered equal the training forward's on
    the same answers; beam search goes through the documented re-prefill."""
    seg = biased_segmenter(make_model_of, family)
    tok = seg.processor.tokenizer
    images, questions, histories = chats(4)
    batch, _ = seg.inputs(images, questions, None, histories)
    torch.manual_seed(0)
    rows = generate_with_masks(seg.model, batch, tok, {"max_new_tokens": MAX_NEW, **settings})
    assert sum(len(r.cell_logits) for r in rows) >= 2
    for r in rows:
        assert len(r.cell_logits) == r.token_ids.count(seg.model.seg_token_id)
    answers, valid = answer_ids(rows, tok.pad_token_id)
    expected = training_logits(seg.model, batch, answers, valid)
    got = [lg for r in rows for lg in r.cell_logits]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_generation_settings_are_checked(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    config = generation_config(None, tok)
    assert (config.do_sample, config.num_beams, config.max_new_tokens, config.repetition_penalty) == (
        False,
        1,
        24,
        1.0,
    )
    assert config.eos_token_id == [
        tok.convert_tokens_to_ids(IM_END),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]
    with pytest.raises(ValueError, match="unknown generation.max_tokens; expected one of"):
        generation_config({"max_tokens": 5}, tok)
    with pytest.raises(ValueError, match="temperature"):  # a sampling knob without sampling
        generation_config({"temperature": 0.7}, tok)
    assert generation_config({"do_sample": True, "temperature": 0.7}, tok).temperature == 0.7


def test_stream_yields_the_growing_answer_then_the_result(make_model_of):
    seg = biased_segmenter(make_model_of)
    image = square_sample().image
    items = list(seg.stream(image, "Segment the red square.", history=HISTORY))
    *partial, result = items
    assert isinstance(result, SegmentationResult) and partial and all(isinstance(p, str) for p in partial)
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:], strict=False))
    assert partial[-1].strip() == result.text
    plain = seg.segment(image, "Segment the red square.", history=HISTORY)
    assert plain.text == result.text and len(plain.masks) == len(result.masks)
    for a, b in zip(plain.masks, result.masks, strict=True):
        assert np.array_equal(a, b)


def test_streamer_refuses_batches_and_stream_reraises(make_model_of):
    seg = biased_segmenter(make_model_of)
    streamer = AnswerStreamer(seg.processor.tokenizer, print)
    with pytest.raises(ValueError, match="one question at a time"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="the query is empty"):
        list(seg.stream(Image.new("RGB", (56, 56)), "  "))


def test_predict_prints_the_answer_as_it_grows(capsys):
    from stamp.cli.predict import AnswerPrinter

    printer = AnswerPrinter()
    printer(" Sure,")
    assert capsys.readouterr().out == "answer: Sure,"  # on the screen before the answer is complete
    printer(" Sure, it is")
    printer(f" Sure, it is {SEG_TOKEN} and {SEG_TOKEN}")
    printer.finish()
    assert capsys.readouterr().out == " it is [mask 1] and [mask 2]\n"
    empty = AnswerPrinter()
    empty.finish()
    assert capsys.readouterr().out == "answer: \n"
