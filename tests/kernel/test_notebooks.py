"""Every notebook in notebooks/ executes on the kernel with nbclient."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from supermachine_kernel.cli.notebook_runner import NotebookRunner

from .harness import BACKEND, KERNEL, SLOW, START_TIMEOUT

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
NOTEBOOKS = [p for p in NOTEBOOKS if not p.name.endswith(".executed.ipynb")]


VM_MAGICS = ("%snapshot", "%restore", "%snapshots", "%pool", "%vm")


def needs_vm(nb) -> bool:
    """Notebook metadata `supermachine.backend == "vm"`, or a cell using the VM magics."""
    if nb.metadata.get("supermachine", {}).get("backend") == "vm":
        return True
    return any(line.lstrip().startswith(VM_MAGICS)
               for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    if BACKEND != "vm" and needs_vm(nb):
        pytest.skip("this notebook needs the vm backend")
    NotebookRunner(nb, kernel_name=KERNEL, timeout=int(120 * SLOW),
                   startup_timeout=START_TIMEOUT).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "demo.ipynb":
        mimes = {m for o in outputs if "data" in o for m in o.data}
        assert {"image/png", "text/html", "text/markdown",
                "application/vnd.jupyter.widget-view+json"} <= mimes
        assert "widgets" in nb.metadata  # widget state was saved from the guest's comms


def test_demo_script(tmp_path, capsys):
    from supermachine_kernel.cli.demo import main

    out = tmp_path / "demo.executed.ipynb"
    assert main(["--kernel", KERNEL, "--output", str(out), "--no-tour"]) == 0
    assert out.exists()
    assert str(out) in capsys.readouterr().out
