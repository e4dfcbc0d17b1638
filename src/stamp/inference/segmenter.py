"""The library API: chat about an image and get a mask for every ``<|seg|>`` in the answer.

from stamp.inference import Segmenter
seg = Segmenter.from_pretrained("logs/demo/runs/<run>/model")
result = seg.segment("photo.jpg", "Please segment the red circle.")
result.text, result.masks[0], result.cell_logits[0]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stamp.data.collate import StampCollator
from stamp.data.sample import Sample
from stamp.evaluation import upsample
from stamp.inference.generate import AnswerStreamer, generate_with_masks, generation_config
from stamp.inference.images import ImageLike, load_image
from stamp.model.stamp import StampModel
from stamp.model.tokens import SEG_TOKEN, mark_masks

Turn = tuple[str, str]  # (question, answer)


@dataclass
class SegmentationResult:
    """The answer to one question about one image."""

    text: str  # the answer as generated, with <|seg|> tokens in place
    masks: list[np.ndarray] = field(default_factory=list)  # one HxW bool per <|seg|>, image size
    cell_logits: list[torch.Tensor] = field(default_factory=list)  # one (h, w) per <|seg|>
    coarse_masks: list[np.ndarray] = field(default_factory=list)  # before SAM refinement
    refined: bool = False

    @property
    def answer(self) -> str:
        """The answer as a person reads it: the k-th ``<|seg|>`` shown as ``[mask k]``."""
        return mark_masks(self.text)


def chat_messages(question: str, answer: str | None, history: Sequence[Turn] | None) -> list[dict[str, str]]:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(
            "the query is empty; ask a question or give an instruction such as 'segment the dog'"
        )
    messages = []
    for q, a in history or []:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer if answer is not None else ""})
    return messages


class Segmenter:
    """Generate an answer with the backbone's ``generate()``, then predict every ``<|seg|>``'s
    mask in one batched forward that reuses its cache and the image's features (encoded once).

    Args:
        model, processor: a ``StampModel`` and its Qwen2-VL processor.
        generation: ``generation.*`` settings (``conf/generation/default.yaml`` keys: greedy
            unless ``do_sample``/``num_beams`` say otherwise), a ``GenerationConfig``, or just
            ``max_new_tokens`` as an int; None = the defaults.
        refiner: an optional ``SamRefiner`` applied to each coarse mask.
    """

    def __init__(
        self, model: StampModel, processor, generation: Mapping | int | None = None, refiner=None
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.generation = generation_config(generation, processor.tokenizer)  # checked here, once
        self.refiner = refiner

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: str | None = None,
        generation: Mapping | int | None = None,
        sam: dict[str, Any] | None = None,
        **overrides,
    ) -> Segmenter:
        """Load a STAMP checkpoint directory (ours or a released one).

        ``overrides`` are model settings such as ``mask_positions`` or ``attn_implementation``;
        ``sam`` holds ``checkpoint`` and ``model_type`` (and optional refinement settings).
        """
        from stamp.model.checkpoints import load_stamp

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        model, processor = load_stamp(path, dtype=dtype, **overrides)
        model.to(device)
        refiner = None
        if sam and sam.get("checkpoint"):
            from stamp.inference.sam import SamRefiner

            refiner = SamRefiner.from_checkpoint(device=device, **sam)
        return cls(model, processor, generation=generation, refiner=refiner)

    def segment(
        self,
        image: ImageLike,
        question: str,
        answer: str | None = None,
        history: Sequence[Turn] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> SegmentationResult:
        """Answer ``question`` about ``image`` (after the earlier ``history`` turns).

        With ``answer`` the reply is not generated but taken as given (teacher forcing), so the
        masks of a known answer can be scored. ``on_text`` is called with the answer so far
        (``<|seg|>`` kept) each time generation adds to it.
        """
        streamer = AnswerStreamer(self.processor.tokenizer, on_text) if on_text and answer is None else None
        return self.segment_batch([image], [question], [answer], [history], streamer=streamer)[0]

    def stream(
        self, image: ImageLike, question: str, history: Sequence[Turn] | None = None
    ) -> Iterator[str | SegmentationResult]:
        """``segment`` as it happens: yields the answer so far (a ``str``, ``<|seg|>`` kept)
        while it is generated, then the ``SegmentationResult`` (masks included) last.
        Errors of the generation are raised here."""
        events: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                events.put(self.segment(image, question, history=history, on_text=events.put))
            except BaseException as e:  # handed to the consumer's thread
                events.put(e)
            events.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := events.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()

    @torch.no_grad()
    def segment_batch(
        self,
        images: Sequence[ImageLike],
        questions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        histories: Sequence[Sequence[Turn] | None] | None = None,
        streamer=None,
    ) -> list[SegmentationResult]:
        """Several questions (each about its own image) answered in one batch."""
        pil = [load_image(im) for im in images]
        batch, forced = self.inputs(pil, questions, answers, histories)
        rows = generate_with_masks(
            self.model,
            batch,
            self.processor.tokenizer,
            self.generation,
            teacher_forcing=forced,
            streamer=streamer,
        )
        results = []
        for im, row in zip(pil, rows, strict=True):
            coarse = [upsample(lg.cpu() > 0, (im.height, im.width)).numpy() for lg in row.cell_logits]
            masks, refined = coarse, False
            if self.refiner is not None and coarse:
                masks, refined = self.refiner.refine(im, coarse), True
            results.append(
                SegmentationResult(row.text, masks, [lg.cpu() for lg in row.cell_logits], coarse, refined)
            )
        return results

    def inputs(
        self,
        images: Sequence[ImageLike],
        questions: Sequence[str],
        answers: Sequence[str | None] | None = None,
        histories: Sequence[Sequence[Turn] | None] | None = None,
    ) -> tuple[dict, bool]:
        """The model's input batch for these chats, on the model's device, and whether the
        answers are given (teacher forcing)."""
        n = len(images)
        answers = list(answers) if answers is not None else [None] * n
        histories = list(histories) if histories is not None else [None] * n
        if not (len(questions) == len(answers) == len(histories) == n):
            raise ValueError(
                f"{n} images but {len(questions)} questions, {len(answers)} answers, {len(histories)} histories"
            )
        forced = [a is not None for a in answers]
        if any(forced) and not all(forced):
            raise ValueError("give an answer for every question in a batch, or for none")
        pil = [load_image(im) for im in images]
        samples = []
        for i, (im, q, a, h) in enumerate(zip(pil, questions, answers, histories, strict=True)):
            messages = chat_messages(q, a, h)
            n_seg = sum(m["content"].count(SEG_TOKEN) for m in messages if m["role"] == "assistant")
            # placeholders: the masks of earlier (or given) answers are not scored here
            placeholder = [np.zeros((im.height, im.width), dtype=bool)] * n_seg
            samples.append(
                Sample(image=im, messages=messages, masks=placeholder, id=f"query-{i}", kind="query")
            )
        collate = StampCollator(self.processor, "generate", teacher_forcing=all(forced))
        batch = collate(samples)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch, all(forced)
