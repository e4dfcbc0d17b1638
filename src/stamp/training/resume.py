"""Resuming a run: which checkpoint, and the random state that makes the continuation exact.

``ckpt_path=last`` resumes from ``<output_dir>/checkpoints/last.ckpt`` and fails, naming the
path, when there is none (Lightning alone would warn and train from scratch). ``auto_resume=true``
resumes from that file when it exists and starts fresh otherwise, so the same command can be
re-run after a crash or a preemption (with a fixed ``hydra.run.dir``). A run resumed at its last
step (killed during the final validation, or already finished) trains nothing and validates
again (``stamp.cli.train.train``), so its results are written, never lost.

What a resumed run restores, and who restores it:

* weights, optimizer and scheduler states, the loop counters: Lightning's checkpoint;
* the position in the training data: ``ResumableDataLoader`` (``stamp.data.resumable``);
* torch, CUDA, numpy and Python random states: ``RandomState`` below (dropout, e.g. LoRA's,
  draws from torch's generator; without it a resumed run would repeat the masks of step 0).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def last_checkpoint(cfg: DictConfig) -> Path:
    """Where this run's ``last.ckpt`` is (the model-checkpoint callback's directory)."""
    default = f"{cfg.paths.output_dir}/checkpoints"
    return Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=default)) / "last.ckpt"


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from, from ``ckpt_path`` and ``auto_resume``.

    ``ckpt_path``: null (fresh start, unless ``auto_resume``), ``last`` (this run's last.ckpt,
    which must exist) or a path to a checkpoint file (which must exist).
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        last = last_checkpoint(cfg)
        if cfg.get("auto_resume") and last.is_file():
            log.info("auto_resume: resuming from %s", last)
            return str(last)
        return None
    path = last_checkpoint(cfg) if str(ckpt) == "last" else Path(str(ckpt))
    if not path.is_file():
        hint = " (set hydra.run.dir or paths.output_dir to the run to resume)" if str(ckpt) == "last" else ""
        raise FileNotFoundError(f"ckpt_path={ckpt}: no checkpoint at {path}{hint}")
    log.info("resuming from %s", path)
    return str(path)


class RandomState(L.Callback):
    """Saves the random generators' states in each checkpoint and restores them on resume.

    The state is rank 0's; the entry point seeds every rank alike, so it is every rank's.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types only, so that a weights-only torch.load can read them back
        numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
