"""Optional SAM refinement of STAMP's coarse masks (docs/METHOD.md section 4).

The coarse mask becomes SAM's low-resolution mask prompt (the inverse sigmoid of a clipped 0/1
map, longest side resized to the prompt size - 256 for SAM - and zero-padded), together with
points sampled inside (positive) and outside (negative) it. SAM predicts once; its own
low-resolution logits are then fed back ``iterations - 1`` more times. The image embedding is
computed once per image and reused for all of its masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODEL_TYPES = ("vit_h", "vit_l", "vit_b")


@dataclass
class Prompt:
    mask_input: np.ndarray  # (1, S, S) logits
    points: np.ndarray  # (P, 2) x, y in image pixels
    labels: np.ndarray  # (P,) 1 inside, 0 outside


def mask_prompt(mask: np.ndarray, size: int, eps: float = 1e-4) -> np.ndarray:
    """(1, size, size) logits: inverse sigmoid of the clipped 0/1 mask, longest side resized to
    ``size`` (as SAM resizes its input image), the rest zero-padded (bottom/right)."""
    h, w = mask.shape
    scale = size / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    p = torch.as_tensor(np.asarray(mask, dtype=np.float32)).clamp(eps, 1 - eps)
    logits = torch.log(p / (1 - p))[None, None]
    resized = F.interpolate(logits, size=(nh, nw), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(size, size)
    out[:nh, :nw] = resized
    return out[None].numpy()


def sample_points(
    mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_pos`` pixels inside and ``n_neg`` outside the mask, as (x, y), with labels."""
    inside, outside = np.argwhere(mask), np.argwhere(~mask)
    picks, labels = [], []
    for where, n, label in ((inside, n_pos, 1), (outside, n_neg, 0)):
        if len(where) and n:
            idx = rng.choice(len(where), size=min(n, len(where)), replace=False)
            picks.append(where[idx][:, ::-1])  # (row, col) -> (x, y)
            labels.append(np.full(len(idx), label))
    if not picks:
        return np.zeros((0, 2)), np.zeros(0, dtype=int)
    return np.concatenate(picks).astype(np.float32), np.concatenate(labels)


class SamRefiner:
    """Refines coarse masks with a ``segment_anything.SamPredictor``.

    Args:
        predictor: a ``SamPredictor`` (its model may be any SAM, e.g. a small random one in tests).
        points: positive and negative points sampled per mask (each).
        iterations: SAM passes (the first from the coarse prompt, the rest from its own logits).
        seed: seed of the point sampling, so results repeat.
        eps: clipping of the 0/1 mask before the inverse sigmoid.
    """

    def __init__(
        self, predictor, points: int = 10, iterations: int = 3, seed: int = 0, eps: float = 1e-4
    ) -> None:
        self.predictor, self.points, self.iterations, self.seed, self.eps = (
            predictor,
            points,
            iterations,
            seed,
            eps,
        )
        self._image_key: int | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str, model_type: str = "vit_h", device: str = "cpu", **kwargs
    ) -> SamRefiner:
        from segment_anything import SamPredictor, sam_model_registry

        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown sam.model_type {model_type!r}; expected one of {MODEL_TYPES}")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SAM checkpoint {str(path)!r} not found (sam.checkpoint); e.g. sam_vit_h_4b8939.pth for vit_h"
            )
        sam = sam_model_registry[model_type](checkpoint=str(path)).to(device).eval()
        return cls(SamPredictor(sam), **kwargs)

    @property
    def prompt_size(self) -> int:
        return int(self.predictor.model.prompt_encoder.mask_input_size[0])

    def set_image(self, image: Image.Image) -> None:
        """Compute SAM's image embedding, unless this very image is already set."""
        arr = np.asarray(image.convert("RGB"))
        key = hash((arr.shape, arr[::7, ::7].tobytes()))
        if key != self._image_key:
            self.predictor.set_image(arr)
            self._image_key = key

    def prompt(self, mask: np.ndarray, rng: np.random.Generator) -> Prompt:
        points, labels = sample_points(mask, self.points, self.points, rng)
        return Prompt(mask_prompt(mask, self.prompt_size, self.eps), points, labels)

    @torch.no_grad()
    def refine(self, image: Image.Image, masks: list[np.ndarray]) -> list[np.ndarray]:
        """Refined masks (an empty coarse mask stays empty: there is nothing to prompt)."""
        self.set_image(image)
        rng = np.random.default_rng(self.seed)
        out = []
        for mask in masks:
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                out.append(mask.copy())
                continue
            p = self.prompt(mask, rng)
            low_res = p.mask_input
            for _ in range(self.iterations):
                pred, _, low_res = self.predictor.predict(
                    point_coords=p.points, point_labels=p.labels, mask_input=low_res, multimask_output=False
                )
            out.append(pred[0].astype(bool))
        return out
