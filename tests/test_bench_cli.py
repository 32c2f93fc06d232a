"""`hybrid-gguf bench` on the CPU: the report's structure, every number positive and finite."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("llama_cpp")

from typer.testing import CliRunner  # noqa: E402

from hybrid_gguf.cli import app  # noqa: E402


def test_bench_json_on_cpu(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3moe")
    png = tmp_path / "bench.png"
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--pp", "32", "--tg", "4", "--reps", "2",
                                   "--profile-tokens", "256", "--threads", "1", "--json", "--plot", str(png),
                                   "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    out = json.loads(detail.read_text())
    # --json: llama-bench's shape, an array with one row per test and placement
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert isinstance(rows, list) and rows
    for row in rows:
        assert {"model_type", "model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts", "avg_ns",
                "samples_ts", "placement", "hit_rate", "budget_bytes"} <= set(row)
        assert (row["n_prompt"], row["n_gen"]) in ((32, 0), (0, 4))
        assert row["avg_ts"] > 0 and row["stddev_ts"] >= 0 and len(row["samples_ts"]) == 2
        if row["n_gen"] > 0:  # decode rows say what the bandwidths allow for that placement
            assert row["roofline_tg_ts"] is None or row["roofline_tg_ts"] > 0
            assert row["roofline_tg_ts"] == out["prediction"]["configs"][row["placement"]]["roofline_decode_ts"]
            assert row["roofline_gpu_rate"] == "none"  # no GPU here: the roofline has no GPU rate in it
    by_test = {(r["placement"], r["n_gen"] > 0): r for r in rows}
    assert len(by_test) == len(rows)
    names = [r["name"] for r in out["results"]]
    assert names[:2] == ["cpu-experts", "whole-layer"]
    for r in out["results"]:
        assert r["n_prompt"] == 32 and r["n_gen"] == 4 and len(r["tg_ts"]) == 2
        for key in ("pp_median_ts", "tg_median_ts", "pp_avg_ts", "tg_avg_ts"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["hit_rate"] is None or 0.0 <= r["hit_rate"] <= 1.0
        # every row decodes its MoE layers on the CPU here: one-token MUL_MAT_IDs in
        # contiguous shares (patch v9), 3 per layer and decoded token at least, none fused
        # (LLAMA_HYBRID_MOE_FUSE is not set)
        if r["cpu_paths"] is not None:
            assert r["cpu_paths"]["mmid_flat_calls"] >= 3 * out["n_layer"] * 4 * 2, r["cpu_paths"]
            if os.environ.get("LLAMA_HYBRID_MOE_FUSE") != "1":
                assert r["cpu_paths"]["moe_fused_calls"] == 0
    pred = out["prediction"]["configs"]
    assert set(pred) == set(names)
    for name, row in pred.items():
        for key in ("predicted_decode_ts", "fitted_decode_ts", "roofline_decode_ts", "predicted_prefill_ts"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        # the model's terms are saved for refits; a layer whose experts are all on the host
        # is busy at every decoded token (the trace of the timed workload says so)
        assert set(row["terms"]) >= {"gpu_bytes", "cpu_bytes", "handoffs_busy", "handoffs_idle"}
        gpu = out["prediction"]["gpu_experts"][name]
        host_layers = sum(1 for l in range(out["n_layer"]) if len(gpu.get(str(l), [])) < out["n_expert"])
        assert row["terms"]["handoffs_busy"] + row["terms"]["handoffs_idle"] == pytest.approx(host_layers)
        assert 0 <= row["busy_handoffs_traced"] <= host_layers
        if name in ("cpu-experts", "whole-layer"):
            assert row["busy_handoffs_traced"] == host_layers
    assert not out["prediction"]["calibration_saved"]  # nothing to fit without a GPU
    assert png.stat().st_size > 1000


def test_the_per_expert_row_is_the_plan_that_plan_writes(tiny_model_factory, tmp_path):
    """Same model, budget (total VRAM) and profile: bench times exactly the plan `plan` writes."""
    from hybrid_gguf.bench.plans import share_budgets
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.planning.plan import Plan

    if not hybrid_backend.capability().per_expert:
        pytest.skip(hybrid_backend.STOCK_NOTICE)
    path = tiny_model_factory("qwen3moe", n_layer=4)
    (budget,) = share_budgets(path, [0.3], 256, 32)  # room for about a third of the experts
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--gpu-budget", str(budget), "--ctx", "256", "--pp", "32",
                                   "--tg", "4", "--reps", "1", "--profile-tokens", "256", "--threads", "1",
                                   "--configs", "whole-layer,per-expert", "--json", "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    out = json.loads(detail.read_text())
    assert out["budget_bytes"] == budget  # total VRAM, as `plan --gpu-budget` means it
    rows = {r["name"]: r for r in out["results"]}
    # the profile bench recorded, handed to `plan`
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(out["profile"]))
    written = tmp_path / "plan.yaml"
    res = CliRunner().invoke(app, ["plan", str(path), "--gpu-budget", str(budget), "--ctx", "256",
                                   "--profile", str(profile), "--out", str(written), "--json"])
    assert res.exit_code == 0, res.output
    plan = Plan.load(written)
    timed = rows["per-expert"]["plan"]
    assert plan.hot and {int(l): v for l, v in timed["hot"].items()} == plan.hot
    assert sum(map(len, plan.hot.values())) < 4 * 8  # a real choice, not every expert
    assert timed["rules"] == [{"pattern": r.pattern, "device": r.device} for r in plan.rules]
    # whole-layer: what `plan --whole-tensor` writes at the same budget
    res = CliRunner().invoke(app, ["plan", str(path), "--gpu-budget", str(budget), "--ctx", "256", "--whole-tensor",
                                   "--profile", str(profile), "--out", str(tmp_path / "whole.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    whole = Plan.load(tmp_path / "whole.yaml")
    assert not rows["whole-layer"]["plan"]["hot"] and not whole.hot
    assert rows["whole-layer"]["plan"]["rules"] == [{"pattern": r.pattern, "device": r.device} for r in whole.rules]


def test_cli_usage_errors_are_one_message():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", "--no-such-option"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "no-such-option" in res.stderr


def test_several_budgets_profile_once_and_time_what_depends_on_the_budget(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3moe")
    png = tmp_path / "bench.png"
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--expert-share", "0.2,0.5", "--pp", "32", "--tg", "4",
                                   "--reps", "1", "--profile-tokens", "256", "--threads", "1", "--json",
                                   "--plot", str(png), "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    doc = json.loads(detail.read_text())
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert {round(r["budget_share_of_experts"], 3) for r in rows} == {0.2, 0.5}
    first, second = doc["budgets"]
    assert first["budget_share_of_experts"] == pytest.approx(0.2, abs=1e-6)
    assert second["budget_share_of_experts"] == pytest.approx(0.5, abs=1e-6)
    assert second["budget_bytes"] > first["budget_bytes"]
    assert {r["name"] for r in second["results"]} <= {"whole-layer", "per-expert"}
    # same profile and timed tokens: the per-expert plan puts more experts on the GPU
    gpu1, gpu2 = first["prediction"]["gpu_experts"]["per-expert"], second["prediction"]["gpu_experts"]["per-expert"]
    assert sum(map(len, gpu2.values())) > sum(map(len, gpu1.values()))
    assert first["profile"] == second["profile"]
    assert doc["combined_fit"] is None  # nothing to fit without a GPU
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("share", ["0", "1.5", "a,b"])
def test_bad_budget_shares_are_one_clear_line(tiny_model_factory, share):
    res = CliRunner().invoke(app, ["bench", str(tiny_model_factory("qwen3moe")), "--expert-share", share])
    from hybrid_gguf.errors import HybridError

    # `main` prints a HybridError as one line; the app itself raises it
    assert isinstance(res.exception, HybridError) and "--expert-share" in str(res.exception)


def test_budgets_that_change_no_chosen_placement_are_skipped(tiny_model_factory):
    res = CliRunner().invoke(app, ["bench", str(tiny_model_factory("qwen3moe")), "--expert-share", "0.2,0.5",
                                   "--configs", "cpu-experts", "--pp", "32", "--tg", "4", "--reps", "1",
                                   "--profile-tokens", "256", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert {r["placement"] for r in rows} == {"cpu-experts"}  # one budget timed
    assert len(rows) == 2  # a prompt test and a generation test


def _bench_at_a_third(tiny_model_factory, tmp_path, configs: str):
    """`bench --configs CONFIGS` on a 4-layer tiny model with room for about a third of its
    experts, 4 decode steps, one rep: (the CLI result, its --json-detail file)."""
    from hybrid_gguf.bench.plans import share_budgets

    path = tiny_model_factory("qwen3moe", n_layer=4)
    (budget,) = share_budgets(path, [0.3], 256, 32)
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--pp", "32", "--tg", "4", "--reps", "1", "--gpu-budget",
                                   str(budget), "--ctx", "256", "--profile-tokens", "256", "--threads", "1",
                                   "--no-calibrate", "--configs", configs, "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    return res, detail


def test_bench_times_the_plan_as_an_in_session_cache_when_asked(tiny_model_factory, tmp_path):
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 5:
        pytest.skip("needs hybrid patch version 5 (the in-session cache)")
    res, detail = _bench_at_a_third(tiny_model_factory, tmp_path, "per-expert,per-expert-cache-lru")
    rows = {r["name"]: r for r in json.loads(detail.read_text())["results"]}
    assert rows["per-expert"]["plan"]["hot"]  # the plan has packs to turn into a cache
    cached = rows["per-expert-cache-lru"]
    assert cached["plan"]["hot"] == rows["per-expert"]["plan"]["hot"]  # the same plan, as a cache
    assert cached["cache"]["steps"] > 0 and cached["cache"]["hits"] + cached["cache"]["misses"] > 0
    # the row's hit rate is the cache's over the decode steps (after each rep's first, whose
    # step counted the prompt), as the other rows' hit rates count decode routing
    decode = cached["cache"]["decode"]
    assert decode["steps"] == 4 - 1 and decode["hits"] + decode["misses"] > 0
    assert cached["hit_rate"] == decode["hit_rate"]
    assert rows["per-expert"]["cache"] is None
    # the planner's cache pricing, checked against the row: from its measured hit rate and uploads
    table = json.loads(detail.read_text())["prediction"]["configs"]
    check = table["per-expert-cache-lru"]
    assert check["cache_model_decode_ts"] > 0 and "cache_model_decode_ts" not in table["per-expert"]
    assert abs(check["cache_model_decode_error"]
               - (check["cache_model_decode_ts"] / check["measured_decode_ts"] - 1.0)) < 1e-9


def test_bench_times_the_cache_plan_cache_auto_picks(tiny_model_factory, tmp_path):
    """`per-expert-cache-auto` is the plan `plan --cache auto` makes, with the bench's profile
    and the routing that profile saw as the replayed trace (held out: the first half chooses a
    hot set, the second is replayed); its note says what it chose and on how many tokens."""
    from hybrid_gguf.bench.plans import is_auto_cache, share_budgets
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 5:
        pytest.skip("needs hybrid patch version 5 (the in-session cache)")
    assert is_auto_cache("per-expert-cache-auto") and is_auto_cache("per-expert-cache-auto-worker")
    assert not is_auto_cache("per-expert-cache-lru") and not is_auto_cache("per-expert-cache-auto-q4")
    path = tiny_model_factory("qwen3moe", n_layer=4)
    (budget,) = share_budgets(path, [0.3], 256, 32)
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--pp", "32", "--tg", "4", "--reps", "1", "--gpu-budget",
                                   str(budget), "--ctx", "256", "--profile-tokens", "256", "--threads", "1",
                                   "--no-calibrate", "--routing", "realistic", "--configs",
                                   "per-expert,per-expert-cache-auto", "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(detail.read_text())["results"]}
    auto = rows["per-expert-cache-auto"]
    assert auto["plan"]["hot"] == rows["per-expert"]["plan"]["hot"]  # the cache choice moves no expert
    notes = [n for n in auto["plan"]["notes"] if n.startswith("in-session cache: ")]
    assert len(notes) == 1 and "chosen from the first" in notes[0], auto["plan"]["notes"]
    chosen = auto["plan"]["cache"]["policy"] if "cache" in auto["plan"] else "static"
    assert notes[0].startswith(f"in-session cache: {chosen} ")


def test_bench_worker_row_reports_its_counters(tiny_model_factory, tmp_path):
    """`per-expert-worker` times the plan with the CPU worker's hand-off; the row carries the
    worker's counters (which thread computed what) and the log says where the time went."""
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 7:
        pytest.skip("needs hybrid patch version 7 (the worker's counters per thread)")
    res, detail = _bench_at_a_third(tiny_model_factory, tmp_path, "per-expert,per-expert-worker")
    rows = {r["name"]: r for r in json.loads(detail.read_text())["results"]}
    assert rows["per-expert"]["worker"] is None
    worker = rows["per-expert-worker"]["worker"]
    assert worker["busy"] + worker["idle"] > 0, worker
    assert 0 <= worker["main_busy"] <= worker["busy"] and worker["main_compute_us"] <= worker["compute_us"], worker
    assert "per-expert-worker: decoding thread" in res.output


