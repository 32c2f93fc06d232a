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


TRUTH = Bandwidth(cpu_bytes_per_s=40e9, gpu_bytes_per_s=3.3e12, pcie_bytes_per_s=52e9,
                  cpu_flops=2e12, gpu_flops=310e12, handoff_s=95e-6)


def placements(p):
    every = {l: list(range(16)) for l in range(4)}
    whole = {l: list(range(16)) for l in (2, 3)}
    hot = {l: [int(e) for e in np.argsort(-p[l])[:6]] for l in range(4)}
    return {"cpu-experts": {}, "whole-layer": whole, "all-gpu": every, "per-expert": hot}


@pytest.fixture()
def setup(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=16, n_expert_used=4))
    p = np.random.default_rng(0).dirichlet(np.ones(16), size=4) * 4  # rows sum to k = 4
    return inv, p, placements(p)


def test_stock_runs_fit_the_gpu_side_and_the_handoff(setup):
    inv, p, pl = setup
    stock = runs_from(inv, p, TRUTH, [pl["cpu-experts"], pl["whole-layer"], pl["all-gpu"]])
    # the CPU side comes from the CPU calibration; stock runs cannot separate it from hand-offs
    start = Bandwidth(cpu_bytes_per_s=TRUTH.cpu_bytes_per_s, cpu_flops=TRUTH.cpu_flops)
    fitted = fit_bandwidth(inv, p, stock, start, n_ctx=2048)
    for name in ("gpu_bytes_per_s", "handoff_s", "gpu_flops", "pcie_bytes_per_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUTH, name), rel=1e-6), name
        assert name in fitted.measured
    assert fitted.cpu_bytes_per_s == TRUTH.cpu_bytes_per_s


def test_a_per_expert_run_separates_cpu_bandwidth_from_handoff(setup):
    inv, p, pl = setup
    runs = runs_from(inv, p, TRUTH, list(pl.values()))
    start = Bandwidth(cpu_bytes_per_s=90e9, cpu_flops=TRUTH.cpu_flops)  # a streaming-read figure
    fitted = fit_bandwidth(inv, p, runs, start, n_ctx=2048)
    assert fitted.cpu_bytes_per_s == pytest.approx(TRUTH.cpu_bytes_per_s, rel=1e-6)
    assert fitted.handoff_s == pytest.approx(TRUTH.handoff_s, rel=1e-6)
    # and it predicts a placement it was not fitted on
    other = {l: [int(e) for e in np.argsort(-p[l])[:11]] for l in range(4)}
    (want,) = runs_from(inv, p, TRUTH, [other])
    sp = predict_speed(inv, p, other, True, fitted, 2048, n_ubatch=512, kv_fill=536)
    assert sp.decode_tokens_per_s == pytest.approx(want.decode_tokens_per_s, rel=1e-6)


def test_fit_without_gpu_only_runs_keeps_the_gpu_fields(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=2))
    p = np.full((2, 8), 2 / 8)
    base = Bandwidth()
    runs = runs_from(inv, p, Bandwidth(handoff_s=200e-6), [{}])
    fitted = fit_bandwidth(inv, p, runs, base, n_ctx=512)
    assert fitted.gpu_bytes_per_s == base.gpu_bytes_per_s and fitted.gpu_flops == base.gpu_flops
    assert fitted.handoff_s == pytest.approx(200e-6, rel=1e-6)
