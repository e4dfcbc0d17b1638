"""Console entry points. They compose the Hydra config in ``conf/`` and run one job."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = os.environ.get("STAMP_CONF_DIR", str(ROOT / "conf"))

if not OmegaConf.has_resolver("stamp_root"):
    OmegaConf.register_new_resolver("stamp_root", lambda: os.environ.get("STAMP_ROOT", str(ROOT)))


def path_slug(path: str) -> str:
    """A folder name for a checkpoint path (relative to the working directory when inside it):
    ``logs/demo/runs/x/model`` -> ``logs-demo-runs-x-model``."""
    p = Path(str(path)).expanduser()
    with suppress(ValueError):  # outside the working directory: the absolute path
        p = p.resolve().relative_to(Path.cwd().resolve())
    return "-".join(part for part in p.as_posix().split("/") if part not in ("", ".", "..")) or "checkpoint"


if not OmegaConf.has_resolver("stamp_slug"):
    OmegaConf.register_new_resolver("stamp_slug", path_slug)


# Errors that come from what the user asked for (a path, a value), not from a bug.
USER_ERRORS = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    OSError,
    MissingMandatoryValue,
)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Report a user error as one line on stderr and exit with status 1 (no traceback)."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