def test_cache_rows_name_their_policy_and_quota():
    from hybrid_gguf.bench.plans import cache_config
    from hybrid_gguf.errors import HybridError
    from hybrid_gguf.planning.placement import CacheOptions

    assert cache_config("per-expert-cache-lru") == CacheOptions("lru")
    assert cache_config("per-expert-cache-seeded-q64") == CacheOptions("seeded", quota=64)
    assert cache_config("per-expert-cache-lru-q8-bg") == CacheOptions("lru", quota=8, background=True)
    # a -worker row is the same cache with the CPU worker's hand-off
    assert cache_config("per-expert-cache-lru-q16-worker") == CacheOptions("lru", quota=16)
    assert CacheOptions("lru", background=True).plan_tokens()[-1] == "uploads=background"
    for bad in ("per-expert-cache-", "per-expert-cache-lru-qx", "per-expert-cache-mru", "per-expert-cache-lru-q9999"):
        with pytest.raises(HybridError):
            cache_config(bad)


def test_bench_replays_a_recorded_trace_file(tiny_model_factory, tmp_path, require_patch_v3):
    """--routing trace:FILE: the first half profiles, the second half is what the timed runs
    route. A trace that moves from experts 0,1 to 6,7 halfway must leave the plan's packs
    (made from 0,1) without a single hit. Where this machine's CPU rate makes the speed model
    promote a layer whole (a fast CPU here did), that layer's selections are the only hits."""
    import numpy as np

    from hybrid_gguf.bench.plans import share_budgets

    path = tiny_model_factory("qwen3moe", n_layer=4)
    n = 400
    ids = np.empty((n, 4, 2), dtype=np.int8)
    ids[: n // 2] = [0, 1]
    ids[n // 2:] = [6, 7]
    trace = tmp_path / "moves.npz"
    np.savez(trace, ids=ids, n_expert=np.int64(8))
    (budget,) = share_budgets(path, [0.3], 256, 32)
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--pp", "32", "--tg", "4", "--reps", "1", "--gpu-budget",
                                   str(budget), "--ctx", "256", "--profile-tokens", "256", "--threads", "1",
                                   "--no-calibrate", "--configs", "per-expert", "--routing", f"trace:{trace}",
                                   "--json-detail", str(detail)])
    assert res.exit_code == 0, res.output
    out = json.loads(detail.read_text())
    assert out["routing"] == f"trace:{trace}"
    (row,) = out["results"]
    hot, whole = row["plan"]["hot"], row["plan"].get("whole_layers", [])
    assert hot and all(set(es) <= {0, 1} for es in hot.values()), hot
    assert not set(map(int, hot)) & set(whole), (hot, whole)
    assert row["hit_rate"] == pytest.approx(len(whole) / 4), (row["hit_rate"], whole)

    # a trace of another shape is one clear line before anything loads
    import subprocess
    import sys

    wrong = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "bench", str(path), "--routing",
                            "trace:tests/data/routing/gpt-oss-20b_mmlu-law.npz"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "24 layers" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def _tiny_bench(tiny_model_factory, tmp_path, *args) -> dict:
    """`bench` on a 2-layer tiny model, one rep, no calibration stored: its --json-detail."""
    path = tiny_model_factory("qwen3moe", n_layer=2)
    detail = tmp_path / "detail.json"
    res = CliRunner().invoke(app, ["bench", str(path), "--tg", "4", "--reps", "1", "--ctx", "256",
                                   "--profile-tokens", "128", "--threads", "1", "--no-calibrate",
                                   "--json-detail", str(detail), *args])
    assert res.exit_code == 0, res.output
    return json.loads(detail.read_text())


