"""A Hydra callback for the sweep tests: each job waits at its start until ``parties`` jobs have
arrived, and records whether they all did (Hydra turns an exception in a callback into a warning,
so the outcome is a file, checked by the test). Jobs run one after another never meet: the first
waits ``timeout`` seconds and records nothing. A proof of parallel jobs that does not depend on
how fast the machine is."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback


class Rendezvous(Callback):
    def __init__(self, dir: str, parties: int, timeout: float = 300.0) -> None:
        self.dir, self.parties, self.timeout = Path(dir), parties, timeout

    def on_job_start(self, config, **kwargs) -> None:
        arrived, met = self.dir / "arrived", self.dir / "met"
        arrived.mkdir(parents=True, exist_ok=True)
        met.mkdir(exist_ok=True)
        me = f"{os.getpid()}-{time.time_ns()}"
        (arrived / me).touch()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if len(list(arrived.iterdir())) >= self.parties:
                (met / me).touch()
                return
            time.sleep(0.05)
