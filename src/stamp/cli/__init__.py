"""Console entry points. They compose the Hydra config in ``conf/`` and run one job."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

# The configs ship inside the package (``stamp/conf``), so an installed stamp finds them too.
CONF_DIR = os.environ.get("STAMP_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


def project_dir() -> Path:
    """Where ``logs/``, ``artifacts/`` and ``data/`` are: ``STAMP_ROOT``, else the current directory."""
    return Path(os.environ.get("STAMP_ROOT") or os.getcwd()).resolve()


if not OmegaConf.has_resolver("stamp_root"):
    OmegaConf.register_new_resolver("stamp_root", lambda: str(project_dir()))


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