def test_bench_times_the_prompt_in_the_given_micro_batches(tiny_model_factory, tmp_path):
    """--ubatch: the plans are made for it, the loads use it, and the report says it (the
    default is the whole prompt)."""
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "96", "--ubatch", "32", "--configs", "whole-layer")
    assert out["n_ubatch"] == 32 and out["results"][0]["pp_ts"][0] > 0
    res = CliRunner().invoke(app, ["bench", str(tiny_model_factory("qwen3moe", n_layer=2)), "--ubatch", "0"])
    assert res.exit_code != 0 and "--ubatch must be between" in str(res.exception)


def test_bench_flash_attention_reaches_the_plans_and_the_timed_loads(tiny_model_factory, tmp_path, monkeypatch):
    """--flash-attn: the plans are made for it (their compute buffers), the timed loads use it,
    the profiling load does not, and the report says it."""
    import hybrid_gguf.autoplan as autoplan
    import hybrid_gguf.llama.loader as loader

    planned, loaded = [], []
    plan_model, load_llama = autoplan.plan_model, loader.load_llama

    def spy_plan(*args, **kwargs):
        planned.append(kwargs.get("flash_attn"))
        return plan_model(*args, **kwargs)

    def spy_load(*args, **kwargs):
        loaded.append(kwargs.get("flash_attn"))
        return load_llama(*args, **kwargs)

    monkeypatch.setattr(autoplan, "plan_model", spy_plan)
    monkeypatch.setattr(loader, "load_llama", spy_load)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "64", "--flash-attn", "--configs", "whole-layer")
    assert out["flash_attn"] is True and out["results"][0]["pp_ts"][0] > 0 and out["results"][0]["error"] is None
    assert planned and all(f is True for f in planned)
    assert loaded[0] is False and loaded[1:] and all(f is True for f in loaded[1:])  # profile load, then timed


