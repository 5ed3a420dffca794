"""Every example notebook executes top to bottom on a fresh kernel."""

import os
import pathlib
import tempfile

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))
# Plots each notebook shows, where it is more than one.
PLOTS = {"stock_series": 2}


def test_every_example_has_a_notebook():
    scripts = {
        p.stem for p in (REPO / "examples").glob("*.py")
        if not p.stem.startswith("_")
    }
    assert {p.stem for p in NOTEBOOKS} == scripts


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, path.name
                assert cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    if path.stem == "stock_series":
        pytest.importorskip("arch", reason="the examples extra is missing")
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setenv("KERAS_BN_NOTEBOOK_QUICK", "1")
        monkeypatch.setenv("KERAS_BN_NOTEBOOK_OUT", tmp)
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        monkeypatch.setenv(
            "PYTHONPATH",
            os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
        )
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        images = [
            output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs
            if "image/png" in output.get("data", {})
        ]
        expected = PLOTS.get(path.stem, 1)
        assert len(images) >= expected, f"{path.name}: {len(images)} plots"
