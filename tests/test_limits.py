"""limits.py: the bounds every Llama construction is checked against."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hybrid_gguf import limits
from hybrid_gguf.errors import HybridError


def test_threads():
    limits.check_threads(None)
    limits.check_threads(1)
    limits.check_threads(limits.max_threads())
    assert 4 <= limits.max_threads() <= limits.GGML_MAX_N_THREADS
    for bad in (0, -1, limits.max_threads() + 1, 100000, True, 2.0):
        with pytest.raises(HybridError, match="--threads"):
            limits.check_threads(bad, "--threads")


def test_ctx_and_batch():
    limits.check_ctx(8)
    limits.check_ctx(None)
    for bad in (0, 7, -1, 2**40, 1.5):
        with pytest.raises(HybridError, match="context length"):
            limits.check_ctx(bad)
    for bad in (0, limits.MAX_BATCH + 1, 10**9):
        with pytest.raises(HybridError, match="n_ubatch"):
            limits.check_batch(bad, "n_ubatch")
    for bad in (0, -5, False):
        with pytest.raises(HybridError, match="max_tokens"):
            limits.check_new_tokens(bad)


def test_llama_kwargs():
    limits.check_llama_kwargs({"n_ctx": 64, "n_batch": 32, "n_threads": 1})
    with pytest.raises(HybridError, match="n_threads_batch"):
        limits.check_llama_kwargs({"n_ctx": 64, "n_threads_batch": 10**6})
    with pytest.raises(HybridError, match="n_ubatch"):
        limits.check_llama_kwargs({"n_ctx": 64, "n_ubatch": 10**9})


def test_context_memory(tiny_model, monkeypatch):
    from hybrid_gguf.header.inventory import read_inventory

    inv = read_inventory(tiny_model)
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    limits.check_context_memory(inv, 4096)
    with pytest.raises(HybridError, match="memory available"):
        limits.check_context_memory(inv, 10_000_000)


def test_context_size_is_the_smallest_of_the_three():
    llm = SimpleNamespace(n_ctx=lambda: 256, context_params=SimpleNamespace(n_ctx=64),
                          input_ids=np.zeros(64, dtype=np.intc))
    assert limits.context_size(llm) == 64
