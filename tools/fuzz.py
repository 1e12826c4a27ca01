#!/usr/bin/env python3
"""Runs the fuzz targets for a fixed time each and reports executions, coverage and findings.

Targets: every cargo-fuzz target in core/fuzz (libFuzzer, built by `cargo fuzz` with
AddressSanitizer) and the atheris harness for the host's guest-frame parser
(tests/fuzz/fuzz_frames.py, target `frames`). `make fuzz` runs them all for FUZZ_SECONDS each;
tests/security/test_fuzz_smoke.py runs each for a few seconds.

    tools/fuzz.py [--seconds N] [--runs N] [--sanitizer address|none] [--json FILE] [TARGET ...]

Seeds (small, committed) are read from core/fuzz/seeds/TARGET and tests/fuzz/seeds/frames;
the corpus each run grows goes to core/fuzz/corpus/TARGET and findings to
core/fuzz/artifacts/TARGET/ (both git-ignored). A finding makes the exit status 1 and is
named in the summary: reproduce it with the same command and the artifact as the only input.
Builds go to $FUZZ_TARGET_DIR (default: ~/.cache/supermachine-kernel/fuzz-target; a
`--sanitizer none` build to the same path with a `-none` suffix). The cargo-fuzz targets are
built with AddressSanitizer by default; `--sanitizer none` keeps libFuzzer's coverage
instrumentation and Rust's checks (panics, overflow checks, debug assertions) but drops ASan,
which runs the targets whose inputs allocate much (tcp_channels, agent_control) 5-9x faster: for
long runs. The corpus is shared between the two builds.
cargo-fuzz comes from `make fuzz-tools` (cargo install, once per machine); the nightly
toolchain is used when rustup has it, else the default one with RUSTC_BOOTSTRAP=1 (cargo-fuzz
passes -Z flags).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "core" / "fuzz"
# The instrumented builds live outside the checkout, so a fresh clone on the same machine (as
# CI makes) rebuilds only the project's own crates, not every dependency.
TARGET_DIR = Path(os.environ.get("FUZZ_TARGET_DIR") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "supermachine-kernel" / "fuzz-target")
PY_TARGETS = {"frames": (ROOT / "tests" / "fuzz" / "fuzz_frames.py", ROOT / "tests" / "fuzz" / "seeds" / "frames",
                         ROOT / "tests" / "fuzz" / "frames.dict")}
# A single input taking longer than this is a finding (a hang), as a crash is.
INPUT_TIMEOUT_S = 20
# libFuzzer's progress lines: "#123 NEW cov: 45 ft: 67 corp: 8/90b ..." and the final stats.
PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)
# What libFuzzer writes for a finding (slow-unit-* is only a note).
FINDINGS = ("crash-", "leak-", "timeout-", "oom-")
FINAL_RUNS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")


class FuzzError(Exception):
    """The fuzz job cannot run here (a tool is missing or the build failed)."""


def rust_targets() -> list[str]:
    with open(FUZZ / "Cargo.toml", "rb") as f:
        return [b["name"] for b in tomllib.load(f).get("bin", [])]


SANITIZERS = ("address", "none")


def target_dir(sanitizer: str) -> Path:
    """Where the builds for a sanitizer go (the two builds must not overwrite each other)."""
    return TARGET_DIR if sanitizer == "address" else TARGET_DIR.with_name(f"{TARGET_DIR.name}-{sanitizer}")


def cargo_fuzz_command() -> tuple[list[str], dict[str, str]]:
    """`cargo [+nightly] fuzz` and the environment to run it in."""
    env = dict(os.environ)
    cargo_bin = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin"
    env["PATH"] = f"{cargo_bin}:{env.get('PATH', '')}"
    if shutil.which("cargo-fuzz", path=env["PATH"]) is None:
        raise FuzzError("cargo-fuzz is not installed: run `make fuzz-tools` (cargo install cargo-fuzz)")
    nightly = subprocess.run(["rustup", "run", "nightly", "rustc", "--version"], capture_output=True, env=env)
    if nightly.returncode == 0:
        return ["cargo", "+nightly", "fuzz"], env
    env["RUSTC_BOOTSTRAP"] = "1"
    return ["cargo", "fuzz"], env


def summarise(target: str, output: str, seconds: float, rc: int, artifacts: Path, since: float) -> dict:
    progress = PROGRESS.findall(output)
    final = FINAL_RUNS.findall(output)
    runs = int(final[-1]) if final else (int(progress[-1][0]) if progress else 0)
    cov, ft, corpus = (int(progress[-1][1]), int(progress[-1][2]), int(progress[-1][3])) if progress else (0, 0, 0)
    findings = sorted(str(p.relative_to(ROOT)) for p in artifacts.glob("*")
                      if p.name.startswith(FINDINGS) and p.stat().st_mtime >= since)
    return {"target": target, "runs": runs, "cov": cov, "ft": ft, "corpus": corpus, "seconds": round(seconds, 1),
            "exit": rc, "findings": findings, "ok": rc == 0 and not findings and runs > 0}


def libfuzzer_args(target: str, seconds: int, runs: int | None, dictionary: Path | None) -> list[str]:
    artifacts = FUZZ / "artifacts" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT_S}", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/"]
    if runs:
        args.append(f"-runs={runs}")
    if dictionary and dictionary.is_file():
        args.append(f"-dict={dictionary}")
    return args


def corpora(target: str, seeds: Path) -> list[str]:
    corpus = FUZZ / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    return [str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])


def run(target: str, seconds: int, runs: int | None, log: Path, sanitizer: str = "address") -> dict:
    if target in PY_TARGETS:
        harness, seeds, dictionary = PY_TARGETS[target]
        argv = [sys.executable, str(harness), *corpora(target, seeds), *libfuzzer_args(target, seconds, runs, dictionary)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
    else:
        cmd, env = cargo_fuzz_command()
        seeds = FUZZ / "seeds" / target
        argv = [*cmd, "run", "--sanitizer", sanitizer, "--target-dir", str(target_dir(sanitizer)), target,
                *corpora(target, seeds), "--",
                *libfuzzer_args(target, seconds, runs, None)]
    start, since = time.monotonic(), time.time() - 1
    with open(log, "w") as out:
        print("$ " + " ".join(argv), file=out, flush=True)
        rc = subprocess.run(argv, cwd=FUZZ if target not in PY_TARGETS else ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    return summarise(target, log.read_text(errors="replace"), time.monotonic() - start, rc, FUZZ / "artifacts" / target,
                     since)


def build(targets: list[str], sanitizer: str = "address") -> None:
    """Builds the cargo-fuzz targets first, so their time is not taken from the fuzzing time."""
    if not targets:
        return
    cmd, env = cargo_fuzz_command()
    # One build of all of them when all are asked for (they share every dependency).
    names = [] if set(targets) == set(rust_targets()) else targets
    for name in names or [None]:
        argv = [*cmd, "build", "--sanitizer", sanitizer, "--target-dir", str(target_dir(sanitizer)),
                *([name] if name else [])]
        done = subprocess.run(argv, cwd=FUZZ, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise FuzzError(f"`{' '.join(argv)}` failed:\n{done.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    all_targets = rust_targets() + list(PY_TARGETS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all of {', '.join(all_targets)}")
    p.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")),
                   help="fuzzing time per target (default: $FUZZ_SECONDS or 60)")
    p.add_argument("--runs", type=int, help="stop a target after this many executions")
    p.add_argument("--sanitizer", choices=SANITIZERS, default=os.environ.get("FUZZ_SANITIZER") or "address",
                   help="for the cargo-fuzz targets (default: $FUZZ_SANITIZER or address); the atheris "
                        "target is not affected")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    unknown = [t for t in a.targets if t not in all_targets]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; targets: {', '.join(all_targets)}")
    targets = a.targets or all_targets
    logs = FUZZ / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        build([t for t in targets if t not in PY_TARGETS], a.sanitizer)
    except FuzzError as e:
        print(f"fuzz: {e}", file=sys.stderr)
        return 2
    results = []
    for target in targets:
        try:
            r = run(target, a.seconds, a.runs, logs / f"{target}.log", a.sanitizer)
        except FuzzError as e:
            print(f"fuzz: {e}", file=sys.stderr)
            return 2
        results.append(r)
        status = "ok" if r["ok"] else f"FAILED (exit {r['exit']}; log core/fuzz/logs/{target}.log)"
        print(f"{target:16} {r['runs']:>12,} runs  cov {r['cov']:>5}  ft {r['ft']:>6}  corpus {r['corpus']:>5}  "
              f"{r['seconds']:>6} s  {status}", flush=True)
        for finding in r["findings"]:
            print(f"{'':16} finding: {finding}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