def timed_loads(monkeypatch) -> list:
    """The names of the placements `bench` loads to time, in order, as they happen."""
    import hybrid_gguf.bench.runner as runner

    timed, load_config = [], runner.load_config

    def spy(path, inv, cfg, *args, **kwargs):
        if cfg.name != "profile":
            timed.append(cfg.name)
        return load_config(path, inv, cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "load_config", spy)
    return timed


def test_bench_reverse_times_last_to_first_and_reports_in_order(tiny_model_factory, tmp_path, monkeypatch):
    timed = timed_loads(monkeypatch)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--reverse", "--configs", "cpu-experts,whole-layer")
    names = [r["name"] for r in out["results"]]
    assert timed == names[::-1] and names == ["cpu-experts", "whole-layer"]


def test_bench_rounds_alternate_the_order_and_pool_the_reps(tiny_model_factory, tmp_path, monkeypatch):
    """--rounds 3: every placement loaded three times, the order reversed each round; a row
    holds all its reps and one median per round, and the table shows them."""
    timed = timed_loads(monkeypatch)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--rounds", "3", "--configs", "cpu-experts,whole-layer")
    assert timed == ["cpu-experts", "whole-layer", "whole-layer", "cpu-experts", "cpu-experts", "whole-layer"]
    for r in out["results"]:
        assert len(r["tg_ts"]) == 3 and len(r["tg_round_medians"]) == 3, r  # one rep per round
        assert all(v > 0 and math.isfinite(v) for v in r["tg_round_medians"] + r["pp_round_medians"])
        assert min(r["tg_round_medians"]) <= r["tg_median_ts"] <= max(r["tg_round_medians"])
        if os.path.exists("/proc/self/smaps_rollup"):  # the process's memory after the row (Linux)
            assert r["host_memory"]["rss"] > 0 and r["host_memory"]["anon_huge"] >= 0
            # the loaded row's threads, and those the rows before it left
            assert r["host_memory"]["threads"] >= 1 and r["host_memory"]["threads_before_load"] >= 1
    result = CliRunner().invoke(app, ["bench", "-m", "x", "--rounds", "0"])
    assert result.exit_code != 0 and "--rounds" in result.output


