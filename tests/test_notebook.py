"""The quickstart notebook runs top to bottom (QUICK settings) and shows what it says it shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "evoopt-test-python"

pytestmark = pytest.mark.slow  # the notebook trains experts and runs a study

# Run after the notebook's own cells, in its kernel: facts about the objects the notebook made.
CHECK = """
import json as _json
import sys as _sys

print("EVOOPT-CHECK " + _json.dumps({
    "prefix": _sys.prefix,
    "rows": report.rows,
    "trials": [(t.state.name, sorted(t.user_attrs)) for t in study.trials],
    "export": sorted(path.name for path in out.iterdir()),
    "exported_recipe": (out / "evoopt_recipe.yaml").read_text(),
    "best_recipe": study.best_trial.user_attrs["recipe"],
    "reloaded_probabilities": probabilities.tolist(),
    "lm_eval": {task: metrics.get("acc,none") for task, metrics in results["results"].items()},
    "lm_eval_recipe": results["config"].get("evoopt_recipe"),
}, default=str))
"""


def _kernel_manager(folder: Path) -> Any:
    """A kernel of this very interpreter (the venv's), whatever kernelspecs the machine has."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(folder / KERNEL, overrides={"display_name": "evoopt test"})  # argv[0] = sys.executable
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def _text(output: dict[str, Any]) -> str:
    return str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))


def _shown(cells: list[Any], code: str) -> str:
    """What the code cell that contains ``code`` showed (its printed text and its value)."""
    found = [cell for cell in cells if code in cell.source]
    assert len(found) == 1, f"expected one code cell with {code!r}, found {len(found)}"
    return "".join(_text(o) for o in found[0].outputs)


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    # the kernel inherits this process's environment: QUICK mode, the test session's EVOOPT_CACHE (experts,
    # converted SmolLM2, splits) and a private cache for the datasets that lm-eval builds from its JSONL task
    monkeypatch.setenv("EVOOPT_QUICKSTART_QUICK", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    stored = nbformat.read(NOTEBOOK, as_version=4)
    assert not [c for c in stored.cells if c.cell_type == "code" and (c.outputs or c.execution_count)], \
        "store the notebook without outputs (clear them before saving)"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECK))
    client = NotebookClient(notebook, km=_kernel_manager(tmp_path / "kernels"), timeout=900, startup_timeout=180,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    cells = [c for c in notebook.cells[:-1] if c.cell_type == "code"]
    outputs = [o for cell in cells for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    check_line = next(line for o in notebook.cells[-1].outputs for line in _text(o).splitlines()
                      if line.startswith("EVOOPT-CHECK "))
    facts = json.loads(check_line.removeprefix("EVOOPT-CHECK "))
    assert facts["prefix"] == sys.prefix, "the notebook ran in another Python than the test's"

    # 1. experts: one dev-accuracy row per expert, one column per domain
    experts_table = _shown(cells, "build_setting(setting")
    assert "vader-tweets" in experts_table and "vader-nyt" in experts_table

    # 2. the study: the sources baselines and the best trial, with dev and test values, shown as a table
    names = [row["name"] for row in facts["rows"]]
    assert any(name.startswith("source vader-tweets") for name in names), names
    assert any(name.startswith("best source") for name in names), names
    assert names[-1].startswith("best found (trial ")
    for row in facts["rows"]:
        assert 0.0 <= row["dev"] <= 1.0 and (row["test"] is None or 0.0 <= row["test"] <= 1.0), row
    assert facts["rows"][-1]["test"] is not None  # the best trial is scored on test, for reporting
    table = _shown(cells, "run_study(config)")
    assert "best found (trial" in table and "average of sources" in table and "test" in table

    # per-trial user attributes, and the table of them
    assert len(facts["trials"]) >= 2 and {state for state, _ in facts["trials"]} == {"COMPLETE"}
    for _, attrs in facts["trials"]:
        assert {"recipe", "scores", "merge_seconds", "eval_seconds"} <= set(attrs)
    trials_table = _shown(cells, '"merge s"')
    assert "merge s" in trials_table and "vader-nyt" in trials_table

    # 3. a plotly figure
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)

    # 4. the export: a Hugging Face folder with the best trial's recipe, reloaded and run
    assert {"config.json", "model.safetensors", "evoopt_recipe.yaml", "README.md"} <= set(facts["export"])
    exported = yaml.safe_load(facts["exported_recipe"])
    assert exported["method"] == "ties"
    assert [m["parameters"] for m in exported["models"]] == [m["parameters"] for m in facts["best_recipe"]["models"]]
    assert "evoopt_recipe.yaml" in _shown(cells, "export_trial(config")
    probabilities = facts["reloaded_probabilities"]  # the reloaded model classified two sentences
    assert len(probabilities) == 2 and all(len(p) == 2 and abs(sum(p) - 1) < 1e-4 for p in probabilities)

    # 5. lm-eval scored the merged SmolLM2 through the evoopt model on the local task
    accuracy = facts["lm_eval"]["evoopt_sms-spam_dev"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert facts["lm_eval_recipe"]["method"] == "linear"
    assert "evoopt_sms-spam_dev: accuracy" in _shown(cells, "simple_evaluate(")
