"""The score of a model that ignores the words, on the synthetic validation split.

For every segmentation expression (referring, multi-target, no-target, pair) it predicts one of
the image's shapes at random, at the model's 28-pixel cell resolution, and prints the cell-level
cIoU: the floor that `val/ciou_cell` of a trained model must clear. The split is the one
`make demo` validates on (the demo config, Hydra overrides accepted):

    .venv/bin/python scripts/random_shape_baseline.py [data.train.radius=[28,48] ...]
"""

from __future__ import annotations

import sys

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from stamp.cli import CONF_DIR
from stamp.data.collate import CELL, cell_mask
from stamp.data.synthetic import render


def main(overrides: list[str]) -> None:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", *overrides])
    data = instantiate(cfg.data.val)
    if data.curriculum or data.kind_curriculum:
        raise ValueError(
            "the baseline reads each scene from its random stream; use a split without curriculum"
        )
    grid = (data.image_size // CELL, data.image_size // CELL)
    pick = np.random.default_rng(0)
    inter = union = expressions = 0
    for i in range(len(data)):
        sample = data[i]
        if not sample.masks:
            continue
        shapes = data.scene(data.rng(i))  # the scene is the first draw of the sample's stream
        _, shape_masks = render(shapes, data.image_size, (255, 255, 255))
        if any((truth & ~np.logical_or.reduce(shape_masks)).any() for truth in sample.masks):
            raise RuntimeError(f"{sample.id}: the scene read from its random stream is not the sample's")
        for truth in sample.masks:
            guess = cell_mask(shape_masks[pick.integers(len(shape_masks))], grid).bool()
            target = cell_mask(truth, grid).bool()
            inter += int((guess & target).sum())
            union += int((guess | target).sum())
            expressions += 1
    print(f"{expressions} expressions of {len(data)} validation chats (radius {tuple(data.radius)})")
    print(f"random-shape cell cIoU: {inter / union:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