def test_pooled_rounds_keep_the_first_rounds_counters_and_an_error():
    from hybrid_gguf.bench.runner import Result, pool_rounds

    a = Result("p", 8, 4, [10.0], [5.0], 0.5, 0, 0, 1.0, worker={"busy": 3}, pp_round_medians=[10.0],
               tg_round_medians=[5.0])
    b = Result("p", 8, 4, [12.0], [7.0], 0.5, 0, 0, 1.0, worker={"busy": 4}, pp_round_medians=[12.0],
               tg_round_medians=[7.0])
    both = pool_rounds(a, b)
    assert both.tg_ts == [5.0, 7.0] and both.tg_round_medians == [5.0, 7.0] and both.worker == {"busy": 3}
    failed = Result("p", 8, 4, [], [], None, 0, 0, 0.0, error="out of memory")
    assert pool_rounds(a, failed).error == "out of memory" and pool_rounds(failed, b).error == "out of memory"


def test_the_cache_step_time_is_fitted_from_the_cache_rows_decode_steps():
    from types import SimpleNamespace

    from hybrid_gguf.bench.runner import fit_cache_step
    from hybrid_gguf.planning.calibration import Bandwidth
    from hybrid_gguf.planning.placement import CacheOptions

    def row(cache, decode):
        return SimpleNamespace(cache=cache), SimpleNamespace(cache=None if decode is None else {"decode": decode})

    # 40 us per step plus 20 us per upload: rows at 1 and 4 uploads per step tell both apart
    rows = [row(None, None),  # a static row tells nothing
            row(CacheOptions("lru"), {"steps": 100, "step_us": 100 * 120, "uploads": 400}),
            row(CacheOptions("lfu"), {"steps": 300, "step_us": 300 * 60, "uploads": 300})]
    bw = fit_cache_step(rows, Bandwidth(), lambda s: None)
    assert abs(bw.cache_step_s - 40e-6) < 1e-12 and abs(bw.cache_upload_s - 20e-6) < 1e-12
    assert {"cache_step_s", "cache_upload_s"} <= set(bw.measured)
    # one row: the base alone, at the default cost per upload (not marked measured)
    one = fit_cache_step(rows[:2], Bandwidth(), lambda s: None)
    assert abs(one.cache_step_s - (120e-6 - 4 * Bandwidth().cache_upload_s)) < 1e-12
    assert one.cache_upload_s == Bandwidth().cache_upload_s and "cache_upload_s" not in one.measured
    assert fit_cache_step(rows[:1], Bandwidth(), lambda s: None) == Bandwidth()


