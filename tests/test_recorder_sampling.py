"""Decode sampling in the routing recorder: fewer syncs, counts still consistent."""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hybrid_gguf.inventory import read_inventory  # noqa: E402
from hybrid_gguf.llama_hooks import construct_llama  # noqa: E402
from hybrid_gguf.recorder import RoutingRecorder, recorder_status  # noqa: E402

if not recorder_status()[0]:
    pytest.skip(recorder_status()[1], allow_module_level=True)


def decode(path, stride, n_gen=32):
    inv = read_inventory(path)
    rec = RoutingRecorder(inv.n_layer, inv.n_expert, inv.n_expert_used)
    rec.set_decode_stride(stride)
    llm = construct_llama(str(path), context_patch=rec.attach(), n_ctx=128, n_gpu_layers=0,
                          n_threads=1, verbose=False)
    prompt = [1] + [3 + b for b in b"def main():\n"]
    llm.eval(prompt)
    for i in range(n_gen):
        llm.eval([5 + i % 50])
    snap = rec.snapshot(trace=False)
    llm.close()
    rec.close()
    return inv, snap


def test_stride_observes_one_decode_token_in_n(tiny_model_factory):
    path = tiny_model_factory("qwen3moe")
    inv, full = decode(path, 1)
    _, sampled = decode(path, 4)
    assert (full.tokens_decode == 32).all()
    assert (sampled.tokens_decode == 8).all()  # decode graphs 4, 8, ..., 32
    # the prompt batch is always observed, whatever the stride
    assert (sampled.tokens_prompt == full.tokens_prompt).all()
    # every observed token still contributes exactly k selections per layer
    np.testing.assert_array_equal(sampled.counts_decode.sum(axis=1),
                                  sampled.tokens_decode * inv.n_expert_used)
    # and the sampled counts are a subset of the full ones (same routing, fewer tokens)
    assert (sampled.counts_decode <= full.counts_decode).all()
