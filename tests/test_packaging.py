"""stamp installed from its wheel (not this checkout) finds its configs and writes under the CWD."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds and installs a wheel, then starts stamp-train (~30 s)
def test_wheel_install_finds_configs_and_logs_under_the_current_directory(tmp_path, tiny_dir):
    # build from a copy, so the checkout gets no build/ or egg-info; no network, no new packages
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("stamp_seg-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STAMP_CONF_DIR", "STAMP_ROOT")}
    env["PYTHONPATH"] = str(site)  # the installed copy, ahead of this checkout's editable install
    where = subprocess.run(
        [sys.executable, "-c", "import stamp.cli as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    train = [str(site / "bin" / "stamp-train"), "train.dry_run=true", f"paths.tiny_dir={tiny_dir}"]
    done = subprocess.run(train, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters" in done.stdout.lower() or "parameters" in done.stderr.lower()
    (run,) = (elsewhere / "logs" / "train" / "runs").iterdir()
    assert (run / ".hydra" / "config.yaml").is_file()
