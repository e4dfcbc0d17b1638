"""Multi-process helpers: an evaluation sampler without padding, one output directory per run.

Lightning's default ``DistributedSampler`` pads the last round with repeated samples so that
every rank gets as many batches; a metric summed over ranks would then count those samples
twice. ``UnpaddedDistributedSampler`` gives rank ``r`` the indices ``r, r + W, r + 2W, ...``
(each sample exactly once, ranks may differ by one sample); the metrics are torchmetrics
``Metric``s, which sum their states across ranks at ``compute``.

Lightning's ``ddp`` strategy (the ``popen`` launcher) starts the other ranks of a node by
running this script again with the same command line plus ``hydra.run.dir=<run.dir>``. That
pins the directory of a single run, but under ``-m`` (multirun, sweepers) the children would
read ``-m`` and run the whole sweep themselves. ``pin_run_dir_for_children`` makes the command
line and ``hydra.run.dir`` describe the current job only, so every job writes one directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

from torch.utils.data import Dataset, DistributedSampler

RUN_DIR_ENV = "STAMP_RUN_DIR"  # read by conf/hydra/default.yaml (hydra.run.dir)
SUBMITIT_ENV = "SUBMITIT_EXECUTOR"  # set by submitit in its jobs: "slurm" or "local"
_VALUE_FLAGS = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir")
_MULTIRUN_FLAGS = ("-m", "--multirun")
_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", RUN_DIR_ENV)


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``W`` reads indices ``r::W`` in order: every sample exactly once, no padding.

    A ``DistributedSampler`` subclass, so Lightning does not wrap it in its own (padding) one.
    Only for evaluation: ranks may see one batch more or less, which is fine when no
    collective runs per batch (generation in ``validation_step`` runs none).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, n, num_replicas))
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def job_argv(argv: Sequence[str], job_overrides: Sequence[str]) -> list[str]:
    """The command line of one job of a multirun: ``argv`` without ``-m`` and without its
    overrides, followed by the job's own overrides (config-path/name/dir flags are kept)."""
    out, keep_next = [argv[0]], False
    for arg in argv[1:]:
        if keep_next:
            out.append(arg)
            keep_next = False
        elif arg in _MULTIRUN_FLAGS:
            continue
        elif arg in _VALUE_FLAGS:
            out.append(arg)
            keep_next = True
        elif arg.startswith("-"):
            out.append(arg)  # --config-dir=X and other flags
        # anything else is an override of the sweep; the job's overrides replace them
    return out + list(job_overrides)


def pin_run_dir_for_children() -> dict[str, str | None]:
    """Before Lightning launches the other ranks of this job: point them at this job's output dir.

    Sets ``STAMP_RUN_DIR`` (which ``hydra.run.dir`` reads, so the ``hydra.run.dir`` Lightning
    passes to the children is this job's directory) and, in a multirun, rewrites ``sys.argv``
    to the current job's command line. Does nothing outside a Hydra app and in the child ranks.
    Returns the launch variables as they were, for ``end_distributed_job``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    if not HydraConfig.initialized() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return before
    hc = HydraConfig.get()
    os.environ[RUN_DIR_ENV] = hc.runtime.output_dir
    if hc.mode == RunMode.MULTIRUN and not os.environ.get(SUBMITIT_ENV):
        # (under submitit, sys.argv is submitit's and the launcher starts every rank itself)
        # Lightning re-runs sys.argv; this is the one place it reads the job's command line from.
        sys.argv[:] = job_argv(sys.argv, list(hc.overrides.task))
    return before


def end_distributed_job(launch_env: dict[str, str | None]) -> None:
    """Undo what a run leaves behind for the next job of a multirun in this process.

    Lightning leaves the process group open and, in the process that launched the other ranks,
    the launch variables (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...) set: a second
    run would reuse a group whose ranks have exited, or take the variables for an external
    launcher (torchrun) and wait for ranks nobody starts. ``launch_env``: the variables as
    ``pin_run_dir_for_children`` found them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in launch_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_export(trainer, export: bool) -> None:
    """Refuse, before training, an export that would write sharded parameters (FSDP)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if export and isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            "export=true with trainer=fsdp: rank 0 holds only a shard of each parameter after training, "
            "so the exported model would be incomplete. Set export=false; the checkpoint "
            "(checkpoints/last.ckpt, state_dict_type: full) holds the whole model."
        )


def check_submitit_launch(trainer) -> None:
    """Refuse, before training, a job of a submitit launcher whose strategy would start more ranks.

    Lightning's ``ddp`` launcher starts the other ranks by running the command line again; in a
    submitit job that command line is submitit's, not ``stamp-train``'s. On SLURM, srun starts
    every rank (``hydra.launcher.tasks_per_node`` = GPUs per node) and Lightning only joins them.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    executor = os.environ.get(SUBMITIT_ENV)
    if executor and isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
        raise ValueError(
            f"hydra/launcher={'slurm' if executor == 'slurm' else 'local_processes'} job with "
            f"trainer.devices={trainer.num_devices}: Lightning would start the other ranks itself. "
            "With hydra/launcher=slurm set hydra.launcher.tasks_per_node to the GPUs per node "
            "(srun starts one rank per GPU); with local_processes give each job one device"
        )
