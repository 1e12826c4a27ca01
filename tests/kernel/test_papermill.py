"""papermill (plain nbclient underneath, no NotebookRunner) runs every notebook in notebooks/."""
from __future__ import annotations

import nbformat
import pytest

from .harness import BACKEND, KERNEL, SLOW, START_TIMEOUT
from .test_notebooks import NOTEBOOKS, needs_vm

papermill = pytest.importorskip("papermill")

# Generous for TCG under load. A cell whose execute_reply nbclient misses (jupyter/nbclient#312,
# plain ipykernel too; README "Headless runs") still ends, after this long.
CELL_TIMEOUT = int(60 * SLOW / 8) if BACKEND == "vm" else 60


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_papermill_runs_notebook(path, tmp_path):
    source = nbformat.read(path, as_version=4)
    if BACKEND != "vm" and needs_vm(source):
        pytest.skip("this notebook needs the vm backend")
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), kernel_name=KERNEL, cwd=str(path.parent),
                               execution_timeout=CELL_TIMEOUT, start_timeout=START_TIMEOUT,
                               progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == len([c for c in source.cells if c.cell_type == "code"])
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    assert [c.metadata.papermill.status for c in code] == ["completed"] * len(code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert not nb.metadata.papermill.get("exception")
    if path.name == "demo.ipynb":  # the slider's observer printed into the Output widget
        state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
        outputs = [o for m in state.values() if m["model_name"] == "OutputModel"
                   for o in m["state"].get("outputs", [])]
        assert any("n squared = 49" in o.get("text", "") for o in outputs), outputs
