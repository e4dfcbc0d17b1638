"""The collator: chat template, labels, cell targets, and clear errors on bad samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stamp.data.collate import StampCollator, cell_mask
from stamp.data.sample import Sample
from stamp.model.tokens import SEG_TOKEN
from tests.helpers import square_sample


def test_labels_cover_only_the_answers(tiny):
    _, processor = tiny
    follow = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "red"}]
    batch = StampCollator(processor)([square_sample(extra_turns=follow), square_sample(question="Hi.")])
    tok = processor.tokenizer
    for b in range(2):
        labelled = batch["labels"][b][batch["labels"][b] != -100]
        text = tok.decode(labelled, skip_special_tokens=False)
        expected = f"Sure, it is {SEG_TOKEN}<|im_end|>" + ("red<|im_end|>" if b == 0 else "")
        assert text == expected
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert len(batch["seg_targets"]) == 2 and batch["seg_targets"][0].shape == (4, 4)


def test_cell_mask_bilinear_then_threshold():
    m = np.zeros((112, 112), dtype=bool)
    m[0:28, 0:28] = True  # exactly one cell
    m[28:56, 28:41] = True  # left part of a cell, short of its centre (41.5): dropped
    m[56:84, 56:71] = True  # left part of a cell, over its centre: kept
    cells = cell_mask(m, (4, 4))
    expected = torch.zeros(4, 4)
    expected[0, 0] = expected[2, 2] = 1
    assert torch.equal(cells, expected)


def test_generate_mode_left_pads_prompts(tiny):
    _, processor = tiny
    batch = StampCollator(processor, "generate")(
        [square_sample(question="Hi."), square_sample(question="A longer question here.")]
    )
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    text = processor.tokenizer.decode(batch["input_ids"][1], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and "Sure" not in text


def test_segmentation_sample_without_image():
    with pytest.raises(ValueError, match="has no image"):
        Sample(
            image=None,
            messages=[
                {"role": "user", "content": "Segment it."},
                {"role": "assistant", "content": SEG_TOKEN},
            ],
            masks=[np.zeros((4, 4), bool)],
            id="x1",
        )


def test_mask_size_differs_from_image():
    img = Image.new("RGB", (64, 48))
    with pytest.raises(ValueError, match=r"mask 0 has shape \(48, 60\) but its image is 48x64"):
        Sample(
            image=img,
            messages=[
                {"role": "user", "content": "Segment it."},
                {"role": "assistant", "content": SEG_TOKEN},
            ],
            masks=[np.zeros((48, 60), bool)],
            id="x2",
        )


def test_masks_must_match_seg_count():
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=r"1 <\|seg\|> token\(s\) in its answers but 2 mask\(s\)"):
        Sample(
            image=img,
            messages=[
                {"role": "user", "content": "Segment it."},
                {"role": "assistant", "content": SEG_TOKEN},
            ],
            masks=[np.zeros((64, 64), bool)] * 2,
        )


def test_image_smaller_than_a_cell(tiny):
    _, processor = tiny
    s = Sample(
        image=Image.new("RGB", (20, 40)),
        messages=[{"role": "user", "content": "Segment it."}, {"role": "assistant", "content": SEG_TOKEN}],
        masks=[np.zeros((40, 20), bool)],
        id="small-1",
    )
    with pytest.raises(ValueError, match=r"sample 'small-1': image is 20x40 pixels, smaller than one 28x28"):
        StampCollator(processor)([s])
