"""The patch's scheduler timers (LLAMA_HYBRID_SCHED_TIMERS) and their per-op breakdown of CPU
splits (LLAMA_HYBRID_SCHED_OPS): the report line names the ops, and computing node by node
changes nothing the model outputs. Each run is a subprocess, since ggml reads the variables
once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_gguf.llama import hybrid as hybrid_backend

pytest.importorskip("llama_cpp")

MODEL = Path(__file__).resolve().parents[1] / "hybrid_gguf" / "data" / "tiny-moe-stdlib.gguf"

SCRIPT = r"""
import json, sys
import llama_cpp
from hybrid_gguf.llama.ggml_lib import sched_timers_window
from hybrid_gguf.llama.loader import load_llama
from hybrid_gguf.planning.placement import cpu_moe

llm = load_llama(sys.argv[1], cpu_moe(), n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False).llm
llm.eval(llm.tokenize(b"def main(argv):"))
sched_timers_window("start")
tokens = []
for _ in range(6):
    tok = int(llm.sample(temp=0.0))
    tokens.append(tok)
    llm.eval([tok])
sched_timers_window("report")
print(json.dumps(tokens))
"""


def run(env_extra: dict) -> tuple[list, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_HYBRID_SCHED")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(MODEL)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.skipif(hybrid_backend.capability().version < 7, reason="needs hybrid patch version 7 (per-op timers)")
def test_sched_timers_break_cpu_splits_down_by_op():
    plain, plain_err = run({})
    timed, timed_err = run({"LLAMA_HYBRID_SCHED_TIMERS": "1000", "LLAMA_HYBRID_SCHED_OPS": "1"})
    assert "hybrid-sched:" not in plain_err
    lines = [ln for ln in timed_err.splitlines() if ln.startswith("hybrid-sched:")]
    assert len(lines) == 1, timed_err[-2000:]
    assert "MUL_MAT_ID" in lines[0] and " nodes " in lines[0], lines[0]
    assert timed == plain
