"""fit_bandwidth: the GPU side of the bandwidth model recovered from timed stock placements."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_gguf.inventory import read_inventory
from hybrid_gguf.predict import Bandwidth, MeasuredRun, fit_bandwidth, predict_speed


def runs_from(inv, p, bw, placements, n_ctx=2048, n_prompt=512):
    out = []
    for gpu_experts in placements:
        sp = predict_speed(inv, p, gpu_experts, True, bw, n_ctx, n_ubatch=n_prompt, kv_fill=n_prompt + 24)
        out.append(MeasuredRun(gpu_experts, sp.decode_tokens_per_s, sp.prefill_tokens_per_s,
                               n_prompt, n_prompt + 24))
    return out


def test_fit_recovers_the_bandwidths_that_made_the_runs(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=16, n_expert_used=4))
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(16), size=4) * 4  # rows sum to k = 4
    truth = Bandwidth(cpu_bytes_per_s=40e9, gpu_bytes_per_s=3.3e12, pcie_bytes_per_s=52e9,
                      cpu_flops=2e12, gpu_flops=310e12, handoff_s=95e-6)
    every = {l: list(range(16)) for l in range(4)}
    whole = {l: list(range(16)) for l in (2, 3)}
    stock = runs_from(inv, p, truth, [{}, whole, every])  # cpu-experts, whole-layer, all-gpu
    # start from defaults, except the CPU side, which the CPU calibration measures
    start = Bandwidth(cpu_bytes_per_s=truth.cpu_bytes_per_s, cpu_flops=truth.cpu_flops)
    fitted = fit_bandwidth(inv, p, stock, start, n_ctx=2048)
    for name in ("gpu_bytes_per_s", "handoff_s", "gpu_flops", "pcie_bytes_per_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
        assert name in fitted.measured
    # and it predicts a placement it was not fitted on
    hot = {l: list(np.argsort(-p[l])[:6]) for l in range(4)}
    (per_expert,) = runs_from(inv, p, truth, [hot])
    sp = predict_speed(inv, p, hot, True, fitted, 2048, n_ubatch=512, kv_fill=536)
    assert sp.decode_tokens_per_s == pytest.approx(per_expert.decode_tokens_per_s, rel=1e-6)


def test_fit_without_gpu_only_runs_keeps_the_gpu_fields(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=2))
    p = np.full((2, 8), 2 / 8)
    base = Bandwidth()
    runs = runs_from(inv, p, Bandwidth(handoff_s=200e-6), [{}])
    fitted = fit_bandwidth(inv, p, runs, base, n_ctx=512)
    assert fitted.gpu_bytes_per_s == base.gpu_bytes_per_s and fitted.gpu_flops == base.gpu_flops
    assert fitted.handoff_s == pytest.approx(200e-6, rel=1e-6)
