"""Issue 16 item 6: a short smoke run of every fuzz target (the long runs are `make fuzz`).

Runs tools/fuzz.py once for all targets (the cargo-fuzz targets in core/fuzz and the atheris
harness of the guest-frame parser, tests/fuzz/fuzz_frames.py) for SMOKE_SECONDS each, then
checks each target: it ran, executed inputs, reached coverage and found nothing. A finding
fails its target's test and names the input libFuzzer kept (core/fuzz/artifacts/TARGET/).
cargo-fuzz comes from `make fuzz-tools`, which `make test` runs first.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SECONDS = 8

_spec = importlib.util.spec_from_file_location("fuzz_runner", ROOT / "tools" / "fuzz.py")
assert _spec and _spec.loader
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
TARGETS = runner.rust_targets() + list(runner.PY_TARGETS)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fuzz") / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--seconds", str(SMOKE_SECONDS), "--json", str(out)],
        capture_output=True, text=True, timeout=1500,
    )
    if not out.exists():
        pytest.fail(f"tools/fuzz.py did not run the targets (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {r["target"]: r for r in json.loads(out.read_text())}


# The first test also waits for the build (minutes on a machine that never built the targets).
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(smoke: dict[str, dict], target: str) -> None:
    r = smoke[target]
    assert not r["findings"], f"{target} found inputs that break it: {r['findings']} (log core/fuzz/logs/{target}.log)"
    assert r["exit"] == 0, f"{target} exited {r['exit']}: see core/fuzz/logs/{target}.log"
    assert r["runs"] > 100, r
    assert r["cov"] > 0, r
