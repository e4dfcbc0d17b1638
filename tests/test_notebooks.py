"""The notebooks run end to end on a CPU, in a kernel on this environment's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "stamp-test-python"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec whose python is the one running the tests (not whatever `python3` a user has)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def run_notebook(name: str, kernel: str, parameters: dict) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>`` with ``parameters`` set in a cell after its parameters cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(
        not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"
    ), f"{name} is committed with outputs; clear them"
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(
        nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or o.get("data", {}).get("text/plain", "") or "")
            out.append(o.get("data", {}).get("text/markdown", ""))
    return "\n".join(out)


def images_in(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart(kernel, tiny_dir, tmp_path):
    # train here (the path a fresh clone takes), whatever demo model this machine has
    nb = run_notebook(
        "quickstart.ipynb",
        kernel,
        {
            "USE_DEMO_MODEL": False,
            "STEPS": 12,
            "TINY_DIR": str(tiny_dir),
            "OUT_DIR": str(tmp_path / "quickstart"),
        },
    )
    assert (tmp_path / "quickstart" / "model" / "stamp_head.safetensors").is_file()
    text = text_of(nb)
    assert f"model: {tmp_path / 'quickstart' / 'model'}" in text
    assert "IoU with the true square" in text
    assert "Q1: Please segment the blue square." in text and "Q2: What colour is the circle?" in text
    assert images_in(nb) >= 2  # the image and its overlay


def test_experiments(kernel, tiny_dir, tmp_path):
    sweep = tmp_path / "sweep"
    nb = run_notebook(
        "experiments.ipynb", kernel, {"SWEEP_DIR": None, "TINY_DIR": str(tiny_dir), "OUT_DIR": str(sweep)}
    )
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == ["0", "1"]
    assert all((sweep / j / "metrics.json").is_file() for j in ("0", "1"))
    text = text_of(nb)
    assert "2 jobs; swept: ['optimizer.lr']" in text
    assert "| job | optimizer.lr | val/ciou_cell | train/loss | status |" in text
    assert images_in(nb) >= 1
    assert (sweep / "sweep.md").is_file() and (sweep / "sweep.png").is_file()
