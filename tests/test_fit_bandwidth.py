"""fit_bandwidth: the bandwidth model's fields recovered from timed placements."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.calibration import Bandwidth, MeasuredRun, fit_bandwidth, fit_decode, run_terms
from hybrid_gguf.planning.speed import layer_busy, predict_speed


def runs_from(inv, p, bw, placements, n_ctx=2048, n_prompt=512):
    out = []
    for gpu_experts in placements:
        sp = predict_speed(inv, p, gpu_experts, True, bw, n_ctx, n_ubatch=n_prompt, kv_fill=n_prompt + 24)
        out.append(MeasuredRun(gpu_experts, sp.decode_tokens_per_s, sp.prefill_tokens_per_s,
                               n_prompt, n_prompt + 24))
    return out


TRUTH = Bandwidth(cpu_bytes_per_s=40e9, gpu_bytes_per_s=3.3e12, pcie_bytes_per_s=52e9,
                  cpu_flops=2e12, gpu_flops=310e12, handoff_s=95e-6, handoff_idle_s=95e-6)
# a machine where a hand-off with nothing for the CPU to compute is cheaper
TRUTH_SPLIT = replace(TRUTH, handoff_s=140e-6, handoff_idle_s=70e-6)


def top(p, n):
    return {l: [int(e) for e in np.argsort(-p[l])[:n]] for l in range(p.shape[0])}


def assert_predicts_unfitted(inv, p, truth, fitted, placement):
    """The fitted model predicts a placement it was not fitted on."""
    (want,) = runs_from(inv, p, truth, [placement])
    sp = predict_speed(inv, p, placement, True, fitted, 2048, n_ubatch=512, kv_fill=536)
    assert sp.decode_tokens_per_s == pytest.approx(want.decode_tokens_per_s, rel=1e-6)


def placements(p):
    every = {l: list(range(16)) for l in range(4)}
    whole = {l: list(range(16)) for l in (2, 3)}
    return {"cpu-experts": {}, "whole-layer": whole, "all-gpu": every, "per-expert": top(p, 6)}


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
    assert_predicts_unfitted(inv, p, TRUTH, fitted, top(p, 11))


def test_per_expert_runs_at_two_budgets_separate_busy_and_idle_handoffs(setup):
    inv, p, pl = setup
    runs = runs_from(inv, p, TRUTH_SPLIT, [*pl.values(), top(p, 10)])
    fitted = fit_bandwidth(inv, p, runs, Bandwidth(cpu_bytes_per_s=90e9), n_ctx=2048)
    assert fitted.cpu_bytes_per_s == pytest.approx(TRUTH_SPLIT.cpu_bytes_per_s, rel=1e-6)
    assert fitted.handoff_s == pytest.approx(140e-6, rel=1e-6)
    assert fitted.handoff_idle_s == pytest.approx(70e-6, rel=1e-6)
    assert_predicts_unfitted(inv, p, TRUTH_SPLIT, fitted, top(p, 13))


def test_one_per_expert_run_cannot_split_the_handoff_and_fits_one(setup):
    inv, p, pl = setup
    runs = runs_from(inv, p, TRUTH_SPLIT, list(pl.values()))
    fitted = fit_bandwidth(inv, p, runs, Bandwidth(cpu_bytes_per_s=90e9), n_ctx=2048)
    # stock runs have only busy hand-offs, so busy and idle are not told apart: one value
    assert fitted.handoff_s == fitted.handoff_idle_s
    assert 70e-6 < fitted.handoff_s < 140e-6


def test_fit_refuses_negative_terms_and_falls_back(setup):
    inv, p, pl = setup
    runs = runs_from(inv, p, TRUTH_SPLIT, [*pl.values(), top(p, 10)])
    terms = [run_terms(inv, p, r, 2048) for r in runs]
    # a per-expert run measured far faster than any positive idle hand-off allows
    fast = replace(terms[3], decode_tokens_per_s=terms[3].decode_tokens_per_s * 3)
    got = fit_decode([*terms[:3], fast, terms[4]], Bandwidth())
    assert all(v > 0 for v in got.values())


def test_layer_busy_is_the_chance_a_token_selects_a_host_expert():
    p = np.array([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]])  # k = 2 of 4
    busy = layer_busy(p, {0: [0, 1], 1: [0, 1]})
    assert busy[0] == pytest.approx(1 - 0.5 * 0.5)
    assert busy[1] == 0.0  # layer 1 always picks experts 0 and 1: never busy
    assert list(layer_busy(p, {})) == [1.0, 1.0]  # every selection is a host expert
    assert layer_busy(p, {1: [0]})[1] == 1.0  # expert 1 is always picked and on the host


def test_calibrations_saved_before_the_idle_handoff_load_with_one_handoff():
    bw = Bandwidth.from_dict({"handoff_s": 1.3e-4, "cpu_bytes_per_s": 6e10})
    assert bw.handoff_idle_s == 1.3e-4


def test_fit_without_gpu_only_runs_keeps_the_gpu_fields(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=2))
    p = np.full((2, 8), 2 / 8)
    base = Bandwidth()
    runs = runs_from(inv, p, Bandwidth(handoff_s=200e-6), [{}])
    fitted = fit_bandwidth(inv, p, runs, base, n_ctx=512)
    assert fitted.gpu_bytes_per_s == base.gpu_bytes_per_s and fitted.gpu_flops == base.gpu_flops
    assert fitted.handoff_s == pytest.approx(200e-6, rel=1e-6)


def test_busy_handoffs_counts_layers_where_a_token_used_a_host_expert():
    from hybrid_gguf.bench.runner import busy_handoffs
    from hybrid_gguf.llama.recorder import RoutingTrace

    # 3 tokens x 2 layers, k = 2 of 4 experts; GPU holds experts 0, 1 of layer 0 and 2 of layer 1
    ids = np.array([[0, 1], [2, 3], [0, 2], [2, 0], [1, 0], [3, 1]], dtype=np.int32)
    trace = RoutingTrace(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 0, 1], dtype=np.int32), ids, 6)
    hot = {0: [0, 1], 1: [2]}
    # layer 0: token 1 used expert 2 (host); layer 1: tokens 0, 1, 2 all used a host expert
    assert busy_handoffs(trace, hot, [0, 1], 4) == pytest.approx((1 + 3) / 3)
    assert busy_handoffs(trace, hot, [0], 4) == pytest.approx(1 / 3)
    assert busy_handoffs(None, hot, [0], 4) is None


def test_bench_refits_once_across_budgets(setup, tmp_path, monkeypatch):
    from hybrid_gguf.bench.runner import refit_across_budgets
    from hybrid_gguf.planning.calibration import load_calibration

    from hybrid_gguf.planning.calibration import save_calibration

    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path))
    # a stored calibration whose streaming read bounds no rate here (this machine's own read,
    # measured otherwise, may be below the 40 GB/s the runs were made with)
    save_calibration(Bandwidth(cpu_bytes_per_s=90e9, cpu_read_bytes_per_s=90e9,
                               measured=("cpu_bytes_per_s", "cpu_read_bytes_per_s")))
    inv, p, pl = setup
    outs = []
    for share, extra in ((0.25, pl), (0.6, {"per-expert": top(p, 10)})):
        runs = runs_from(inv, p, TRUTH_SPLIT, list(extra.values()))
        configs = {name: {"terms": run_terms(inv, p, r, 2048).to_dict(), "busy_handoffs_traced": None}
                   for name, r in zip(extra, runs)}
        outs.append({"budget_share_of_experts": share, "prediction": {"configs": configs}})
    # each budget alone cannot tell busy from idle hand-offs; the two together can
    got = refit_across_budgets(outs, log=lambda s: None)
    cal = got["calibration_fitted"]
    assert cal["handoff_s"] == pytest.approx(140e-6, rel=1e-6)
    assert cal["handoff_idle_s"] == pytest.approx(70e-6, rel=1e-6)
    assert all(abs(r["fitted_decode_error"]) < 1e-6 for r in got["runs"].values())
    assert load_calibration().handoff_idle_s == pytest.approx(70e-6, rel=1e-6)


def test_a_cpu_rate_beyond_the_measured_read_is_refused(setup):
    """Runs whose least squares put the CPU's expert rate far above its measured streaming
    read (the H200's realistic 25 % bench fitted 264 GB/s against a measured 80): the fit keeps
    the measured rate and fits the hand-off alone. Without a measured rate it is accepted."""
    inv, p, pl = setup
    fast_cpu = replace(TRUTH, cpu_bytes_per_s=300e9)
    runs = runs_from(inv, p, fast_cpu, list(pl.values()))
    measured = Bandwidth(cpu_bytes_per_s=80e9, cpu_read_bytes_per_s=80e9, measured=("cpu_read_bytes_per_s",))
    fitted = fit_bandwidth(inv, p, runs, measured, n_ctx=2048)
    assert fitted.cpu_bytes_per_s == 80e9
    assert fitted.handoff_s == fitted.handoff_idle_s > 0
    # a stored rate fitted before the bound existed is brought down to it
    inflated = fit_bandwidth(inv, p, runs, replace(measured, cpu_bytes_per_s=264e9), n_ctx=2048)
    assert inflated.cpu_bytes_per_s == pytest.approx(100e9) and inflated.handoff_s > 0
    unmeasured = fit_bandwidth(inv, p, runs, Bandwidth(cpu_bytes_per_s=80e9), n_ctx=2048)
    assert unmeasured.cpu_bytes_per_s == pytest.approx(300e9, rel=1e-6)
