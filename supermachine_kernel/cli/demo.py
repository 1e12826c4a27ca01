"""Runs notebooks/demo.ipynb headlessly on the "Python (microVM)" kernel (`make demo`).

Writes the executed notebook next to the source as `<name>.executed.ipynb` (or --output) and
prints where it is, plus a one-line summary of each cell's outputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient.exceptions import CellExecutionError

from . import tour
from .notebook_runner import NotebookRunner

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run(notebook: Path, output: Path, kernel_name: str, timeout: int) -> int:
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookRunner(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=False,
                            startup_timeout=600, resources={"metadata": {"path": str(notebook.parent)}})
    t0 = time.monotonic()
    status = 0
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"demo: a cell failed:\n{e}", file=sys.stderr)
        status = 1
    elapsed = time.monotonic() - t0
    nbformat.write(nb, output)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        kinds = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                kinds.append(out.name)
            elif out.output_type in ("display_data", "execute_result"):
                kinds.append(out.output_type + "[" + ",".join(sorted(out.data)) + "]")
            else:
                kinds.append(out.output_type)
        print(f"  cell {i + 1:2d}: {', '.join(kinds) or '(no output)'}")
    print(f"demo: executed {notebook.name} on kernel {kernel_name!r} in {elapsed:.1f} s")
    print(f"demo: executed notebook written to {output}")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m supermachine_kernel.cli.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", nargs="?", type=Path, default=NOTEBOOKS / "demo.ipynb")
    ap.add_argument("--output", type=Path, help="where to write the executed notebook")
    ap.add_argument("--kernel", default="python-microvm", help="kernelspec name (default %(default)s)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--no-tour", action="store_true", help="skip the runtime tour before the notebook")
    args = ap.parse_args(argv)
    if not args.no_tour:
        tour.run()
        print()
    output = args.output or args.notebook.with_suffix(".executed.ipynb")
    return run(args.notebook, output, args.kernel, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
