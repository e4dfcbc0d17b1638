"""Optuna studies shared between the sweeper, the trials it launches and ``stamp-sweep-report``.

A study lives in a *storage*, given as one string (``hydra.sweeper.storage``):

* an RDB URL (``sqlite:///logs/optuna.db``, ``postgresql://user@host/db``): SQLAlchemy's, as
  Optuna takes it;
* any other string: the path of an Optuna journal file (``JournalFileBackend``), which several
  processes on one machine or on a shared file system can append to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

TRIAL_KEY = "optuna_trial"  # the config node that tells a job which trial it runs


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """The Optuna storage named by ``spec``: an RDB URL, or a journal file path (created if missing)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    spec = str(spec)
    if not spec:
        raise ValueError("storage is an empty string; give an RDB URL (sqlite:///optuna.db) or a file path")
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ValueError(
            f"storage={spec!r} is a directory; give a journal file path such as {path}/optuna.journal"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def load_trial(storage_spec: str, study_name: str, number: int, pruner=None) -> optuna.Trial:
    """Trial ``number`` of study ``study_name`` in ``storage_spec``, to report to from a job.

    ``pruner``: the sweeper's pruner (it is not kept in the storage); None: no pruning.
    """
    import optuna

    storage = open_storage(storage_spec)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError as e:
        raise ValueError(f"{TRIAL_KEY}.study={study_name!r} is not in storage {storage_spec!r}") from e
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
    except KeyError as e:
        raise ValueError(f"{TRIAL_KEY}.number={number} is not a trial of study {study_name!r}") from e
    study = optuna.load_study(
        study_name=study_name, storage=storage, pruner=pruner or optuna.pruners.NopPruner()
    )
    return optuna.trial.Trial(study, trial_id)
