"""stamp's Optuna sweeper for Hydra (``hydra/sweeper=stamp_optuna``, used by ``hparams_search=optuna``).

Hydra finds it because ``hydra_plugins`` is a namespace package (no ``__init__.py`` above this one).
Hydra imports every module here at start-up, so Optuna is imported only when a sweep runs.
"""
