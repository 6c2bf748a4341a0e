"""The quickstart notebook runs end to end (small settings) in a real Jupyter kernel."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ADC_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_ADC_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "test accuracy" in text and "Ledger(" in text
    assert os.path.isdir(tmp_path / "pretrained")
    plots = [output for output in outputs if output.output_type == "display_data" and "image/png" in output.data]
    assert len(plots) == 2  # bytes saved, and the clusters with their kept tokens
