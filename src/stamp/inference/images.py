"""Reading user images with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | np.ndarray | str | Path


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, an HxWx3 (or HxW) uint8 array, or a file path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image array has shape {image.shape}; expected HxW or HxWx3")
        return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8)).convert("RGB")
    path = Path(image).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"image path {str(path)!r} is a directory, not an image file")
    if not path.exists():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {str(path)!r} as an image: {e}") from e
