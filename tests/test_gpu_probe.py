"""The GPU side of the decode model: bandwidth and fixed times, told apart by model shapes."""

from __future__ import annotations

try:  # load libllama before numpy-heavy work (docs/backend-patch.md, "Import order")
    import llama_cpp
except ImportError:
    llama_cpp = None

from dataclasses import replace

import numpy as np
import pytest

from hybrid_gguf.bench import model_maker as bm
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.calibration import Bandwidth, MeasuredRun, RunTerms, fit_decode, run_terms
from hybrid_gguf.planning.speed import predict_speed

needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable")
TRUTH = Bandwidth(gpu_bytes_per_s=2.4e12, gpu_layer_s=61e-6, gpu_step_s=97e-6, cpu_bytes_per_s=70e9,
                  handoff_s=150e-6, handoff_idle_s=100e-6)


def all_gpu_terms(inv, bw=TRUTH) -> RunTerms:
    every = {l.index: list(range(l.n_expert)) for l in inv.layers if l.is_moe}
    sp = predict_speed(inv, None, every, True, bw, 512, n_ubatch=16, kv_fill=48)
    return run_terms(inv, None, MeasuredRun(every, sp.decode_tokens_per_s, sp.prefill_tokens_per_s, 16, 48), 512)


@pytest.fixture(scope="module")
def shapes(tiny_model_factory):
    deep = read_inventory(tiny_model_factory("qwen3moe", n_layer=12, n_embd=64, n_ff_exp=64))
    wide = read_inventory(tiny_model_factory("qwen3moe", n_layer=2, n_embd=256, n_ff_exp=512))
    tiny = read_inventory(tiny_model_factory("qwen3moe", n_layer=1, n_embd=64, n_ff_exp=64))
    return deep, wide, tiny


def test_three_shapes_separate_bandwidth_per_layer_and_per_step_times(shapes):
    got = fit_decode([all_gpu_terms(inv) for inv in shapes], Bandwidth(gpu_layer_s=1e-6, gpu_step_s=1e-6))
    assert got["gpu_bytes_per_s"] == pytest.approx(2.4e12, rel=1e-6)
    assert got["gpu_layer_s"] == pytest.approx(61e-6, rel=1e-6)
    assert got["gpu_step_s"] == pytest.approx(97e-6, rel=1e-6)


def test_two_shapes_fit_the_per_layer_time_next_to_the_stored_per_step_time(shapes):
    deep, wide, _ = shapes
    got = fit_decode([all_gpu_terms(deep), all_gpu_terms(wide)], Bandwidth(gpu_step_s=97e-6))
    assert "gpu_step_s" not in got
    assert got["gpu_bytes_per_s"] == pytest.approx(2.4e12, rel=1e-6)
    assert got["gpu_layer_s"] == pytest.approx(61e-6, rel=1e-6)


def test_one_shape_keeps_the_stored_fixed_times_and_fits_the_bandwidth(shapes):
    deep = shapes[0]
    base = Bandwidth(gpu_layer_s=61e-6, gpu_step_s=97e-6)
    got = fit_decode([all_gpu_terms(deep)] * 2, base)  # e.g. one model's all-GPU runs at two budgets
    assert set(got) == {"gpu_bytes_per_s"}
    assert got["gpu_bytes_per_s"] == pytest.approx(2.4e12, rel=1e-6)


def test_stored_fixed_times_longer_than_a_step_are_dropped(shapes):
    deep = shapes[0]
    base = Bandwidth(gpu_layer_s=1e-3)  # 12 layers x 1 ms: more than the measured step
    got = fit_decode([all_gpu_terms(deep)], base)
    assert got["gpu_layer_s"] == 0.0 and got["gpu_step_s"] == 0.0 and got["gpu_bytes_per_s"] > 0


def test_host_runs_are_fitted_net_of_the_per_layer_time(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=16, n_expert_used=4))
    p = np.random.default_rng(0).dirichlet(np.ones(16), size=4) * 4
    top = lambda n: {l: [int(e) for e in np.argsort(-p[l])[:n]] for l in range(4)}
    placements = [{}, {l: list(range(16)) for l in (2, 3)}, top(6), top(10), {l: list(range(16)) for l in range(4)}]
    terms = []
    for pl in placements:
        sp = predict_speed(inv, p, pl, True, TRUTH, 2048, n_ubatch=512, kv_fill=536)
        terms.append(run_terms(inv, p, MeasuredRun(pl, sp.decode_tokens_per_s, sp.prefill_tokens_per_s, 512, 536), 2048))
    got = fit_decode(terms, Bandwidth(gpu_layer_s=61e-6, gpu_step_s=97e-6))
    assert got["cpu_bytes_per_s"] == pytest.approx(70e9, rel=1e-6)
    assert got["handoff_s"] == pytest.approx(150e-6, rel=1e-6)
    assert got["handoff_idle_s"] == pytest.approx(100e-6, rel=1e-6)


