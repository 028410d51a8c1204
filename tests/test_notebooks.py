"""The notebooks of notebooks/ run top to bottom on CPU: each in a fresh Jupyter kernel (nbclient,
the kernel of this Python), from notebooks/ as Jupyter runs them. They are committed without
outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "eidetic_memory.ipynb",
                                           "realization.ipynb"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        run = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
               and (cell.outputs or cell.execution_count is not None)]
        assert not run, f"{path.name}: cells {run} hold outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
