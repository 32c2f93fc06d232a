"""The patch's one-token expert paths on the CPU (version 9) compute exactly what the stock
ops compute.

Decode steps, and every CPU hand-off of a split layer, multiply one token by a few experts.
The patch gives each thread one contiguous share of the (selected expert, weight row) pairs
and prefetches ahead, instead of a chunk of every expert (version 9, on by default); with
LLAMA_HYBRID_MMID_DYNAMIC=1 the threads claim the pairs in chunks instead, optionally after
equal shares of the first LLAMA_HYBRID_MMID_STATIC_PCT % (version 23); with
LLAMA_HYBRID_MOE_FUSE=1 it also runs up, gate, swiglu and down as one pass with three
barriers. Each row's dot product, swiglu and quantization are the same calls on the same
data, so the logits must be bitwise equal. Each setting runs in its own process (the switches
are read once per process), unsplit and split (skipped slots, id -1, in the cold chain), on
three archs and two weight types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.synth import preset, write_synthetic_moe

pytest.importorskip("llama_cpp")
if hybrid_backend.capability().version < 9:
    pytest.skip("the one-token MUL_MAT_ID path is in hybrid patch version 9 and later", allow_module_level=True)

ARCHS = {
    "qwen3moe": dict(name="tiny", n_layer=3, n_expert=8, n_expert_used=2),
    "gpt-oss": dict(name="tiny-gpt-oss", n_layer=2, n_expert=8, n_expert_used=4),
    "llama": dict(name="tiny-mixtral", n_layer=3, n_expert=8, n_expert_used=2),
    "qwen3moe-q8": dict(name="tiny", n_layer=3, n_expert=8, n_expert_used=2, weight_type="Q8_0"),
}

# Greedy decode of one model, unsplit, with half of each layer's experts in a CPU pack, and the
# same split answered by the CPU worker; prints every step's logits and how often each path ran.
_RUN = textwrap.dedent("""
    import llama_cpp  # before numpy, as everywhere in the tests
    import json, sys
    import numpy as np
    from hybrid_gguf.llama import ggml_lib
    from hybrid_gguf.llama.loader import load_llama

    path, n_expert, n_layer, n_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prompt = [1] + [3 + b for b in b"def main(argv):\\n    return"]
    out = {}
    half = {l: list(range(0, n_expert, 2)) for l in range(n_layer)}
    # "worker": the split's cold chains computed by the CPU worker, as graphs of their own
    for name, hot, worker in (("unsplit", None, False), ("split", half, False), ("worker", half, True)):
        llm = load_llama(path, None, hot=hot, pack_device="CPU", n_ctx=128, n_batch=64, seed=1,
                         verbose=False, n_gpu_layers=0, n_threads=n_threads, worker=worker).llm
        llm.eval(prompt)
        steps, tokens = [], []
        for _ in range(8):
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
            steps.append(logits.tolist())
            tokens.append(int(logits.argmax()))
            llm.eval([tokens[-1]])
        llm.close()
        out[name] = {"logits": steps, "tokens": tokens}
    out["flat_calls"] = ggml_lib.mmid_flat_calls()
    out["dynamic_calls"] = ggml_lib.mmid_dynamic_calls()
    out["fused_calls"] = ggml_lib.moe_fused_calls()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmid-flat")
    made = {}
    for arch, kw in ARCHS.items():
        kw = dict(kw)
        spec = preset(kw.pop("name"), zipf=0.8, seed=11, **kw)
        made[arch] = (write_synthetic_moe(root / f"{arch}.gguf", spec), spec)
    return made


# version 23's claimed chunks: alone at their default size, and after equal shares of half the
# pairs in 1 KiB chunks (a few rows each: many claims, ranges that cross from one expert to the
# next, prefetches from a share into a chunk)
CHUNKS = {"LLAMA_HYBRID_MMID_DYNAMIC": "1"}
MIXED = {"LLAMA_HYBRID_MMID_DYNAMIC": "1", "LLAMA_HYBRID_MMID_STATIC_PCT": "50", "LLAMA_HYBRID_MMID_CHUNK_KIB": "1"}