def test_worker_rows_fit_the_workers_busy_hand_off(tiny_model_factory):
    """bench.runner.fit_worker_handoff: rows timed with the CPU worker give back the busy
    hand-off cost that made their times, whatever the stored value, the idle cost kept; the
    scheduler's costs play no part."""
    from types import SimpleNamespace

    from hybrid_gguf.bench.runner import fit_worker_handoff

    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=16, n_expert_used=4))
    p = np.random.default_rng(0).dirichlet(np.ones(16), size=4) * 4
    top = lambda n: {l: [int(e) for e in np.argsort(-p[l])[:n]] for l in range(4)}
    truth = replace(TRUTH, worker_handoff_s=230e-6, worker_handoff_idle_s=3e-6)
    rows = []
    for pl in (top(6), top(12)):
        sp = predict_speed(inv, p, pl, True, truth, 2048, n_ubatch=512, kv_fill=536, worker=True)
        rows.append((SimpleNamespace(gpu_experts=pl), MeasuredRun(pl, sp.decode_tokens_per_s, 1.0, 512, 536), None))
    stored = replace(TRUTH, worker_handoff_s=100e-6, worker_handoff_idle_s=3e-6, handoff_s=1.0, handoff_idle_s=1.0)
    # one row: busy hand-offs dominate it, so it fits the busy cost and keeps the idle one
    got = fit_worker_handoff(inv, p, rows[:1], stored, 2048, 512, log=lambda s: None)
    assert got.worker_handoff_s == pytest.approx(230e-6, rel=1e-3)  # decode_ms is kept to 0.1 us
    assert got.worker_handoff_idle_s == 3e-6 and "worker_handoff_s" in got.measured
    assert "worker_handoff_idle_s" not in got.measured
    # two rows that mix them differently give both
    both = fit_worker_handoff(inv, p, rows, replace(stored, worker_handoff_idle_s=50e-6), 2048, 512,
                              log=lambda s: None)
    assert both.worker_handoff_s == pytest.approx(230e-6, rel=1e-2)
    assert both.worker_handoff_idle_s == pytest.approx(3e-6, abs=1e-6)
    assert {"worker_handoff_s", "worker_handoff_idle_s"} <= set(both.measured)
    # a row faster than the model's other terms allow tells nothing
    fast = [(c, replace(r, decode_tokens_per_s=1e9), t) for c, r, t in rows]
    assert fit_worker_handoff(inv, p, fast, stored, 2048, 512, log=lambda s: None) is stored


def test_a_worker_row_of_idle_hand_offs_fits_the_idle_cost(tiny_model_factory):
    """A plan with every routed expert on the GPU hands off almost only idle layers (the H200's
    optimistic 50 % row: 0.06 busy and 48 idle per token). Its time fits the idle cost; read
    as busy hand-offs it gave 31 ms each."""
    from types import SimpleNamespace

    from hybrid_gguf.bench.runner import fit_worker_handoff

    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=16, n_expert_used=4))
    p = np.random.default_rng(0).dirichlet(np.ones(16), size=4) * 4
    hot = {l: [int(e) for e in np.argsort(-p[l])[:15]] for l in range(4)}
    truth = replace(TRUTH, worker_handoff_s=230e-6, worker_handoff_idle_s=40e-6)
    sp = predict_speed(inv, p, hot, True, truth, 2048, n_ubatch=512, kv_fill=536, worker=True)
    assert sp.handoffs["idle"] > sp.handoffs["busy"]
    row = (SimpleNamespace(gpu_experts=hot), MeasuredRun(hot, sp.decode_tokens_per_s, 1.0, 512, 536), None)
    stored = replace(TRUTH, worker_handoff_s=230e-6, worker_handoff_idle_s=2e-6)
    got = fit_worker_handoff(inv, p, [row], stored, 2048, 512, log=lambda s: None)
    assert got.worker_handoff_idle_s == pytest.approx(40e-6, rel=1e-2)
    assert got.worker_handoff_s == 230e-6 and "worker_handoff_s" not in got.measured


