"""Console entry points. They compose the Hydra config in ``conf/`` and run one job."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from stamp.utils.config import CONF_DIR  # noqa: F401  (the entry points' config_path)


def project_dir() -> Path:
    """Where ``logs/``, ``artifacts/`` and ``data/`` are: ``STAMP_ROOT``, else the current directory."""
    return Path(os.environ.get("STAMP_ROOT") or os.getcwd()).resolve()


if not OmegaConf.has_resolver("stamp_root"):
    OmegaConf.register_new_resolver("stamp_root", lambda: str(project_dir()))


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


def user_error_message(e: BaseException) -> str | None:
    """One line for a user error (also one that Hydra wrapped while instantiating a config, with
    the config key it was building), or None when ``e`` is a bug."""
    where = ""
    while e is not None and not isinstance(e, USER_ERRORS):
        if type(e).__name__ == "MisconfigurationException":  # Lightning: a trainer setting
            break
        if type(e).__name__ != "InstantiationException":
            return None
        key = re.search(r"full_key: (\S+)", str(e))
        where = where or (f" (building {key.group(1)})" if key else "")
        e = e.__cause__
    if e is None:
        return None
    return " ".join(str(e).split()) + where


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Report a user error as one line on stderr and exit with status 1; a traceback only with
    ``HYDRA_FULL_ERROR=1`` (as for Hydra's own errors)."""
    try:
        yield
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(1)
