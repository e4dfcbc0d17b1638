"""The Segmenter API and SAM refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stamp.inference import Segmenter
from stamp.inference.sam import SamRefiner, mask_prompt, sample_points
from stamp.model.build import save_stamp
from stamp.model.tokens import SEG_TOKEN
from tests.helpers import square_sample


@pytest.fixture(scope="module")
def segmenter(tiny, tmp_path_factory) -> Segmenter:
    model, processor = tiny
    path = save_stamp(model, processor, tmp_path_factory.mktemp("ckpt") / "stamp")
    return Segmenter.from_pretrained(path, device="cpu", generation=8)


def test_segment_with_given_answer(segmenter):
    image = square_sample(size=140).image  # 140 px: not a multiple of the 28-px cell
    r = segmenter.segment(
        image, "Segment the red square.", answer=f"Sure, the red square is {SEG_TOKEN} and {SEG_TOKEN}"
    )
    assert r.text == f"Sure, the red square is {SEG_TOKEN} and {SEG_TOKEN}"
    assert len(r.masks) == len(r.cell_logits) == 2
    assert all(m.shape == (140, 140) and m.dtype == bool for m in r.masks)
    h, w = r.cell_logits[0].shape
    # nearest upsampling of the cell decisions, exactly
    cells = (r.cell_logits[0] > 0).numpy()
    rows, cols = (np.arange(140) * h) // 140, (np.arange(140) * w) // 140
    assert np.array_equal(r.masks[0], cells[rows][:, cols])
    assert r.answer == "Sure, the red square is [mask 1] and [mask 2]"


def test_segment_generates_and_batches(segmenter):
    images = [
        square_sample(size=112).image,
        square_sample(size=168).image,
        Image.new("RGB", (200, 120), "white"),
    ]
    results = segmenter.segment_batch(images, ["Segment the red square.", "How many shapes?", "Segment it."])
    assert len(results) == 3
    for im, r in zip(images, results, strict=True):
        assert isinstance(r.text, str) and len(r.masks) == r.text.count(SEG_TOKEN)
        assert all(m.shape == (im.height, im.width) for m in r.masks)
    # one question at a time gives the same answers as the batch (padding does not leak)
    single = segmenter.segment(images[1], "How many shapes?")
    assert single.text == results[1].text


def test_history_is_part_of_the_prompt(segmenter):
    image = square_sample().image
    a = segmenter.segment(
        image, "Now the left one.", answer=SEG_TOKEN, history=[("Segment the square.", f"It is {SEG_TOKEN}")]
    )
    b = segmenter.segment(image, "Now the left one.", answer=SEG_TOKEN)
    assert len(a.masks) == 1  # only the last answer's masks are predicted
    assert not torch.equal(a.cell_logits[0], b.cell_logits[0])


def test_each_image_is_encoded_once_per_call(segmenter):
    visual = segmenter.model.qwen.model.visual
    encoded = []
    handle = visual.register_forward_hook(lambda m, args, kwargs_out: None)
    handle.remove()
    handle = visual.register_forward_pre_hook(
        lambda m, args, kwargs: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True
    )
    try:
        images = [square_sample(size=112).image] * 3
        segmenter.segment_batch(
            images, ["Segment the red square."] * 3, answers=[f"{SEG_TOKEN} {SEG_TOKEN}"] * 3
        )
        assert encoded == [3]  # one encoder call for the 3 images, none for the 6 mask blocks
        encoded.clear()
        segmenter.segment(images[0], "Segment the red square.")
        assert encoded == [1]
    finally:
        handle.remove()


def test_bad_inputs(segmenter, tmp_path):
    with pytest.raises(ValueError, match="the query is empty"):
        segmenter.segment(square_sample().image, "   ")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        segmenter.segment(tmp_path, "Segment it.")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        segmenter.segment(bad, "Segment it.")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        segmenter.segment(tmp_path / "missing.jpg", "Segment it.")


# -- SAM --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sam():
    """A randomly initialised SAM built from segment-anything's own modules (256-px input)."""
    from functools import partial

    from segment_anything import SamPredictor
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            out_chans=dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    ).eval()
    return SamPredictor(sam)