def test_bench_profiles_a_model_whose_context_is_shorter_than_a_profiling_prompt(tiny_model_factory, tmp_path):
    """The profiling workload comes in prompts of PROFILE_CHUNK tokens; a context shorter than
    that (a model's own 256, or --ctx) gets prompts that fit it, not llama_decode's error."""
    from hybrid_gguf.bench.runner import PROFILE_CHUNK

    path = tiny_model_factory("qwen3moe", n_layer=2)
    res = CliRunner().invoke(app, ["bench", str(path), "--ctx", "256", "--pp", "32", "--tg", "4", "--reps", "1",
                                   "--profile-tokens", str(PROFILE_CHUNK + 100), "--threads", "1",
                                   "--configs", "whole-layer", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])  # llama-bench's shape: one row per test
    assert rows and all(r["avg_ts"] > 0 for r in rows), rows


def test_the_unpromoted_row_keeps_every_expert_in_a_pack(tiny_model_factory, tmp_path):
    """`per-expert-unpromoted` at a budget that holds every expert: the planner's own plan
    promotes the full layers whole, the unpromoted one keeps each of them as a hot pack (what the
    split's own kernels cost against whole layers). Rows carry the timed reps' page faults."""
    from hybrid_gguf.llama import hybrid as hybrid_backend

    if not hybrid_backend.capability().per_expert:
        pytest.skip(hybrid_backend.STOCK_NOTICE)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--expert-share", "1.0",
                      "--configs", "whole-layer,per-expert,per-expert-unpromoted")
    rows = {r["name"]: r for r in out["results"]}
    n_layer, n_expert = 2, out["n_expert"]
    packed = rows["per-expert-unpromoted"]
    assert packed["error"] is None and packed["tg_ts"][0] > 0
    assert packed["plan"]["whole_layers"] == []
    assert {int(l): sorted(v) for l, v in packed["plan"]["hot"].items()} == {l: list(range(n_expert)) for l in range(n_layer)}
    assert rows["per-expert"]["plan"]["whole_layers"] == list(range(n_layer)) and not rows["per-expert"]["plan"]["hot"]
    assert packed["hit_rate"] == 1.0
    faults = packed["cpu_paths"]
    if faults is not None:
        assert faults["minor_faults"] >= 0 and faults["major_faults"] >= 0


def test_the_unpromoted_row_fills_packs_the_plan_left_partial(tiny_model_factory, tmp_path):
    """Where the plan packs only part of a layer's experts (here at half the expert bytes),
    `per-expert-unpromoted` still packs all of them: it prices the split's own kernels, so no
    layer may keep cold work (on the H200 a plan at every expert's bytes left one layer at 7 of
    128 experts, and that layer's CPU work ran every token in this row)."""
    from hybrid_gguf.llama import hybrid as hybrid_backend

    if not hybrid_backend.capability().per_expert:
        pytest.skip(hybrid_backend.STOCK_NOTICE)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--expert-share", "0.5",
                      "--configs", "per-expert,per-expert-unpromoted")
    rows = {r["name"]: r for r in out["results"]}
    n_expert = out["n_expert"]
    plan, packed = rows["per-expert"]["plan"], rows["per-expert-unpromoted"]
    touched = {int(l) for l, v in plan["hot"].items() if v} | set(plan["whole_layers"])
    assert any(len(v) < n_expert for v in plan["hot"].values()), plan["hot"]  # the premise: a partial pack
    assert packed["error"] is None
    assert {int(l): sorted(v) for l, v in packed["plan"]["hot"].items()} == {l: list(range(n_expert)) for l in touched}
    assert packed["hit_rate"] == 1.0