def test_calibrations_and_terms_saved_before_the_fixed_times_read_as_none():
    old = Bandwidth.from_dict({"gpu_bytes_per_s": 5.4e11, "measured": ["gpu_bytes_per_s"]})
    assert old.gpu_layer_s == 0.0 and old.gpu_step_s == 0.0
    cpu_only = Bandwidth.from_dict({"cpu_bytes_per_s": 6e10})  # the GPU side never measured: defaults
    assert (cpu_only.gpu_layer_s, cpu_only.gpu_step_s) == (Bandwidth().gpu_layer_s, Bandwidth().gpu_step_s)
    with pytest.raises(HybridError, match="gpu_layer_s"):
        Bandwidth.from_dict({"gpu_layer_s": -1e-6})
    old = {k: 1.0 for k in ("gpu_bytes", "cpu_bytes", "handoffs_busy", "handoffs_idle", "gpu_flop", "cpu_flop",
                            "pcie_bytes", "decode_tokens_per_s", "prefill_tokens_per_s", "n_prompt")}
    assert RunTerms.from_dict(old).gpu_layers == 0.0 and RunTerms.from_dict(old).gpu_steps == 0.0
    with pytest.raises(KeyError):
        RunTerms.from_dict({k: v for k, v in old.items() if k != "cpu_bytes"})


def test_probe_shapes_differ_in_bytes_per_layer():
    from hybrid_gguf.bench.probe import PROBES, probe_spec

    per_layer = {}
    for name in PROBES:
        spec = probe_spec(name)
        total = sum(t.n_bytes for t in bm.layout(spec))
        per_layer[name] = total / spec.n_layer
    assert per_layer["wide"] > 20 * per_layer["deep"]
    assert per_layer["tiny"] == pytest.approx(per_layer["deep"], rel=0.05)
    assert probe_spec("deep").n_layer >= 10 * probe_spec("wide").n_layer
    assert probe_spec("deep").n_layer >= 10 * probe_spec("tiny").n_layer


def test_probe_refuses_without_a_gpu(monkeypatch):
    from hybrid_gguf.llama import devices
    from hybrid_gguf.bench import probe as gpu_probe

    monkeypatch.setattr(devices, "gpu_devices", lambda: [])
    with pytest.raises(HybridError, match="needs a GPU"):
        gpu_probe.probe_gpu(log=lambda s: None)


@needs_llama
def test_measure_probe_times_a_real_decode_and_reports_its_terms(tmp_path):
    from hybrid_gguf.bench.probe import measure_probe

    spec = bm.bench_spec("tiny-q4k", "Q4_K", n_layer=3, n_expert=8)
    path = bm.write_bench_model(tmp_path / "probe.gguf", spec, workers=1).path
    t = measure_probe(path, n_gen=8, reps=1, n_threads=2, pack_device="CPU")
    inv = read_inventory(path)
    assert t.gpu_layers == 3 and t.gpu_steps == 1 and t.cpu_bytes == 0 and t.handoffs == 0
    assert t.decode_tokens_per_s > 0 and t.prefill_tokens_per_s > 0
    # every token reads k experts of every layer and all dense weights
    expert_read = sum(l.n_expert_used * l.per_expert_bytes for l in inv.layers if l.is_moe)
    assert t.gpu_bytes > expert_read
    assert replace(t, decode_tokens_per_s=1.0).decode_seconds(TRUTH) > 3 * 61e-6 + 97e-6


def test_bench_stores_its_models_gpu_rate_beside_the_probes(shapes, monkeypatch, tmp_path):
    from hybrid_gguf.planning.calibration import fit_bandwidth_terms

    deep = shapes[0]
    fast = replace(TRUTH, gpu_bytes_per_s=3.0e12)  # this model's kernels run faster than the probes'
    probed = replace(TRUTH, measured=("gpu_bytes_per_s", "gpu_layer_s", "gpu_step_s"))
    got = fit_bandwidth_terms([all_gpu_terms(deep, fast)], probed, fingerprint="model-a")
    assert got.gpu_bytes_per_s == 2.4e12  # the probe's machine-wide rate stays
    assert got.for_model("model-a").gpu_bytes_per_s == pytest.approx(3.0e12, rel=1e-6)
    assert got.for_model("model-b").gpu_bytes_per_s == 2.4e12
    # no probe yet: the model's rate is also the best machine-wide guess
    unprobed = fit_bandwidth_terms([all_gpu_terms(deep, fast)], replace(TRUTH, measured=()), fingerprint="model-a")
    assert unprobed.gpu_bytes_per_s == pytest.approx(3.0e12, rel=1e-6)
    # the rates survive the calibration file
    again = Bandwidth.from_dict(got.to_dict())
    assert again.for_model("model-a").gpu_bytes_per_s == pytest.approx(3.0e12, rel=1e-6)
    with pytest.raises(HybridError, match="model_gpu_rates"):
        Bandwidth.from_dict({**got.to_dict(), "model_gpu_rates": {"model-a": -1}})


