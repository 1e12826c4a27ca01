"""Benchmark: the "Python (microVM)" kernel of two source trees (old and new commit), same run.

Figures, old and new side by side with the ratio new / old: launch -> kernel_info reply, launch ->
`import numpy, pandas, matplotlib` done, `1+1` round trip p50 (and p95), restart -> ready and
restart -> imports done (graceful restarts, as JupyterLab's restart button). The three figures
a refactor must not slow down (launch -> kernel_info, `1+1` p50, restart -> ready) get a verdict:
"ok" when new is at most 5% slower than old. Beside each ratio of medians: the middle half
(p25..p75) of the ratios of the paired samples (old and new measured back to back), which shows
how much of the difference is the machine's noise.

The measurement is bench/kernel.py's (its launch() and measure_round(): each round launches
both kernels one after the other, then runs the `1+1` cells and the restarts interleaved, one
kernel then the other); the order of the two kernels alternates from round to round. Before the
rounds, each kernel is launched once unmeasured, so that the measured launches of both start
from their own launch hint and with warm file caches. (A script of its own rather than an option
of bench/kernel.py: the figures, the two trees and the verdicts differ from its microVM vs
ipykernel table, and only the new tree has it.)

Each tree runs with its own virtualenv: the kernelspec is the tree's
kernelspecs/python-microvm/kernel.json with argv[0] set to `<tree>/.venv/bin/python`
(`... -m supermachine_kernel.kernel -f {connection_file}`), given to jupyter_client directly:
nothing is installed. The two kernels read different launch hints, because a hint's key covers
the Python running the kernel (sys.executable, see supermachine_kernel's launch hint module).
Both share ~/.cache/supermachine-kernel: images and snapshots are keyed by content.

Preparing the old tree (here the commit before issue 11, 0dcb5eb), once; niced, it takes ~10 min
on 2 shared cores. Its own cargo target dir keeps core/target of the main tree untouched:

    git -C /work/main worktree add /tmp/sk-old 0dcb5eb
    cd /tmp/sk-old && export CARGO_TARGET_DIR=/tmp/sk-old-target
    nice -n 10 python3 -m venv .venv
    nice -n 10 .venv/bin/python -m pip install -q --upgrade "pip>=23" "maturin>=1.5,<2"
    (cd core && RUSTFLAGS="-C target-feature=+crt-static" nice -n 10 cargo build -q --release \\
        -p supermachine-agent --target x86_64-unknown-linux-gnu)
    cp $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/supermachine-agent \\
        supermachine_kernel/guest/supermachine-agent
    VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH nice -n 10 .venv/bin/maturin develop -q \\
        --release --extras test
    # `prepare` starts the installed kernelspec: install the old tree's into its own venv
    .venv/bin/python -m supermachine_kernel install --sys-prefix
    nice -n 10 .venv/bin/supermachine-kernel prepare   # the old tree's warm snapshot, if missing

The script warns when a package both virtualenvs hold differs in version (pip resolves the
old tree's dependencies afresh); then align them, e.g. `.venv/bin/python -m pip install
pyzmq==<new version>` in the old tree.

Run (from the new tree; --old/--new default to /tmp/sk-old and this file's tree):

    .venv/bin/python bench/compare_commits.py [--rounds 3] [--restarts 4] [--old DIR] [--new DIR]

Remove the old tree afterwards with `git -C /work/main worktree remove --force /tmp/sk-old`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import percentile, print_table  # noqa: E402
from kernel import FIGURES, IMPORTS, RESTARTS, launch, measure_round, summarize  # noqa: E402

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402

SPEC_PATH = Path("kernelspecs", "python-microvm", "kernel.json")
LIMIT = 1.05  # new / old, for the verdicts


class GivenSpecs(KernelSpecManager):
    """Kernelspecs given in code by name; nothing installed is searched."""

    def __init__(self, specs: dict[str, KernelSpec]) -> None:
        super().__init__()
        self.given = specs

    def find_kernel_specs(self) -> dict[str, str]:
        return {name: spec.resource_dir for name, spec in self.given.items()}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.given[kernel_name]


def tree_spec(tree: Path) -> KernelSpec:
    """The tree's kernelspec, started by the tree's own virtualenv."""
    python = tree / ".venv" / "bin" / "python"
    if not os.access(python, os.X_OK):
        sys.exit(f"{python} is missing: prepare {tree} as this script's docstring says")
    spec = json.loads((tree / SPEC_PATH).read_text())
    spec["argv"][0] = str(python)
    return KernelSpec(resource_dir=str((tree / SPEC_PATH).parent), **spec)


def describe(tree: Path, spec: KernelSpec) -> str:
    """`<commit>[+changes]`, and the kernel module that tree's Python imports (or why not)."""
    git = ["git", "-C", str(tree)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                           check=False, capture_output=True, text=True).stdout.strip()
    module = spec.argv[spec.argv.index("-m") + 1]
    found = subprocess.run(
        [spec.argv[0], "-c", f"import importlib.util as u; print(u.find_spec({module!r}).origin)"],
        check=False, capture_output=True, text=True)
    if found.returncode:
        sys.exit(f"{tree}: {spec.argv[0]} cannot find {module}:\n{found.stderr.strip()[-800:]}\n"
                 "(a tree in the middle of a change? try again later or use a worktree)")
    origin = found.stdout.strip()
    if not Path(origin).is_relative_to(tree):
        sys.exit(f"{spec.argv[0]} imports {module} from {origin}, not from {tree}: "
                 f"run `maturin develop` in {tree} as this script's docstring says")
    return f"{commit}{'+changes' if dirty else ''}, {origin}"


