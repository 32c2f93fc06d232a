"""Trace replay: hit rates on synthetic traces of known popularity vs analytical values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.routing.replay import (Trace, lfu_hits, load_trace, lru_hits, plot_replay, replay, save_trace,
                                trace_from_records)


def zipf(E, s):
    w = 1.0 / np.arange(1, E + 1) ** s
    return w / w.sum()


def iid_trace(probs, n_tokens, seed=0):
    """k = 1: every token picks one expert per layer, independently, with probs[l]."""
    rng = np.random.default_rng(seed)
    L, E = probs.shape
    ids = np.stack([rng.choice(E, size=n_tokens, p=probs[l]) for l in range(L)], axis=1)
    return Trace(ids[:, :, None].astype(np.int32), E)


def che_lru(q, capacity):
    """Che's approximation of LRU's hit rate under independent requests with probabilities q."""
    lo, hi = 0.0, 1e9
    for _ in range(200):
        t = (lo + hi) / 2
        if np.sum(1 - np.exp(-q * t)) < capacity:
            lo = t
        else:
            hi = t
    return float(np.sum(q * (1 - np.exp(-q * t))))


def test_static_oracle_lfu_match_analytical():
    probs = np.stack([zipf(16, 1.2), np.roll(zipf(16, 0.8), 5)])
    trace = iid_trace(probs, 60000)
    q = probs.reshape(-1) / 2  # each access is one of 2 layers' selections
    ranked = np.sort(q)[::-1]
    caps = [1, 2, 4, 8, 16, 24]
    rep = replay(trace, caps)
    assert rep.n_profile_tokens == rep.n_eval_tokens == 30000
    for row, c in zip(rep.rows, caps):
        top = ranked[:c].sum()
        assert row.static == pytest.approx(top, abs=0.01)  # the best static set is the top-c experts
        assert row.oracle == pytest.approx(top, abs=0.01)
        assert row.oracle >= row.static - 1e-12
        # perfect LFU keeps the c-1 most frequent and churns one slot
        assert ranked[:c - 1].sum() - 0.01 <= row.lfu <= top + 0.01
    assert rep.rows[-1].static > rep.rows[0].static
    assert "would not pay" in rep.verdicts[0]


def lru_exact(q, capacity):
    """LRU's hit rate under independent requests, exactly (King): sum over cache stacks."""
    total = 0.0
    for stack in itertools.permutations(range(len(q)), capacity):
        prob, held = 1.0, 0.0
        for i in stack:
            prob *= q[i] / (1.0 - held)
            held += q[i]
        total += prob * held
    return total


def test_lru_matches_analytical():
    probs = zipf(32, 1.0)[None, :]
    trace = iid_trace(probs, 80000, seed=3)
    for c in (2, 3, 8, 16):
        rep = replay(trace, [c])
        expect = lru_exact(probs[0], c) if c <= 3 else che_lru(probs[0], c)  # Che is tight for larger c
        assert rep.rows[0].lru == pytest.approx(expect, abs=0.01)
        # every miss loads one expert: loads per token = 1 - hit rate (k = 1, one layer)
        assert rep.rows[0].lru_loads_per_token == pytest.approx(1 - rep.rows[0].lru, abs=1e-9)


def test_uniform_routing_gives_capacity_fraction():
    trace = iid_trace(np.full((3, 10), 0.1), 30000, seed=5)
    rep = replay(trace, [6, 15])  # 20% and 50% of the 30 experts
    for row, c in zip(rep.rows, (6, 15)):
        for v in (row.static, row.lru):
            assert v == pytest.approx(c / 30, abs=0.02)
        assert (c - 1) / 30 - 0.02 <= row.lfu <= c / 30 + 0.02  # one slot churns


def test_drift_favours_dynamic_cache_and_says_so():
    E = 16
    a, b = zipf(E, 1.5), np.roll(zipf(E, 1.5), 8)
    first = iid_trace(a[None, :], 5000, seed=1)
    second = iid_trace(b[None, :], 5000, seed=2)
    trace = Trace(np.concatenate([first.ids, second.ids]), E)
    rep = replay(trace, [4], expert_bytes=3 * 2**20)
    row = rep.rows[0]
    assert row.static < 0.1 and row.lru > 0.5 and row.oracle > 0.6
    text = " ".join(rep.verdicts)
    assert "dynamic" in text and "would beat" in text and "per token over PCIe" in text
    assert "drifted" in text


def test_plan_sets_are_scored():
    probs = np.stack([zipf(8, 1.0)] * 2)
    trace = iid_trace(probs, 4000, seed=7)
    rep = replay(trace, [2, 2], plan_sets=[{0: [0], 1: [0]}, {0: [7], 1: [6]}])
    assert rep.rows[0].plan == pytest.approx(probs[0, 0], abs=0.03)
    assert rep.rows[1].plan == pytest.approx((probs[0, 7] + probs[1, 6]) / 2, abs=0.02)


