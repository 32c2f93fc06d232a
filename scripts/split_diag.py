#!/usr/bin/env python3
"""Localize a per-expert split mismatch: which chain (hot or cold) of which layer is off.

Loads a small F32 synthetic qwen3moe twice (unsplit with experts on the CPU, and split with
the given hot set), runs the same prompt, and captures per MoE layer the FFN input, routing
ids/weights and the chain outputs through a Python graph callback. A numpy reference of each
routed expert (weights read from the GGUF) then says how far each chain is from what it
should compute. Slow (Python callback); for diagnosis only.

  python scripts/split_diag.py --pack-device CUDA0 --hot "0:7"            # on the GPU machine
  python scripts/split_diag.py --pack-device CPU --hot "0:7;1:1,2"        # anywhere
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import llama_cpp  # load libllama before numpy (docs/backend-patch.md, "Import order")

import numpy as np
from gguf import GGUFReader

from hybrid_gguf.llama import ggml_lib
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.llama.loader import load_llama
from hybrid_gguf.planning.placement import cpu_moe
from hybrid_gguf.synth import preset, write_synthetic_moe

WANT = ("ffn_norm", "ffn_moe_topk", "ffn_moe_weights_norm", "ffn_moe_hot_ids", "ffn_moe_cold_ids",
        "ffn_moe_hot_out", "ffn_moe_cold_out", "ffn_moe_out")


def capture(path, hot, pack_device, prompt, on_gpu):
    base = ggml_lib.libs().base
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    got: dict = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _ud):
        name = base.ggml_get_name(t).decode()
        stem, _, layer = name.rpartition("-")
        if ask:
            return stem in WANT and layer.isdigit()
        info = ggml_lib.GgmlTensor.from_address(t)
        nbytes = base.ggml_nbytes(t)
        raw = (ctypes.c_char * nbytes)()
        base.ggml_backend_tensor_get(t, raw, 0, nbytes)
        dtype = np.int32 if stem.endswith(("ids", "topk")) else np.float32
        flat = np.frombuffer(bytes(raw), dtype=dtype)
        ne, nb = list(info.ne), list(info.nb)
        item = np.dtype(dtype).itemsize
        # strided read of a 2-D/3-D tensor (the topk view has a row stride wider than ne0)
        rows = []
        for i2 in range(ne[2]):
            for i1 in range(ne[1]):
                off = (i1 * nb[1] + i2 * nb[2]) // item
                rows.append(flat[off + np.arange(ne[0]) * (nb[0] // item)])
        got[(stem, int(layer))] = np.array(rows).reshape(ne[2], ne[1], ne[0]) if ne[2] > 1 else np.array(rows)
        return True

    def ctx_patch(p):
        p.cb_eval = cb
        p.cb_eval_user_data = None

    kwargs = dict(n_ctx=256, n_batch=64, seed=1, verbose=False, use_mmap=False, context_patch=ctx_patch)
    if not on_gpu:
        kwargs["n_gpu_layers"] = 0
    placement = cpu_moe() if on_gpu else None
    llm = load_llama(path, placement, hot=hot, pack_device=pack_device, **kwargs).llm
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    llm.close()
    return got


def expert_weights(path):
    r = GGUFReader(str(path))
    w = {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors if "_exps" in t.name}
    return w  # numpy shapes: gate/up [E, n_ff, n_embd], down [E, n_embd, n_ff]


def ffn(w, il, e, x):
    g = w[f"blk.{il}.ffn_gate_exps.weight"][e] @ x
    u = w[f"blk.{il}.ffn_up_exps.weight"][e] @ x
    return w[f"blk.{il}.ffn_down_exps.weight"][e] @ (g / (1 + np.exp(-g)) * u)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack-device", default="CUDA0")
    ap.add_argument("--hot", default="0:7")
    ap.add_argument("--tokens", type=int, default=15)
    opts = ap.parse_args()
    on_gpu = opts.pack_device != "CPU"
    hot = hybrid_backend.parse_hot_spec(opts.hot)

    spec = preset("tiny", n_layer=3, n_expert=8, n_expert_used=2, zipf=0.8, seed=7)
    path = write_synthetic_moe(Path(tempfile.mkdtemp()) / "diag.gguf", spec)
    prompt = ([1] + [3 + b for b in b"import os\nimport sys\n\ndef main(argv):\n    pass\n"])[: opts.tokens]
    ref = capture(path, None, opts.pack_device, prompt, on_gpu)
    split = capture(path, hot, opts.pack_device, prompt, on_gpu)
    w = expert_weights(path)
    hot_sets = {l: set(es) for l, es in hot.items()}
    for il in range(spec.n_layer):
        if ("ffn_moe_out", il) not in ref:
            continue
        x = ref[("ffn_norm", il)].reshape(-1, spec.n_embd)
        ids = split[("ffn_moe_topk", il)].reshape(-1, spec.n_expert_used)
        wts = ref[("ffn_moe_weights_norm", il)].reshape(-1, spec.n_expert_used)
        want_hot = np.zeros((len(x), spec.n_embd), np.float32)
        want_cold = np.zeros_like(want_hot)
        for t in range(len(x)):
            for k in range(spec.n_expert_used):
                e = int(ids[t, k])
                y = wts[t, k] * ffn(w, il, e, x[t])
                (want_hot if e in hot_sets.get(il, ()) else want_cold)[t] += y
        out_ref = ref[("ffn_moe_out", il)].reshape(-1, spec.n_embd)
        out_split = split[("ffn_moe_out", il)].reshape(-1, spec.n_embd)
        print(f"layer {il}: split vs unsplit out {np.abs(out_split - out_ref).max():.2e}; "
              f"numpy vs unsplit {np.abs(want_hot + want_cold - out_ref).max():.2e}")
        if ("ffn_moe_hot_out", il) in split:
            got_hot = split[("ffn_moe_hot_out", il)].reshape(-1, spec.n_embd)
            err = np.abs(got_hot - want_hot).max(axis=1)
            print(f"  hot chain vs numpy: max {err.max():.2e}, worst tokens {np.argsort(-err)[:4].tolist()}")
            print(f"  hot ids  {split[('ffn_moe_hot_ids', il)].reshape(-1, spec.n_expert_used)[:6].tolist()}")
        if ("ffn_moe_cold_out", il) in split:
            got_cold = split[("ffn_moe_cold_out", il)].reshape(-1, spec.n_embd)
            err = np.abs(got_cold - want_cold).max(axis=1)
            print(f"  cold chain vs numpy: max {err.max():.2e}, worst tokens {np.argsort(-err)[:4].tolist()}")
            print(f"  cold ids {split[('ffn_moe_cold_ids', il)].reshape(-1, spec.n_expert_used)[:6].tolist()}")
        print(f"  topk     {ids[:6].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