def versions(python: str) -> dict[str, str]:
    """The distributions installed for `python`: name -> version."""
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def paired(old: list[float], new: list[float]) -> str:
    """The p25..p75 of new/old over the samples taken back to back."""
    ratios = [n / o for o, n in zip(old, new) if o > 0]
    if not ratios:
        return "n/a"
    return f"{percentile(ratios, 25):.2f}..{percentile(ratios, 75):.2f}"


def compare(trees: dict[str, Path], rounds: int, restarts: int) -> None:
    specs = {name: tree_spec(tree) for name, tree in trees.items()}
    if specs["old"].argv[0] == specs["new"].argv[0]:
        sys.exit("--old and --new are the same tree: they would share their launch hints")
    for name, tree in trees.items():
        print(f"{name}: {tree} at {describe(tree, specs[name])}")
    theirs, ours = versions(specs["old"].argv[0]), versions(specs["new"].argv[0])
    for dist in sorted(set(theirs) & set(ours) - {"supermachine-kernel"}):
        if theirs[dist] != ours[dist]:
            print(f"warning: {dist} is {theirs[dist]} in old, {ours[dist]} in new")
    manager = GivenSpecs(specs)
    start = time.monotonic()
    for name in specs:  # unmeasured: each kernel leaves its launch hint, the caches are warm
        km, kc = launch(name, {k: [] for k in FIGURES}, [], manager)
        kc.stop_channels()
        km.shutdown_kernel()
    print(f"warm-up launches done after {time.monotonic() - start:.0f} s", flush=True)
    out = {name: {k: [] for k in FIGURES} for name in specs}
    for r in range(rounds):
        names = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        measure_round(names, 0, out, {}, prints=0, specs=manager, restarts=(False,) * restarts)
        print(f"round {r + 1}/{rounds} done after {time.monotonic() - start:.0f} s", flush=True)
    old, new = summarize(out["old"]), summarize(out["new"])
    figures = [  # (label, summary key, samples key, verdict?)
        ("launch -> kernel_info reply", "info", "info", True),
        (f"launch -> `{IMPORTS}` done", "imports", "imports", False),
        ("`1+1` round trip p50", "rt_p50", "rt", True),
        ("`1+1` round trip p95", "rt_p95", "rt", False),
        ("restart -> ready", "restart", "restart", True),
        ("restart -> imports done", "restart_imports", "restart_imports", False),
    ]
    print_table("kernel: Python (microVM), new tree vs old tree",
                [(label, new[key], old[key], "ms") for label, key, _, _ in figures], "new", "old")
    print(f"\nverdicts (new <= {LIMIT:.2f}x old); paired ratios p25..p75 beside each:")
    for label, key, samples, verdict in figures:
        ratio = new[key] / old[key]
        mark = ("ok" if ratio <= LIMIT else f"SLOWER by {(ratio - 1) * 100:.0f}%") if verdict else "-"
        spread = paired(out["old"][samples], out["new"][samples]) if key != "rt_p95" else ""
        print(f"  {label:<50} {ratio:5.2f}x  {spread:<11} {mark}")
    print(f"samples per kernel: {len(out['old']['info'])} launches, {len(out['old']['rt'])} `1+1`, "
          f"{len(out['old']['restart'])} restarts; {time.monotonic() - start:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=RESTARTS, help="graceful restarts per round and kernel")
    ap.add_argument("--old", type=Path, default=Path("/tmp/sk-old"), help="the old source tree (with .venv)")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the new source tree (with .venv)")
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    # The kernels start in this process's directory, and `python -m` puts that first on sys.path:
    # from inside a tree, both kernels would import that tree's package.
    with tempfile.TemporaryDirectory(prefix="sk-compare-") as workdir:
        os.chdir(workdir)
        compare(trees, args.rounds, args.restarts)

if __name__ == "__main__":
    main()
