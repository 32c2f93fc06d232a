"""planning/cold_split.py: which cold experts a layer's GPU reads with cold=both."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.cold_split import gpu_read_share, split_cold


def test_the_share_balances_the_two_rates():
    assert gpu_read_share(24e9, 48e9) == pytest.approx(1 / 3)
    with pytest.raises(HybridError):
        gpu_read_share(0.0, 48e9)


def test_the_gpu_gets_its_share_of_each_layers_cold_selections():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.6, size=(3, 32)).astype(float)
    hot = {0: list(range(8)), 2: [5, 9, 31]}
    got = split_cold(hot, counts, 0.3)
    assert set(got) == {0, 2}  # layer 1 has no pack
    for layer, mine in got.items():
        cold = [e for e in range(32) if e not in hot[layer]]
        assert set(mine) <= set(cold) and len(set(mine)) == len(mine)
        share = counts[layer, mine].sum() / counts[layer, cold].sum()
        # within one expert's selections of the target
        assert abs(share - 0.3) <= counts[layer, cold].max() / counts[layer, cold].sum()
    assert split_cold(hot, counts, 0.0) == {}
    assert split_cold(hot, counts, 1.0) == {l: [e for e in range(32) if e not in hot[l]] for l in hot}


def test_never_selected_cold_experts_split_by_count():
    counts = np.zeros((1, 10))
    counts[0, :2] = 5.0  # the hot ones
    got = split_cold({0: [0, 1]}, counts, 0.25)
    assert len(got[0]) == 2 and not {0, 1} & set(got[0])
    with pytest.raises(HybridError):
        split_cold({0: [0]}, counts, 1.5)


def test_the_speed_model_prices_both_readers(tiny_model_factory):
    """predict_speed(gpu_cold=...): the GPU's share of the cold bytes leaves the CPU's term and
    overlaps with it; all of them read by the GPU leaves the worker idle; a share the GPU reads
    slower than the CPU computes the rest costs the difference."""
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.calibration import Bandwidth
    from hybrid_gguf.planning.speed import predict_speed

    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=3, n_expert=8))
    p = np.full((3, 8), inv.n_expert_used / 8)
    hot = {l: [0, 1, 2, 3] for l in range(3)}
    bw = Bandwidth(cpu_bytes_per_s=50e9, host_read_bytes_per_s=25e9, gpu_chain_s=0.0)
    worker = predict_speed(inv, p, hot, True, bw, 256, worker=True)
    half = predict_speed(inv, p, hot, True, bw, 256, worker=True, gpu_cold={l: [4] for l in range(3)})
    every = predict_speed(inv, p, hot, True, bw, 256, worker=True, gpu_cold={l: [4, 5, 6, 7] for l in range(3)})
    cpu_ms = worker.decode_ms["experts_cpu"]
    # a quarter of the cold bytes at half the CPU's rate: exactly as long as the other three quarters
    near = dict(rel=0.02, abs=2e-4)  # decode_ms is rounded to 0.1 us
    assert half.decode_ms["experts_cpu"] == pytest.approx(0.75 * cpu_ms, **near)
    assert half.decode_ms["experts_both_read"] == pytest.approx(0.0, **near)
    assert half.decode_tokens_per_s > worker.decode_tokens_per_s
    assert half.handoffs["busy"] < worker.handoffs["busy"]
    # all of them on the GPU: no worker compute, the reads at half the CPU's rate take twice as long
    assert every.decode_ms["experts_cpu"] == pytest.approx(0.0, **near) and every.handoffs["busy"] == 0
    assert every.decode_ms["experts_both_read"] == pytest.approx(2 * cpu_ms, **near)
