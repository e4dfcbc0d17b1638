"""Reading data files with errors that name the file: images, JSON, and the ``DataError`` they raise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image


class DataError(ValueError):
    """A missing or corrupt data file (image, mask, annotation). Training skips the sample and
    counts it; evaluation stops, because a score must never silently change."""


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded (a truncated file fails here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable/truncated files
        raise DataError(f"cannot read image {path}: {e}") from e


def read_json(path: str | Path, fallback_encoding: str | None = None) -> Any:
    """Parse a JSON file as UTF-8 (then as ``fallback_encoding``, if given and UTF-8 fails).

    A missing or malformed file raises ``DataError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    encodings = ["utf-8"] + ([fallback_encoding] if fallback_encoding else [])
    errors = []
    for encoding in encodings:
        try:
            with open(path, encoding=encoding) as f:
                return json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            errors.append(f"{encoding}: {e}")
        except OSError as e:
            raise DataError(f"cannot read JSON file {path}: {e}") from e
    raise DataError(f"cannot parse JSON file {path} ({'; '.join(errors)})")
