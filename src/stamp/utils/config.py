"""Where the configs are, and checks on composed configs that Hydra itself leaves to
instantiation time."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

# The configs ship inside the package (``stamp/conf``), so an installed stamp finds them too.
CONF_DIR = os.environ.get("STAMP_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


def check_arguments(node: Any, where: str) -> None:
    """Raise ``ValueError`` naming the first key, anywhere under ``node``, that the ``_target_``
    of its config does not take as an argument (``where``: the node's key, e.g. ``data``).

    Catches settings that one config group leaves behind for another (a synthetic-data key on a
    REFER dataset) with a one-line message instead of a ``TypeError`` deep in ``instantiate``.
    """
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_arguments(item, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if isinstance(target, str):
        params = inspect.signature(get_object(target)).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for key in node:
                if not str(key).startswith("_") and key not in params:
                    raise ValueError(
                        f"{where}.{key}: {target} takes no argument {key!r} "
                        f"(it takes {', '.join(k for k in params if k != 'self')}); remove the key "
                        "or choose a config that sets only keys of this target"
                    )
    for key, value in node.items():
        check_arguments(value, f"{where}.{key}")