def test_the_idle_worker_row_leaves_one_rare_expert_per_layer_to_the_worker(tiny_model_factory, tmp_path):
    """`per-expert-idle-worker` at a budget that holds every expert: the unpromoted packs less
    each layer's least selected expert, handed to the CPU worker. Every layer posts each token;
    the hand-offs are counted, and most are idle."""
    from hybrid_gguf.llama import hybrid as hybrid_backend

    if hybrid_backend.capability().version < 7:
        pytest.skip("needs hybrid patch version 7 (the worker and its counters)")
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--expert-share", "1.0",
                      "--configs", "per-expert-unpromoted,per-expert-idle-worker,per-expert-idle-worker-half")
    rows = {r["name"]: r for r in out["results"]}
    idle, half = rows["per-expert-idle-worker"], rows["per-expert-idle-worker-half"]
    assert idle["error"] is None and idle["tg_ts"][0] > 0
    assert half["error"] is None and half["tg_ts"][0] > 0
    n_layer, n_expert = 2, out["n_expert"]
    hot = {int(l): v for l, v in idle["plan"]["hot"].items()}
    assert sorted(hot) == list(range(n_layer)) and all(len(v) == n_expert - 1 for v in hot.values())
    assert idle["plan"]["handoff"] == "worker" and half["plan"]["handoff"] == "worker"
    # the half row: the first packed layer hands one expert off, the second keeps its whole pack
    half_hot = {int(l): v for l, v in half["plan"]["hot"].items()}
    assert [len(half_hot[l]) for l in range(n_layer)] == [n_expert - 1, n_expert]
    assert set(half_hot[0]) == set(hot[0])
    worker = idle["worker"]
    # a hand-off per layer and decoded token at least, nearly all idle (the rarest expert)
    assert worker["busy"] + worker["idle"] >= n_layer * 4 and worker["idle"] > worker["busy"], worker
    # the half row posts from one layer: half the full row's hand-offs, give or take a step's
    # (the rows' counters need not cover the same number of steps)
    half_posts, full_posts = half["worker"]["busy"] + half["worker"]["idle"], worker["busy"] + worker["idle"]
    assert half_posts >= 4 and abs(2 * half_posts - full_posts) <= 2 * n_layer, (half["worker"], worker)


@pytest.mark.parametrize("variant", ["per-expert-worker-hugepages", "per-expert-worker-prefetch"])
def test_a_worker_variant_row_loads_the_worker_plan_with_its_variable_set(tiny_model_factory, tmp_path, monkeypatch,
                                                                         variant):
    """`per-expert-worker-hugepages` (patch version 13: CUDA's pinned host buffers on 2 MiB
    pages; a CPU build has none, so here the row decodes as the worker row) and
    `per-expert-worker-prefetch` (version 17: the worker reads the next split layer's likely
    experts between posts): the worker's plan, loaded with the row's variable set to 1. The
    variable is set during that row's load only, and the row says so."""
    from hybrid_gguf.bench.plans import WORKER_VARIANTS
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.llama import loader

    env, since = WORKER_VARIANTS[variant]
    if hybrid_backend.capability().version < since:
        pytest.skip(f"needs hybrid patch version {since}")
    monkeypatch.delenv(env, raising=False)
    seen = []
    real = loader.load_llama

    def spy(*args, **kwargs):
        seen.append(os.environ.get(env))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_llama", spy)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--expert-share", "0.3",
                      "--configs", f"per-expert-worker,{variant}")
    rows = {r["name"]: r for r in out["results"]}
    row, worker = rows[variant], rows["per-expert-worker"]
    assert row["error"] is None and row["tg_ts"][0] > 0
    assert row["plan"]["handoff"] == "worker" and row["plan"]["hot"] == worker["plan"]["hot"]
    assert row["plan"]["load_env"] == {env: "1"} and "load_env" not in worker["plan"]
    # the variable in the row's own load only (the others: the worker row, the profiling load)
    assert seen.count("1") == 1 and set(seen) == {None, "1"}, seen
    assert env not in os.environ
    if variant.endswith("-prefetch"):  # the worker created in that load read ahead; the plain one did not
        assert row["worker"]["prefetch_calls"] > 0 and worker["worker"]["prefetch_calls"] == 0, (row["worker"], worker["worker"])


def test_bench_times_both_readers_of_the_cold_experts(tiny_model_factory, tmp_path):
    """`per-expert-both-0.5` (patch version 10): the plan with the CPU worker, where each split
    layer's GPU (here the CPU backend's main graph) reads about half of its cold selections;
    the row names them and the worker's counters; a malformed share is one clear error."""
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 10:
        pytest.skip("needs hybrid patch version 10 (cold=both)")
    res, detail = _bench_at_a_third(tiny_model_factory, tmp_path, "per-expert,per-expert-both-0.5")
    rows = {r["name"]: r for r in json.loads(detail.read_text())["results"]}
    both = rows["per-expert-both-0.5"]
    assert both["error"] is None and both["tg_ts"][0] > 0
    assert both["plan"]["cold"] == "both" and both["plan"]["handoff"] == "worker"
    gpu_cold = {int(l): v for l, v in both["plan"]["gpu_cold"].items()}
    hot = {int(l): set(v) for l, v in both["plan"]["hot"].items()}
    assert gpu_cold and all(l in hot and not hot[l] & set(v) for l, v in gpu_cold.items())
    assert both["worker"]["busy"] + both["worker"]["idle"] > 0
    path = tiny_model_factory("qwen3moe", n_layer=4)
    bad = CliRunner().invoke(app, ["bench", str(path), "--configs", "per-expert-both-half", "--tg", "2",
                                   "--profile-tokens", "128", "--ctx", "256", "--no-calibrate"])
    assert bad.exit_code != 0 and "must be a number" in str(bad.exception)


