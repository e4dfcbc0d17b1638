"""What users see: the training progress bar, answers with [mask k], mask colours and outlines."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from stamp.model.tokens import SEG_TOKEN, mark_masks


class Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)  # 3 steps per epoch


def _fit(bar, max_steps: int, ckpt: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Toy(), ckpt_path=ckpt)
    return trainer


def test_step_progress_bar_counts_steps_across_epochs_and_after_resume(tmp_path):
    from stamp.training.callbacks import StepProgressBar

    class Seen(StepProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int, str]] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            super().on_train_batch_end(trainer, *args)
            b = self.train_progress_bar
            self.seen.append((b.n, b.total, b.desc))

    first = Seen()
    trainer = _fit(first, 7)  # 7 steps: 3 epochs of 3 batches, the last one cut short
    assert [(n, t) for n, t, _ in first.seen] == [(k, 7) for k in range(1, 8)]
    assert all("Epoch" not in d for _, _, d in first.seen)
    trainer.save_checkpoint(tmp_path / "step7.ckpt")

    resumed = Seen()
    _fit(resumed, 10, str(tmp_path / "step7.ckpt"))
    assert [(n, t) for n, t, _ in resumed.seen] == [(8, 10), (9, 10), (10, 10)]


def test_answers_show_mask_markers():
    assert mark_masks(f"Sure, the red circle is {SEG_TOKEN}.") == "Sure, the red circle is [mask 1]."
    assert mark_masks(f"{SEG_TOKEN} and {SEG_TOKEN}") == "[mask 1] and [mask 2]"
    assert mark_masks("It is blue.") == "It is blue."


class Result:
    def __init__(self, text: str, masks: list) -> None:
        self.text, self.masks = text, masks

    @property
    def answer(self) -> str:
        return mark_masks(self.text)


def test_cli_answer_lines_say_when_there_is_no_mask():
    from stamp.cli.predict import answer_lines

    full, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    assert answer_lines(Result(f"Sure, it is {SEG_TOKEN}.", [full])) == ["answer: Sure, it is [mask 1]."]
    assert answer_lines(Result("It is red.", [])) == [
        "answer: It is red.",
        "no mask: the answer has no <|seg|>, so nothing was segmented",
    ]
    lines = answer_lines(Result(f"It is {SEG_TOKEN}.", [empty]))
    assert lines == ["answer: It is [mask 1].", "Mask 1 is empty: nothing in the image matches."]


def test_demo_answer_names_no_colour():
    from stamp.demo.backend import render_answer

    assert render_answer(f"The blue shape is {SEG_TOKEN}.") == "The blue shape is **[mask 1]**."
    for colour in ("red", "green", "yellow", "purple"):
        assert colour not in render_answer(f"It is {SEG_TOKEN} and {SEG_TOKEN} and {SEG_TOKEN}.")


def test_mask_colours_are_distinct():
    from stamp.utils.overlay import mask_colour

    colours = [mask_colour(k) for k in range(24)]
    assert len(set(colours)) == len(colours)


def test_a_red_mask_on_a_red_object_is_outlined_and_numbered():
    from stamp.utils.overlay import mask_colour, overlay

    red = mask_colour(0)
    image = Image.new("RGB", (64, 64), red)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    out = np.asarray(overlay(image, [mask], alpha=0.5)).astype(int)
    inside_edge, outside_edge = out[30, 16], out[30, 15]  # the left edge, inside and outside
    assert tuple(inside_edge) == (255, 255, 255) and tuple(outside_edge) == (0, 0, 0)
    assert tuple(out[40, 40]) == red and tuple(out[2, 2]) == red  # the tint alone would be invisible
    plain = np.asarray(overlay(image, [mask], alpha=0.5, numbers=False)).astype(int)
    assert (out != plain).any()  # the "1" tag at the mask's top-left corner


@pytest.mark.parametrize("k", [0, 1])
def test_overlay_tints_each_mask_in_its_colour(k):
    from stamp.utils.overlay import mask_colour, overlay

    image = Image.new("RGB", (32, 32), (128, 128, 128))
    masks = [np.zeros((32, 32), bool), np.zeros((32, 32), bool)]
    masks[k][8:24, 8:24] = True
    out = np.asarray(overlay(image, masks, alpha=1.0, numbers=False))
    assert tuple(out[16, 16]) == mask_colour(k)
