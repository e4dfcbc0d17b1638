"""The one sample format every data source produces and the collator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from stamp.model.tokens import SEG_TOKEN


@dataclass
class Sample:
    """A chat about (at most) one image, with a ground-truth mask per ``<|seg|>``.

    ``messages`` alternate ``{"role": "user"|"assistant", "content": str}``; the image belongs
    to the first user turn. ``masks`` holds one HxW boolean array per ``<|seg|>`` in the
    assistant turns, in reading order. ``ignore`` marks pixels left out of the metrics.
    ``skipped`` (training only) describes broken samples this one stands in for
    (``stamp.data.mixing.SkipBadSamples``); the collator counts them.
    """

    image: Image.Image | None
    messages: list[dict[str, str]]
    masks: list[np.ndarray] = field(default_factory=list)
    ignore: np.ndarray | None = None
    kind: str = "refer"
    id: str = ""
    answer: str | None = None  # short reference answer for VQA scoring
    skipped: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        n_seg = sum(m["content"].count(SEG_TOKEN) for m in self.messages if m["role"] == "assistant")
        where = f"sample {self.id!r}" if self.id else "a sample"
        if n_seg != len(self.masks):
            raise ValueError(
                f"{where} has {n_seg} {SEG_TOKEN} token(s) in its answers but {len(self.masks)} mask(s)"
            )
        if n_seg and self.image is None:
            raise ValueError(f"{where} asks for a segmentation ({SEG_TOKEN}) but has no image")
        if self.image is not None:
            w, h = self.image.size
            for i, m in enumerate(self.masks):
                if m.shape != (h, w):
                    raise ValueError(
                        f"{where}: mask {i} has shape {tuple(m.shape)} but its image is {h}x{w} (HxW)"
                    )
            if self.ignore is not None and self.ignore.shape != (h, w):
                raise ValueError(
                    f"{where}: ignore mask has shape {tuple(self.ignore.shape)}, image is {h}x{w}"
                )

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The messages up to (not including) the last assistant answer."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def target_answer(self) -> str:
        return self.messages[-1]["content"]
