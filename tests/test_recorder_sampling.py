"""Decode sampling in the routing recorder: fewer syncs, counts still consistent."""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hybrid_gguf.header.inventory import read_inventory  # noqa: E402
from hybrid_gguf.llama.hooks import construct_llama  # noqa: E402
from hybrid_gguf.llama.recorder import RoutingRecorder, recorder_status  # noqa: E402

if not recorder_status()[0]:
    pytest.skip(recorder_status()[1], allow_module_level=True)


def decode(path, stride, n_gen=32, burst=None):
    """Prompt, then n_gen single-token decodes. burst=None: the C recorder's own stride;
    else a DecodeSampler (stride, burst) told of every decode."""
    inv = read_inventory(path)
    rec = RoutingRecorder(inv.n_layer, inv.n_expert, inv.n_expert_used)
    llm = construct_llama(str(path), context_patch=rec.attach(), n_ctx=128, n_gpu_layers=0,
                          n_threads=1, verbose=False)
    if burst is None:
        rec.set_decode_stride(stride)
        before_decode = lambda n: None  # noqa: E731
        sampler = None
    else:
        sampler = rec.decode_sampler(llm.ctx, stride, burst)
        before_decode = sampler.before_decode
    prompt = [1] + [3 + b for b in b"def main():\n"]
    before_decode(len(prompt))
    llm.eval(prompt)
    for i in range(n_gen):
        before_decode(1)
        llm.eval([5 + i % 50])
    snap = rec.snapshot(trace=False)
    llm.close()
    rec.close()
    return inv, snap, sampler


def test_stride_observes_one_decode_token_in_n(tiny_model_factory):
    path = tiny_model_factory("qwen3moe")
    inv, full, _ = decode(path, 1)
    _, sampled, _ = decode(path, 4)
    assert (full.tokens_decode == 32).all()
    assert (sampled.tokens_decode == 8).all()  # decode graphs 4, 8, ..., 32
    # the prompt batch is always observed, whatever the stride
    assert (sampled.tokens_prompt == full.tokens_prompt).all()
    # every observed token still contributes exactly k selections per layer
    np.testing.assert_array_equal(sampled.counts_decode.sum(axis=1),
                                  sampled.tokens_decode * inv.n_expert_used)
    # and the sampled counts are a subset of the full ones (same routing, fewer tokens)
    assert (sampled.counts_decode <= full.counts_decode).all()


def test_sampler_takes_the_callback_off_skipped_tokens(tiny_model_factory):
    from hybrid_gguf.llama import hybrid as hybrid_backend

    if hybrid_backend.eval_callback_setter() is None:
        pytest.skip("needs the hybrid patch, version 2 or later")
    path = tiny_model_factory("qwen3moe")
    inv, snap, sampler = decode(path, 4, burst=1)
    assert sampler.switches_callback
    assert (snap.tokens_decode == 8).all()  # decoded tokens 3, 7, ..., 31
    np.testing.assert_array_equal(snap.counts_decode.sum(axis=1), snap.tokens_decode * inv.n_expert_used)
    # the recorder saw the prompt graph and the 8 observed decode graphs, nothing else: the
    # skipped tokens ran with no callback at all
    assert snap.stats["graphs"] == 1 + 8
    # bursts of 3 closing each period of 12 tokens (stride 4): decoded tokens 9-11 and 21-23
    _, snap, _ = decode(path, 4, burst=3)
    assert (snap.tokens_decode == 6).all() and snap.stats["graphs"] == 1 + 6


def test_sampled_run_generates_what_an_unrecorded_run_does(tiny_model_factory):
    from hybrid_gguf.model import HybridModel

    path = tiny_model_factory("qwen3moe")
    with HybridModel(str(path), record=False, n_ctx=128) as plain:
        want = plain.generate("def main():\n", max_tokens=40)
    with HybridModel(str(path), record=True, n_ctx=128) as recorded:
        got = recorded.generate("def main():\n", max_tokens=40)
        snap = recorded.routing_snapshot()
    assert got.text == want.text
    # the prompt is always observed; 40 decoded tokens are before the first burst (or, on a
    # build without the callback switch, one token in RUN_DECODE_STRIDE)
    assert snap.tokens_prompt[0] > 0 and snap.tokens_decode[0] <= 2
