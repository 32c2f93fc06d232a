"""Fuzz: a few hundred malformed GGUFs made from the tiny model, seeded and bounded.

Every mutant goes through `inspect` in-process: it either succeeds or is refused with
one HybridError line, never another exception.  A sample (mostly mutants that pass
the header checks, so llama.cpp itself reads them) goes through `run` as a
subprocess: exit 0 or 2, no signal, no traceback, no hang, one error line.
A failure names the mutant's index and what was changed; `gguf_mutants.mutate` with
the same seed rebuilds it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybrid_gguf.cli import app
from hybrid_gguf.errors import HybridError

from gguf_mutants import GGUFModel, header_length, mutate

REPO = Path(__file__).resolve().parents[1]
SEED = 13
N_MUTANTS = 300
N_RUN_ACCEPTED = 12  # mutants inspect accepts: llama.cpp reads them
N_RUN_REFUSED = 4


@pytest.fixture(scope="module")
def fuzz(tiny_model, tmp_path_factory):
    """[(index, description, path or None, outcome)] for every mutant; outcome is
    "ok", "refused: <message>" or "CRASH: <exception>".  Only the files sampled for
    `run` are kept (the others are deleted after inspect: 300 x 3.8 MB otherwise)."""
    raw = tiny_model.read_bytes()
    base = GGUFModel.parse(raw)
    assert base.to_bytes() == raw
    hl = header_length(raw)
    rng = random.Random(SEED)
    folder = tmp_path_factory.mktemp("mutants")
    runner = CliRunner()
    results = []
    for i in range(N_MUTANTS):
        data, desc = mutate(base, raw, hl, rng)
        path = folder / f"m{i:03d}.gguf"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = runner.invoke(app, ["inspect", str(path)])
        exc = res.exception
        if exc is None and res.exit_code == 0:
            outcome = "ok"
        elif isinstance(exc, HybridError):
            outcome = f"refused: {exc}"
        else:
            outcome = f"CRASH: {type(exc).__name__}: {exc} (exit {res.exit_code})"
        results.append([i, desc, path, outcome])
    accepted = [r for r in results if r[3] == "ok"]
    refused = [r for r in results if r[3].startswith("refused")]
    keep = _spread(accepted, N_RUN_ACCEPTED) + _spread(refused, N_RUN_REFUSED)
    for r in results:
        if r not in keep:
            r[2].unlink()
            r[2] = None
    return results


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(k * step)] for k in range(n)]


def test_inspect_accepts_or_refuses_in_one_line(fuzz):
    crashes = [f"#{i} ({desc}): {outcome}" for i, desc, _, outcome in fuzz if outcome.startswith("CRASH")]
    assert not crashes, "\n".join(crashes)
    for i, desc, _, outcome in fuzz:
        assert "\n" not in outcome, f"#{i} ({desc}): {outcome}"
    refused = sum(1 for r in fuzz if r[3].startswith("refused"))
    # the mutants really are malformed, and some still pass (so `run` has work to do)
    assert refused > N_MUTANTS // 2 and N_MUTANTS - refused >= N_RUN_ACCEPTED


@pytest.mark.slow
def test_run_sample_exits_cleanly(fuzz, tmp_path):
    pytest.importorskip("llama_cpp")
    sample = [r for r in fuzz if r[2] is not None]
    assert len(sample) == N_RUN_ACCEPTED + N_RUN_REFUSED
    env = dict(os.environ, PYTHONPATH=str(REPO), HYBRID_GGUF_HOME=str(tmp_path))
    problems = []
    for i, desc, path, outcome in sample:
        cmd = [sys.executable, "-m", "hybrid_gguf.cli", "run", str(path), "-p", "hi", "-n", "2",
               "--no-record", "--threads", "1"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        except subprocess.TimeoutExpired:
            problems.append(f"#{i} ({desc}): hung")
            continue
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        where = f"#{i} ({desc}; inspect: {outcome[:80]})"
        if res.returncode not in (0, 2):
            problems.append(f"{where}: exit {res.returncode}: {res.stderr[-400:]}")
        elif "Traceback" in res.stderr:
            problems.append(f"{where}: traceback: {res.stderr[-400:]}")
        elif res.returncode == 2 and len(errors) != 1:
            problems.append(f"{where}: {len(errors)} error lines: {res.stderr[-400:]}")
        elif outcome.startswith("refused") and res.returncode != 2:
            problems.append(f"{where}: inspect refused it but run exited {res.returncode}")
    assert not problems, "\n".join(problems)