def test_probe_fits_the_three_shapes_and_drops_stale_model_rates(shapes, monkeypatch, tmp_path):
    from hybrid_gguf.llama import devices
    from hybrid_gguf.bench import probe as gpu_probe
    from hybrid_gguf.planning import calibration

    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "gpu_devices", lambda: ["fake GPU"])
    by_name = dict(zip(("deep", "wide", "tiny"), shapes))

    def fake_model(name, cache_dir, log):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
        return tmp_path / f"{name}.gguf"

    monkeypatch.setattr(gpu_probe, "ensure_probe_model", fake_model)
    # the measurement is timed on a GPU only; here each probe's decode follows TRUTH
    monkeypatch.setattr(gpu_probe, "measure_probe", lambda path, *a, **k: all_gpu_terms(by_name[path.stem]))
    calibration.save_calibration(replace(Bandwidth(), model_gpu_rates=(("old-model", 1e12),),
                                         machine=calibration.machine_id()))
    got = gpu_probe.probe_gpu(log=lambda s: None)
    assert got["gpu_layer_s"] == pytest.approx(61e-6, rel=1e-6)
    assert got["gpu_step_s"] == pytest.approx(97e-6, rel=1e-6)
    stored = calibration.load_calibration()
    assert stored.gpu_bytes_per_s == pytest.approx(2.4e12, rel=1e-6) and stored.model_gpu_rates == ()
    assert {"gpu_bytes_per_s", "gpu_layer_s", "gpu_step_s"} <= set(stored.measured)
    assert not list(tmp_path.glob("*.gguf"))  # the probe models do not stay in the cache
    gpu_probe.probe_gpu(log=lambda s: None, keep_models=True, save=False)
    assert len(list(tmp_path.glob("*.gguf"))) == 3


def test_a_stored_calibration_takes_todays_worker_costs_unless_it_measured_them():
    """Each patch that made the worker's hand-off cheaper (v9's one-token kernel, v11's post)
    makes older fits stale: the default an older calibration saved gives way to today's
    default, and so does a value fitted with an older patch; one fitted with v11 stays."""
    stale = Bandwidth.from_dict({"cpu_bytes_per_s": 6e10, "worker_handoff_s": 211e-6, "worker_handoff_idle_s": 2e-6})
    assert stale.worker_handoff_s == Bandwidth().worker_handoff_s == 100e-6
    assert stale.worker_handoff_idle_s == Bandwidth().worker_handoff_idle_s
    fitted = Bandwidth.from_dict({"worker_handoff_s": 190e-6, "measured": ["worker_handoff_s"],
                                  "worker_patch_version": 11})
    assert fitted.worker_handoff_s == 190e-6 and "worker_handoff_s" in fitted.measured
    assert Bandwidth.from_dict(fitted.to_dict()).worker_handoff_s == 190e-6
    # fitted with patch v10 or older (or before the version was kept): stale
    for older in ({"worker_patch_version": 10}, {"worker_patch_version": 8}, {}):
        old = Bandwidth.from_dict({"worker_handoff_s": 211e-6, "measured": ["worker_handoff_s", "cpu_bytes_per_s"],
                                   "cpu_bytes_per_s": 6e10, **older})
        assert old.worker_handoff_s == Bandwidth().worker_handoff_s and old.measured == ("cpu_bytes_per_s",)
    with pytest.raises(HybridError, match="worker_patch_version"):
        Bandwidth.from_dict({"worker_patch_version": "9"})


def test_a_stored_calibration_prices_a_cache_s_uploads_once():
    """Before the per-upload cost, a calibration kept one figure per cache step, its uploads'
    host time included: a stored default (0.2 ms) gives way to today's base, and a fitted one
    is kept with no upload cost on top; a fit of both survives a round trip."""
    stale = Bandwidth.from_dict({"cpu_bytes_per_s": 6e10, "cache_step_s": 0.2e-3,
                                 "gpu_bytes_per_s": 1e12, "measured": ["gpu_bytes_per_s"]})
    assert stale.cache_step_s == Bandwidth().cache_step_s and stale.cache_upload_s == Bandwidth().cache_upload_s
    old_fit = Bandwidth.from_dict({"cache_step_s": 0.3e-3, "measured": ["cache_step_s"]})
    assert old_fit.cache_step_s == 0.3e-3 and old_fit.cache_upload_s == 0.0
    both = Bandwidth(cache_step_s=13e-6, cache_upload_s=45e-6, measured=("cache_step_s", "cache_upload_s"))
    assert Bandwidth.from_dict(both.to_dict()) == both