@pytest.mark.parametrize("value", ["two", "-1", "99"])
def test_a_bad_profile_window_is_one_line_before_any_load(tiny_model_factory, tmp_path, monkeypatch, value):
    from hybrid_gguf.bench import runner

    monkeypatch.setenv(runner.PROFILE_STEPS_ENV, value)
    loads = []
    monkeypatch.setattr(runner, "load_config", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    path = tiny_model_factory("qwen3moe", n_layer=2)
    res = CliRunner().invoke(app, ["bench", str(path), "--pp", "16", "--tg", "2", "--reps", "1", "--ctx", "128",
                                   "--threads", "1", "--no-calibrate", "--configs", "all-gpu"])
    from hybrid_gguf.errors import HybridError

    # `main` prints a HybridError as one line; the app itself raises it
    assert isinstance(res.exception, HybridError) and runner.PROFILE_STEPS_ENV in str(res.exception)
    assert not loads


def test_the_profile_window_brackets_decode_steps_only_where_a_cuda_driver_is_loaded(tiny_model_factory, tmp_path,
                                                                                      monkeypatch):
    """`HYBRID_GGUF_CUDA_PROFILE_STEPS=N`: after the timed reps each row decodes N untimed steps
    between cuProfilerStart and cuProfilerStop (`gpu_eval.sh ncuidle`). Without a loaded CUDA
    driver nothing is bracketed and the bench is unchanged."""
    import ctypes

    from hybrid_gguf.bench import runner

    monkeypatch.setenv(runner.PROFILE_STEPS_ENV, "2")
    try:
        ctypes.CDLL("libcuda.so.1", mode=getattr(ctypes, "RTLD_NOLOAD", 0))
        driver_loaded = True
    except OSError:
        driver_loaded = False
    evals = []
    real_window = runner.cuda_profile_window
    monkeypatch.setattr(runner, "cuda_profile_window",
                        lambda llm, prompt, decode: evals.append(len(decode)) or real_window(llm, prompt, decode))
    res, _ = _bench_at_a_third(tiny_model_factory, tmp_path, "per-expert")
    assert evals == [2]
    assert ("2 untimed decode steps bracketed" in res.output) == driver_loaded


def test_bench_isolate_times_each_placement_in_a_fresh_process(tiny_model_factory, tmp_path, monkeypatch):
    """--isolate: no placement is loaded in the bench's own process (only its profile), each row
    is timed in a spawned one, and the rows carry the same measurements as in one process."""
    timed = timed_loads(monkeypatch)
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--isolate", "--configs", "cpu-experts,whole-layer")
    assert timed == []  # the spy lives in this process only
    assert [r["name"] for r in out["results"]] == ["cpu-experts", "whole-layer"]
    for r in out["results"]:
        assert not r["error"] and r["tg_ts"][0] > 0 and r["pp_ts"][0] > 0
        if r.get("host_memory"):  # each child started with only its own threads
            assert r["host_memory"]["threads_before_load"] >= 1


def test_the_cache_pricing_check_takes_the_worker_row_as_its_static_plan(tiny_model_factory, tmp_path):
    """A bench of `per-expert-worker` and a cache row with the worker, without a `per-expert`
    row (gpu_eval.sh realtrace's REALTRACE_BASE=per-expert-worker), still checks the pricing."""
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 5:
        pytest.skip("needs hybrid patch version 5 (the in-session cache)")
    _, detail = _bench_at_a_third(tiny_model_factory, tmp_path, "per-expert-worker,per-expert-cache-lru-worker")
    table = json.loads(detail.read_text())["prediction"]["configs"]
    assert "per-expert" not in table
    assert table["per-expert-cache-lru-worker"]["cache_model_decode_ts"] > 0


def test_bench_isolate_reports_a_row_whose_process_dies(tiny_model_factory, tmp_path, monkeypatch):
    """A placement whose process dies (llama.cpp aborting) is that row's error, and the bench
    goes on to the next row instead of waiting for an answer that never comes."""
    monkeypatch.setenv("HYBRID_GGUF_TEST_ISOLATE_CRASH", "whole-layer")
    out = _tiny_bench(tiny_model_factory, tmp_path, "--pp", "32", "--isolate", "--configs", "cpu-experts,whole-layer")
    rows = {r["name"]: r for r in out["results"]}
    assert "died" in rows["whole-layer"]["error"] and not rows["cpu-experts"]["error"]
