"""The quickstart notebook runs top to bottom (small settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("EVOOPT_QUICKSTART_QUICK", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this process's environment: EVOOPT_QUICKSTART_QUICK and the test cache
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "best found" in text and "evoopt_recipe.yaml" in text
    assert "evoopt_sms-spam_dev" in text  # lm-eval scored the merged model