def test_ring_buffer_records_and_files(tmp_path):
    # two tokens, three layers, top-2; the second token skips layer 2 (prompt rows dropped)
    token = np.array([10, 10, 10, 11, 11])
    layer = np.array([0, 1, 2, 0, 1])
    ids = np.array([[1, 2], [3, 0], [4, 5], [2, 1], [0, 3]], dtype=np.int32)
    t = trace_from_records(token, layer, ids, n_layer=3, n_expert=6)
    assert t.ids.shape == (2, 3, 2)
    assert t.ids[1, 2].tolist() == [-1, -1]
    counts, tokens = t.counts()
    assert tokens.tolist() == [2, 2, 1] and counts.sum() == 10
    path = tmp_path / "ring.npz"
    np.savez(path, token=token, layer=layer, ids=ids)
    assert np.array_equal(load_trace(path, n_layer=3, n_expert=6).ids, t.ids)
    save_trace(tmp_path / "t.npz", t)
    back = load_trace(tmp_path / "t.npz")
    assert np.array_equal(back.ids, t.ids) and back.n_expert == 6


def test_bad_traces(tmp_path):
    with pytest.raises(HybridError, match="does not exist"):
        load_trace(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(HybridError, match="cannot read"):
        load_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "odd.npz", x=np.zeros(3))
    with pytest.raises(HybridError, match="expected"):
        load_trace(tmp_path / "odd.npz")
    np.savez(tmp_path / "big.npz", ids=np.full((4, 2, 1), 9, dtype=np.int32))
    with pytest.raises(HybridError, match="names expert 9"):
        load_trace(tmp_path / "big.npz", n_expert=8)
    with pytest.raises(HybridError, match="empty"):
        trace_from_records(np.zeros(0), np.zeros(0), np.zeros((0, 2)))
    with pytest.raises(HybridError, match="too short"):
        replay(Trace(np.zeros((1, 1, 1), dtype=np.int32), 4), [1])


def test_cache_policies_small_cases():
    warm = np.array([], dtype=np.int64)
    seq = np.array([1, 2, 1, 3, 1, 2])
    assert lru_hits(warm, seq, 2) == (2, 4)  # 1 hit twice; 2 was evicted by 3
    assert lfu_hits(warm, seq, 2) == (2, 4)  # 1 stays (most used); 2 and 3 churn
    assert lru_hits(warm, seq, 0) == (0, 6)
    assert lfu_hits(np.array([2, 2, 2]), np.array([2, 5, 2]), 1) == (1, 2)


def test_plot(tmp_path):
    trace = iid_trace(np.stack([zipf(8, 1.0)]), 2000)
    rep = replay(trace, [1, 2, 4])
    out = plot_replay(rep, tmp_path / "r.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_recorder_ring_buffer_replays(tiny_model_factory):
    """A trace straight from the recorder's ring buffer: same counts as its histogram."""
    import llama_cpp  # noqa: F401  (libllama before the recorder)

    from greedy import greedy
    from hybrid_gguf.llama.hooks import construct_llama
    from hybrid_gguf.llama.recorder import RoutingRecorder, recorder_status
    from hybrid_gguf.routing.replay import trace_from_routing

    ok, why = recorder_status()
    if not ok:
        pytest.skip(why)
    path = tiny_model_factory("qwen3moe")
    rec = RoutingRecorder(2, 8, 2, trace_capacity=4096)
    llm = construct_llama(str(path), context_patch=rec.attach(), n_ctx=256, n_gpu_layers=0,
                          n_threads=1, verbose=False)
    try:
        greedy(llm, [1] + [3 + b for b in b"def f(x): return x"], 24)
        snap = rec.snapshot()
    finally:
        llm.close()
    trace = trace_from_routing(snap.trace, 2, 8)
    counts, tokens = trace.counts()
    assert np.array_equal(counts, snap.counts)
    assert np.array_equal(tokens, snap.tokens_per_layer)
    rep = replay(trace, [4, 16])
    assert rep.rows[1].static == rep.rows[1].oracle == 1.0  # 16 slots hold all 2 x 8 experts
    assert rep.rows[0].static <= rep.rows[0].oracle


def test_oracle_bounds_every_plan_of_its_size():
    # layer 0 routes every token over two experts; layer 1 routes one token in ten, always to
    # expert 0. Per token, layer 1's expert 0 is the surest (p = 1), but layer 0's expert 0
    # serves five times as many accesses: the oracle is the best set for the accesses, so it
    # is never below a plan holding as many experts (issue 18: it was printed below the plan)
    n = 400
    ids = np.full((n, 2, 1), -1, dtype=np.int32)
    ids[:, 0, 0] = np.arange(n) % 2
    ids[::10, 1, 0] = 0
    trace = Trace(ids, 4)
    report = replay(trace, [1], 0.5, plan_sets=[{0: [0]}])
    row = report.rows[0]
    assert row.plan == pytest.approx(100 / 220)
    assert row.oracle >= row.plan
    for r in replay(Trace(ids, 4), [1, 2, 3], 0.5).rows:
        assert r.oracle >= r.static