def _run(path, spec, flat: str, fuse: str = "0", threads: int = 2, extra: dict | None = None) -> dict:
    env = dict(os.environ, LLAMA_HYBRID_MMID_FLAT=flat, LLAMA_HYBRID_MOE_FUSE=fuse)
    for name in ("GGML_CPU_TILED_MM_FORCE", "GGML_CPU_DISABLE_FUSION", "LLAMA_HYBRID_MMID_DYNAMIC",
                 "LLAMA_HYBRID_MMID_STATIC_PCT", "LLAMA_HYBRID_MMID_CHUNK_KIB"):
        env.pop(name, None)
    env.update(extra or {})
    proc = subprocess.run([sys.executable, "-c", _RUN, str(path), str(spec.n_expert), str(spec.n_layer), str(threads)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same(arch, got, stock, what):
    for name in ("unsplit", "split", "worker"):
        assert got[name]["tokens"] == stock[name]["tokens"], f"{arch} {name}: greedy tokens differ {what}"
        a, b = np.array(got[name]["logits"]), np.array(stock[name]["logits"])
        assert np.array_equal(a, b), f"{arch} {name}: logits differ by up to {float(np.max(np.abs(a - b))):.3g} {what}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_token_expert_paths_match_the_stock_ops(models, arch):
    path, spec = models[arch]
    stock = _run(path, spec, "0")
    flat = _run(path, spec, "1")
    chunks = _run(path, spec, "1", extra=CHUNKS)
    mixed = _run(path, spec, "1", extra=MIXED)
    fused = _run(path, spec, "1", fuse="1")
    assert stock["flat_calls"] == 0 and stock["fused_calls"] == 0, "the switches left a path on"
    assert stock["dynamic_calls"] == 0 and flat["dynamic_calls"] == 0, "the claimed chunks ran without being asked for"
    # every layer's MUL_MAT_IDs of every decode step, in the unsplit and split loads
    assert flat["flat_calls"] >= 2 * 8 * spec.n_layer * 2, f"the one-token path ran only {flat['flat_calls']} times"
    for run in (chunks, mixed):
        assert run["flat_calls"] == flat["flat_calls"]
        assert run["dynamic_calls"] == run["flat_calls"], "a one-token MUL_MAT_ID missed the claimed chunks"
    assert flat["fused_calls"] == 0
    _same(arch, flat, stock, "with the contiguous shares")
    _same(arch, chunks, stock, "with the claimed chunks")
    _same(arch, mixed, stock, "with shares of half the pairs, then 1 KiB chunks")
    if arch == "gpt-oss":
        # its experts have biases and swiglu_oai: not the fused pattern, the stock nodes run
        assert fused["fused_calls"] == 0
    else:
        # every decode step's chain, unsplit (n_layer) and split (its cold chains at least)
        # and the worker's cold graphs (where the graph allocator reuses up/gate for down)
        assert fused["fused_calls"] >= 8 * spec.n_layer * 2, f"the fused chain ran only {fused['fused_calls']} times"
    _same(arch, fused, stock, "with the fused chain")


@pytest.mark.parametrize("arch,threads", [("qwen3moe", 3), ("llama", 7)])
def test_the_shares_hold_for_thread_counts_that_do_not_divide_the_rows(models, arch, threads):
    """CI's two cores run two threads by default; the shares' boundaries fall inside an expert
    and inside a row range only with other counts (a row's dot product does not depend on the
    thread count, so the stock path at two threads is the reference)."""
    path, spec = models[arch]
    stock = _run(path, spec, "0")
    flat = _run(path, spec, "1", threads=threads)
    chunks = _run(path, spec, "1", threads=threads, extra=CHUNKS)
    mixed = _run(path, spec, "1", threads=threads, extra=MIXED)
    fused = _run(path, spec, "1", fuse="1", threads=threads)
    assert flat["flat_calls"] > 0 and fused["fused_calls"] > 0
    assert chunks["dynamic_calls"] > 0 and mixed["dynamic_calls"] > 0
    _same(arch, flat, stock, f"with the contiguous shares on {threads} threads")
    _same(arch, chunks, stock, f"with the claimed chunks on {threads} threads")
    _same(arch, mixed, stock, f"with shares of half the pairs, then 1 KiB chunks, on {threads} threads")
    _same(arch, fused, stock, f"with the fused chain on {threads} threads")


def test_the_split_suite_passes_with_the_fused_chain():
    """tests/test_hybrid_split.py again, in a process with LLAMA_HYBRID_MOE_FUSE=1 and two threads. In its CPU
    worker's cold graphs the graph allocator puts down's output over up and gate: zeros the
    fused chain wrote to down's skipped rows before computing gate and up were overwritten
    (tokens differed on qwen3moe/half)."""
    repo = Path(__file__).resolve().parent.parent
    # on two threads: the suite's loads otherwise take llama-cpp-python's default, one thread on
    # a two-core CI machine, where the shares and the fused chain have nothing to split
    env = dict(os.environ, LLAMA_HYBRID_MOE_FUSE="1", HYBRID_GGUF_TEST_THREADS="2")
    # llama_cpp before pytest: pytest's plugins may import numpy first, and on the GPU machine a
    # model load then segfaulted (docs/backend-patch.md, "Import order"; ninth lease, exit -11)
    run_suite = ("import llama_cpp, sys, pytest; sys.exit(pytest.main(['-v', '-x', '-p', 'no:cacheprovider', "
                 f"{str(repo / 'tests' / 'test_hybrid_split.py')!r}]))")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", run_suite],
                          capture_output=True, text=True, env=env, timeout=600, cwd=repo)
    if proc.returncode != 0:
        # pytest.fail keeps the whole text (an assert's message is cut): the last test started
        # and, after a crash, the faulthandler's stack
        pytest.fail(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
