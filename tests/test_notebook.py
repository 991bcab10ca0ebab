"""notebooks/02_baseline_training.ipynb runs top to bottom (executed with nbclient, not just present).

The kernel is this interpreter: a kernelspec with a name of its own is written for
``sys.executable`` into a temporary folder put first on ``JUPYTER_PATH``, so neither a user's
``python3`` kernelspec nor a missing system one can change which Python runs the notebook.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_baseline_training.ipynb"
KERNEL_NAME = "fedpatch-test-python"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    jupyter = tmp_path / "jupyter"
    write_kernel_spec(jupyter / "kernels" / KERNEL_NAME, overrides={"display_name": "fedpatch test", "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]})
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(jupyter), os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return KERNEL_NAME


def test_baseline_notebook_runs_top_to_bottom(kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    monkeypatch.setenv("FEDPATCH_NOTEBOOK_DIR", str(work))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    images = [o for cell in code_cells for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # data, maps, sPRO curve, histogram, overlay
    metrics = json.loads((work / "baseline" / "pipe_clip" / "metrics.json").read_text())
    assert metrics["classification"]["auc_roc"] > 0.6
    assert (work / "predict" / "predictions.csv").is_file()
