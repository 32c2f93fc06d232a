"""CPU inference on the AMX kernel path (Sapphire Rapids and later Xeons).

llama.cpp's CPU backend repacks quantized dense weights into an "AMX" buffer when the CPU
has AMX, and multiplies prompt batches (more than one row) with AMX tiles. At the vendored
commit that path segfaulted in `ggml_backend_amx_mul_mat` on every prompt: GCC 12/13's
`_tile_loadconfig` declares only 8 of the 64 config bytes as read, the optimizer dropped the
stores to the rest, and `ldtilecfg` faulted on stack garbage. The patch loads the config with
an asm operand covering all 64 bytes (docs/backend-patch.md).

These tests run where the path is taken and skip, saying why, everywhere else. Each model
runs in a subprocess, so a returning fault fails the test instead of killing pytest.
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

from hybrid_gguf import synth

AMX_FLAGS = ("amx_tile", "amx_int8")


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()

pytestmark = pytest.mark.skipif(
    not all(f in cpu_flags() for f in AMX_FLAGS),
    reason="this CPU has no AMX (amx_tile, amx_int8): llama.cpp's AMX kernels are not used here",
)

# Loads the model twice (AMX extra buffer on, then off), evaluates one prompt batch and one
# decode step each time, and prints the last-token logits of both steps as JSON.
_PROBE = textwrap.dedent("""
    import llama_cpp  # before numpy: the other order crashed model loads on one Python 3.12
    import json, sys
    import numpy as np
    from hybrid_gguf.llama.hooks import construct_llama
    from hybrid_gguf.llama.log import capture_llama_log

    path = sys.argv[1]
    out = {}
    for extra in (True, False):
        def patch(params, extra=extra):
            params.use_extra_bufts = extra
        with capture_llama_log(forward=False) as cap:
            llm = construct_llama(path, model_patch=patch, n_ctx=256, n_threads=2, verbose=False)
        amx = any("AMX model buffer size" in line for line in cap.lines)
        prompt = list(range(3, 51))   # 48 byte tokens: a batch of 48 rows
        llm.eval(prompt)
        vocab = llm.n_vocab()
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        first = np.ctypeslib.as_array(ptr, shape=(vocab,)).copy()
        llm.eval([int(first.argmax())])
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        second = np.ctypeslib.as_array(ptr, shape=(vocab,)).copy()
        out["amx" if extra else "plain"] = {"amx_buffer": amx, "prompt": first.tolist(),
                                            "decode": second.tolist()}
        llm.close()
    print(json.dumps(out))
""")


def _spec(weight_type: str) -> synth.SynthSpec:
    # dims that the AMX kernels accept: rows a multiple of 32, K a multiple of 256 (Q4_K)
    return synth.SynthSpec(n_layer=2, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_expert=8,
                           n_expert_used=2, n_ff_exp=256, weight_type=weight_type, seed=3)


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_K"])
def test_amx_prompt_and_decode_match_plain_cpu(weight_type, synth_cache):
    path = synth.ensure_synthetic(_spec(weight_type), synth_cache)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: a signal)\n{proc.stderr[-3000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["amx"]["amx_buffer"], "llama.cpp put no weights in its AMX buffer: the AMX path went untested"
    assert not res["plain"]["amx_buffer"]
    for step in ("prompt", "decode"):
        amx, plain = np.array(res["amx"][step]), np.array(res["plain"][step])
        assert np.isfinite(amx).all()
        assert int(amx.argmax()) == int(plain.argmax()), step
        # both paths quantize activations to 8 bits; they differ only in summation order
        scale = float(np.abs(plain).max())
        assert float(np.abs(amx - plain).max()) <= 2e-2 * scale, step
