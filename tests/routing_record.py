"""Run prompt tokens through a model with an optional routing trace and return what the
routing recorder saw, for the routing-override tests."""

from __future__ import annotations

import os

import numpy as np


def record_routing(path, n_tokens: int, route_trace=None) -> np.ndarray:
    """Evaluate n_tokens prompt tokens in batches of 64; the recorder's [n_tokens, n_layer, k]
    expert ids (-1 where a layer did not route a token)."""
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.llama.loader import load_llama
    from hybrid_gguf.llama.recorder import Recording
    from hybrid_gguf.routing.replay import trace_from_routing

    inv = read_inventory(path)
    # scripts/gpu_eval.sh runs these tests with the packs' device set to a GPU: all layers there
    on_gpu = os.environ.get("HYBRID_GGUF_TEST_PACK_DEVICE", "CPU").upper() != "CPU"
    loaded = load_llama(path, None, record=Recording(trace_records=n_tokens * inv.n_layer), route_trace=route_trace,
                        inventory=inv, n_ctx=n_tokens + 8, n_batch=64, n_ubatch=64,
                        n_gpu_layers=-1 if on_gpu else 0, verbose=False)
    try:
        tokens = [3 + (i * 37) % 250 for i in range(n_tokens)]
        for start in range(0, n_tokens, 64):
            loaded.llm.eval(tokens[start:start + 64])
        return trace_from_routing(loaded.recorder.snapshot().trace, inv.n_layer, inv.n_expert).ids
    finally:
        loaded.close()