def test_mask_prompt_resizes_longest_side_and_pads():
    mask = np.zeros((60, 120), dtype=bool)
    mask[:, :60] = True  # left half
    p = mask_prompt(mask, 64, eps=1e-4)
    assert p.shape == (1, 64, 64)
    logit = np.log((1 - 1e-4) / 1e-4)
    assert np.allclose(p[0, :30, :28], logit, atol=1e-3)  # inside: +logit
    assert np.allclose(p[0, :30, 36:], -logit, atol=1e-3)  # outside: -logit
    assert np.all(p[0, 32:] == 0)  # the padded rows below the 64x32 resized mask
    assert np.all(p[0, :32, :28] > 0)  # every row of the resized mask is kept


def test_points_fall_inside_and_outside():
    mask = np.zeros((50, 50), dtype=bool)
    mask[10:20, 30:45] = True
    pts, labels = sample_points(mask, 10, 10, np.random.default_rng(0))
    assert (labels == 1).sum() == 10 and (labels == 0).sum() == 10
    for (x, y), lab in zip(pts.astype(int), labels, strict=True):
        assert mask[y, x] == bool(lab)


def test_refinement_runs_three_passes_and_feeds_logits_back(small_sam):
    refiner = SamRefiner(small_sam, points=10, iterations=3, seed=0)
    calls = []
    real = small_sam.predict

    def spy(**kw):
        out = real(**kw)
        calls.append((kw["mask_input"].copy(), out[2].copy(), kw["multimask_output"]))
        return out

    small_sam.predict = spy
    encoder_calls = []
    hook = small_sam.model.image_encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    try:
        image = square_sample(size=100).image
        coarse = square_sample(size=100).masks[0]
        refined = refiner.refine(image, [coarse, coarse, np.zeros_like(coarse)])
        again = refiner.refine(image, [coarse])
    finally:
        small_sam.predict = real
        hook.remove()
    assert len(encoder_calls) == 1  # one image embedding for all masks of the image
    assert len(calls) == 3 * 3  # three passes for each non-empty mask (2 + 1 later)
    first, second, third = calls[:3]
    assert first[0].shape == (1, 64, 64) and not first[2]
    np.testing.assert_array_equal(second[0], first[1])  # SAM's own low-res logits fed back
    np.testing.assert_array_equal(third[0], second[1])
    assert [m.shape for m in refined] == [(100, 100)] * 3 and not refined[2].any()
    np.testing.assert_array_equal(again[0], refined[0])  # seeded: repeats exactly


def test_missing_sam_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAM checkpoint"):
        SamRefiner.from_checkpoint(str(tmp_path / "sam_vit_h_4b8939.pth"))
    with pytest.raises(ValueError, match="unknown sam.model_type"):
        SamRefiner.from_checkpoint(str(tmp_path / "x.pth"), model_type="vit_z")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # qwen2_vl: the tests above
def test_export_and_reload_each_family(tiny_of, family, tmp_path):
    """A family's model exported with ``save_stamp`` and reloaded by ``Segmenter.from_pretrained``
    gives the masks of the model it was saved from (its settings travel in stamp.json)."""
    from stamp.data.collate import StampCollator, cell_pixels

    model, processor = tiny_of(family)
    seg = Segmenter.from_pretrained(save_stamp(model, processor, tmp_path / "m"), device="cpu")
    assert seg.model.family == family
    assert seg.model.deepstack_mask_tokens == model.deepstack_mask_tokens
    assert cell_pixels(seg.processor) == (32 if family == "qwen3_vl" else 28)
    sample = square_sample(size=140)
    r = seg.segment(sample.image, "Segment the red square.", answer=sample.messages[1]["content"])
    with torch.no_grad():
        want = model(StampCollator(processor)([sample])).mask_logits
    assert len(r.cell_logits) == len(want) == 1
    torch.testing.assert_close(r.cell_logits[0], want[0], rtol=0, atol=1e-4)
