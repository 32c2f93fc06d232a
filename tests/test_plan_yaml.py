"""Plan files: YAML round trips, hand edits, nonsense edits with pointed errors, the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import llama_cpp  # noqa: F401  (load libllama first)
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.planning import memory as mm
from hybrid_gguf.commands import plan as plan_cmd
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.plan import Plan
from hybrid_gguf.planning.planner import make_plan
from hybrid_gguf.routing.profile import RoutingProfile
from hybrid_gguf.routing.replay import Trace, save_trace

OPTS = dict(compute_bytes=mm.MIB, margin_bytes=64 * 1024, margin_fraction=0.01)


def profile_for(inv, seed=0, tokens=3000):
    rng = np.random.default_rng(seed)
    L, E, k = inv.n_layer, inv.n_expert, inv.n_expert_used
    w = 1.0 / np.arange(1, E + 1)
    counts = np.stack([rng.multinomial(tokens * k, rng.permutation(w / w.sum())) for _ in range(L)])
    return RoutingProfile(inv.fingerprint, inv.arch, L, E, k, counts.astype(float), np.zeros((L, E)),
                          np.full(L, float(tokens)), np.zeros(L), sessions=2, labels={"code": 2})


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=3, n_expert=8)
    return path, read_inventory(path)


@pytest.fixture(scope="module")
def plan(model):
    _, inv = model
    opts = mm.MemoryOptions(2048, **OPTS)
    base = mm.predict_memory(inv, None, opts, gpus=["GPU"]).gpu_bytes
    p = make_plan(inv, int(base * 0.8), 2048, profile_for(inv), memory=opts)
    assert p.hot and p.rules and p.profile
    return p


def test_round_trip(plan, model, tmp_path):
    _, inv = model
    text = plan.to_yaml()
    back = Plan.from_yaml(text, inv)
    assert back.to_dict() == plan.to_dict()
    assert back.to_yaml() == text
    path = plan.save(tmp_path / "sub" / "plan.yaml")
    assert Plan.load(path, inv).to_dict() == plan.to_dict()
    # readable: comments, one line per layer of hot experts, sizes spelled out
    assert text.startswith("# hybrid-gguf placement plan")
    for layer, experts in plan.hot.items():
        assert f"  {layer}: [{', '.join(map(str, experts))}]" in text
    assert re.search(r"^budget_bytes: \d+  # [0-9.]+ [KMG]iB$", text, re.M)
    assert back.placement().target_for("blk.0.ffn_down_exps.weight") == plan.placement().target_for(
        "blk.0.ffn_down_exps.weight")


def test_memory_options_and_calibration_are_typed_until_the_file(plan, model):
    from hybrid_gguf.planning.calibration import Bandwidth

    _, inv = model
    assert isinstance(plan.memory, mm.MemoryOptions) and plan.memory == mm.MemoryOptions(2048, **OPTS)
    assert isinstance(plan.predicted.bandwidth, Bandwidth) and set(plan.predicted.speed_terms) == {
        "decode_ms", "prefill_ms", "decode_handoffs"}
    back = Plan.from_yaml(plan.to_yaml(), inv)
    assert back.memory == plan.memory and back.predicted.bandwidth == plan.predicted.bandwidth
    # the file keeps one block for each, as before
    d = plan.to_dict()
    assert d["memory"]["compute_bytes"] == mm.MIB and "n_ctx" not in d["memory"]
    assert d["predicted"]["bandwidth"]["decode_ms"] == plan.predicted.speed_terms["decode_ms"]
    assert d["predicted"]["bandwidth"]["cpu_bytes_per_s"] == plan.predicted.bandwidth.cpu_bytes_per_s
    # a plan without a memory block plans with the defaults for its context
    bare = Plan.from_yaml(re.sub(r"^memory:\n(  .*\n)+", "", plan.to_yaml(), flags=re.M), inv)
    assert bare.memory == mm.MemoryOptions(2048)


def test_json_has_the_promised_keys(plan):
    d = json.loads(json.dumps(plan.to_json_dict()))
    assert {"hot", "predicted_hit_rate", "predicted_decode_tokens_per_s", "gpu_bytes"} <= set(d)
    assert d["hot"] == {str(k): v for k, v in plan.hot.items()}
    assert d["gpu_bytes"] == plan.predicted.gpu_bytes


def test_hand_edit_is_honoured(plan, model):
    _, inv = model
    layer = min(plan.hot)
    text = plan.to_yaml()
    old = f"  {layer}: [{', '.join(map(str, plan.hot[layer]))}]"
    edited = Plan.from_yaml(text.replace(old, f"  {layer}: [7, 0]"), inv)
    assert edited.hot[layer] == [7, 0]
    # "GPU" is the patch's default pack device, so it needs no buft= entry
    named = plan.hot_device and plan.hot_device.upper() != "GPU"
    assert edited.hybrid_plan_text().startswith(f"buft={plan.hot_device};" if named else f"{layer}:")
    # a layer can be dropped by deleting its line, and the whole hot map emptied
    assert layer not in Plan.from_yaml(text.replace(old + "\n", ""), inv).hot


def _line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


@pytest.mark.parametrize("edit,needle,message", [
    (lambda t, l, h: t.replace(h, "  99: [1, 2]"), "  99: [1, 2]", "layer 99 does not exist"),
    (lambda t, l, h: t.replace(h, f"  {l}: [1, 42]"), "[1, 42]", "expert 42 does not exist"),
    (lambda t, l, h: t.replace(h, f"  {l}: [3, 3]"), "[3, 3]", "expert 3 is listed twice"),
    (lambda t, l, h: t.replace(h, f"  {l}: [-1]"), "[-1]", "must not be negative"),
    (lambda t, l, h: t.replace(h, f"  {l}: [1]\n  {l}: [2]"), "  {l}: [2]", "listed twice"),
    (lambda t, l, h: t.replace(h, f"  {l}: [one]"), "[one]", "expected a whole number"),
    (lambda t, l, h: t.replace(h, f"  {l}: 5"), "  {l}: 5", "expected a list"),
    (lambda t, l, h: re.sub(r"^n_ctx: \d+", "n_ctx: -4", t, flags=re.M), "n_ctx: -4", "must be >= 1"),
    (lambda t, l, h: re.sub(r"^budget_bytes: .*", "budget_bytes: -5", t, flags=re.M), "budget_bytes: -5",
     "must not be negative"),
    (lambda t, l, h: t.replace("hot_device:", "hot_devcie:"), "hot_devcie:", "unknown key 'hot_devcie'"),
    (lambda t, l, h: t.replace("device: CPU}", "device: CPU}\n  - {pattern: 'blk.(', device: CPU}"),
     "'blk.('", "malformed placement pattern"),
    (lambda t, l, h: t.replace("type_k: f16", "type_k: f8"), "type_k: f8", "unknown KV cache type"),
    (lambda t, l, h: t.replace("n_ubatch: 512", "n_ubatch: 0"), "n_ubatch: 0", "must be >= 1"),
    (lambda t, l, h: t.replace("backend: per-expert", "backend: magic"), "backend: magic", "unknown backend"),
    # typed again on reading: MemoryOptions' and the calibration's own checks, pointed at their block
    (lambda t, l, h: t.replace("type_v: f16", "type_v: q8_0"), "type_v: q8_0", "needs flash attention"),
    (lambda t, l, h: re.sub(r"cpu_bytes_per_s: \S+", "cpu_bytes_per_s: -1.0", t), "cpu_bytes_per_s: -1.0",
     "cpu_bytes_per_s must be a positive number"),
    # numbers a float cannot hold, or that are not finite
    (lambda t, l, h: re.sub(r"margin_fraction: \S+", "margin_fraction: 1" + "0" * 400, t), "margin_fraction: 1",
     "too large"),
    (lambda t, l, h: re.sub(r"margin_fraction: \S+", "margin_fraction: .nan", t), "margin_fraction: .nan",
     "expected a finite number"),
    (lambda t, l, h: re.sub(r"margin_fraction: \S+", "margin_fraction: 2", t), "margin_fraction: 2",
     "must be at most 1"),
    (lambda t, l, h: re.sub(r"cpu_bytes_per_s: \S+", "cpu_bytes_per_s: .inf", t), "cpu_bytes_per_s: .inf",
     "cpu_bytes_per_s"),
    # the prediction's bytes per device are numbers (status sums them)
    (lambda t, l, h: re.sub(r"^      total: \d+", "      total: abc", t, count=1, flags=re.M), "      total: abc",
     "expected a whole number"),
])
def test_nonsense_edits_point_at_the_line(plan, model, edit, needle, message):
    _, inv = model
    layer = min(plan.hot)
    hot_line = f"  {layer}: [{', '.join(map(str, plan.hot[layer]))}]"
    text = edit(plan.to_yaml(), layer, hot_line)
    with pytest.raises(HybridError) as info:
        Plan.from_yaml(text, inv, source="plan.yaml")
    msg = str(info.value)
    assert message in msg
    assert msg.startswith(f"plan.yaml:{_line_of(text, needle.format(l=layer))}:"), msg


def test_wrong_model_and_broken_files(plan, model, tiny_model_factory, tmp_path):
    _, inv = model
    other = read_inventory(tiny_model_factory("qwen3moe", n_layer=3, n_expert=8, seed=3))
    with pytest.raises(HybridError, match="another model") as info:
        Plan.from_yaml(plan.to_yaml(), other, source="p.yaml")
    assert str(info.value).startswith(f"p.yaml:{_line_of(plan.to_yaml(), 'fingerprint:')}:")
    with pytest.raises(HybridError, match="another model"):
        plan.check_model(other)
    # without an inventory the file still parses (for inspection), range checks use model.n_*
    assert Plan.from_yaml(plan.to_yaml()).hot == plan.hot
    with pytest.raises(HybridError, match="empty"):
        Plan.from_yaml("", inv)
    with pytest.raises(HybridError, match=r"<plan>:\d+: not valid YAML"):
        Plan.from_yaml("format: hybrid-gguf-plan\nhot: [1, 2\n", inv)
    with pytest.raises(HybridError, match="not a hybrid-gguf plan"):
        Plan.from_yaml(plan.to_yaml().replace("format: hybrid-gguf-plan", "format: other"), inv)
    with pytest.raises(HybridError, match="missing key 'n_ctx'"):
        Plan.from_yaml(re.sub(r"^n_ctx: .*\n", "", plan.to_yaml(), flags=re.M), inv)
    with pytest.raises(HybridError, match="does not exist"):
        Plan.load(tmp_path / "nope.yaml")
    dense = read_inventory(tiny_model_factory("dense"))
    with pytest.raises(HybridError):
        Plan.from_yaml(plan.to_yaml(), dense)


# --- the command ---------------------------------------------------------------------------


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _group() -> None:
        pass

    plan_cmd.register(app)
    return app


def invoke(*args, env=None):
    return CliRunner().invoke(make_app(), ["plan", *map(str, args)],
                              env={"COLUMNS": "200", **(env or {})})


def test_cli_json_out_and_loop(model, tmp_path):
    path, inv = model
    prof = profile_for(inv, seed=1)
    prof_path = prof.save(tmp_path / "prof.json")
    out = tmp_path / "plan.yaml"
    env = {"HYBRID_GGUF_HOME": str(tmp_path / "home")}
    args = [path, "--gpu-budget", "17MiB", "--ctx", "1024", "--profile", prof_path, "--margin", "0",
            "--no-calibrate", "--out", out]
    r = invoke(*args, "--json", env=env)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"hot", "predicted_hit_rate", "predicted_decode_tokens_per_s", "gpu_bytes"} <= set(d)
    assert 0 < d["gpu_bytes"] <= 17 * mm.MIB
    patched = hybrid_backend.capability().per_expert
    assert d["backend"] == ("per-expert" if patched else "whole-tensor")
    assert bool(d["hot"]) == patched  # the stock build moves whole layers instead
    saved = Plan.load(out, inv)
    assert saved.to_json_dict()["hot"] == d["hot"]
    # same profile again: --out is the previous plan, nothing changes
    r = invoke(*args, env=env)
    assert r.exit_code == 0, r.output
    assert "plan unchanged" in r.stdout
    # --explain prints the per-device and per-layer tables
    r = invoke(*args, "--explain", env=env)
    assert "memory by device" in r.stdout and "experts per layer" in r.stdout


def test_cli_replay_and_plot(model, tmp_path):
    path, inv = model
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(8, 2, replace=False, p=np.r_[0.5, 0.2, 0.1, 0.1, [0.025] * 4])
                     for _ in range(inv.n_layer)] for _ in range(600)]).astype(np.int32)
    trace = save_trace(tmp_path / "trace.npz", Trace(ids, 8))
    png = tmp_path / "replay.png"
    r = invoke(path, "--gpu-budget", "17MiB", "--ctx", "1024", "--margin", "0", "--no-calibrate",
               "--replay", trace, "--plot", png, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["replay"]
    assert rep["n_eval_tokens"] == 300 and len(rep["rows"]) >= 5
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input(model, tmp_path):
    path, _ = model
    r = invoke(path, "--gpu-budget", "lots")
    assert r.exit_code != 0 and "cannot read size" in str(r.exception)
    r = invoke(tmp_path / "missing.gguf", "--gpu-budget", "1GiB")
    assert r.exit_code != 0 and "not found" in str(r.exception)
    r = invoke(path, "--gpu-budget", "1GiB", "--plot", tmp_path / "x.png", "--no-calibrate")
    assert r.exit_code != 0 and "--replay" in str(r.exception)


# --- the loop (what `run` calls) -------------------------------------------------------------


def test_autoplan_loop_with_store(model, tmp_path, monkeypatch, tiny_model_factory):
    from hybrid_gguf.autoplan import default_plan_path, plan_model
    from hybrid_gguf.llama.loader import load_llama
    from hybrid_gguf.planning.planner import plan_memory
    from hybrid_gguf.routing.profile import ProfileStore

    path, inv = model
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path / "home"))
    store = ProfileStore(tmp_path / "store")
    store.merge_session(profile_for(inv, seed=1))
    out = default_plan_path(inv.fingerprint)
    kw = dict(store=store.root, out=out, calibrate=False, per_expert=True, margin_bytes=0)
    first = plan_model(path, 17 * mm.MIB, 1024, **kw)
    assert first.diff is None and out.exists() and first.plan.hot
    # a session of the same workload: the plan holds
    store.merge_session(profile_for(inv, seed=1, tokens=300))
    again = plan_model(path, 17 * mm.MIB, 1024, **kw)
    assert again.diff is not None and not again.diff.changed
    # a different workload dominates the store: experts move, and the diff says so
    store.merge_session(profile_for(inv, seed=8, tokens=60000))
    moved = plan_model(path, 17 * mm.MIB, 1024, **kw)
    assert moved.diff.changed and moved.diff.hit_after > moved.diff.hit_before
    # the plan's own memory prediction, recomputed from the file, stays in budget
    back = Plan.load(out, inv)
    assert plan_memory(back, inv).gpu_bytes == back.predicted.gpu_bytes <= 17 * mm.MIB
    # a plan file made for another model is never applied, only noted
    foreign_path = tiny_model_factory("qwen3moe", n_layer=3, n_expert=8, seed=2)
    foreign = plan_model(foreign_path, 17 * mm.MIB, 1024, **{**kw, "out": tmp_path / "foreign.yaml"})
    res = plan_model(path, 17 * mm.MIB, 1024, previous_path=tmp_path / "foreign.yaml", **{**kw, "out": None})
    assert res.previous is None and foreign.plan.fingerprint != res.plan.fingerprint
    assert any("another model" in n for n in res.plan.notes)
    # what llama.cpp gets: overrides + context arguments load on this (CPU) machine
    kwargs = back.llama_kwargs()
    assert kwargs["n_ctx"] == 1024 and kwargs["n_gpu_layers"] == -1
    loaded = load_llama(path, back.placement(), verbose=False, n_threads=1, **kwargs)
    loaded.llm.close()


def test_autoplan_says_when_its_speed_prediction_rests_on_default_gpu_figures(model, tmp_path, monkeypatch):
    from dataclasses import replace

    from hybrid_gguf.autoplan import plan_model
    from hybrid_gguf.planning.planner import DeviceBudget
    from hybrid_gguf.planning.calibration import Bandwidth, machine_id, save_calibration

    path, _ = model
    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path))
    gpu = [DeviceBudget("CUDA0", 17 * mm.MIB)]
    kw = dict(devices=gpu, measure=False, per_expert=True, margin_bytes=0)
    cpu_only = replace(Bandwidth(), measured=("cpu_bytes_per_s", "cpu_flops"), machine=machine_id())
    save_calibration(cpu_only)
    notes = plan_model(path, None, 1024, **kw).plan.notes
    assert any("default figures for gpu_bytes_per_s, gpu_layer_s, gpu_step_s, handoff_s, handoff_idle_s" in n
               for n in notes)
    measured = ("cpu_bytes_per_s", "cpu_flops", "gpu_bytes_per_s", "gpu_layer_s", "gpu_step_s", "handoff_s",
                "handoff_idle_s")
    save_calibration(replace(cpu_only, measured=measured))
    assert not any("default figures" in n for n in plan_model(path, None, 1024, **kw).plan.notes)


def test_the_plan_says_when_the_stored_routing_drifts(model, tmp_path, monkeypatch):
    """The plan's predicted hit rate is in sample: the profile holds the stored trace. With a
    trace whose second half routes to other experts than its first, the plan records the
    held-out hit rate (packs chosen from the first half, replayed on the second) and says
    decode may fall short; a steady trace gets the rate and no note."""
    from hybrid_gguf.autoplan import plan_model
    from hybrid_gguf.routing.profile import ProfileStore

    path, inv = model
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path / "home"))
    L, E, k = inv.n_layer, inv.n_expert, inv.n_expert_used
    rng = np.random.default_rng(0)

    def trace(pools):
        ids = np.stack([[rng.choice(pool, size=k, replace=False) for _ in range(L)] for pool in pools])
        return Trace(ids.astype(np.int32), E)

    kw = dict(calibrate=False, per_expert=True, margin_bytes=0, measure=False)
    for name, pools, drifts in (("drifting", [np.arange(3)] * 200 + [np.arange(5, 8)] * 200, True),
                                ("steady", [np.arange(3)] * 400, False)):
        store = ProfileStore(tmp_path / name)
        store.merge_session(profile_for(inv, seed=1))
        store.save_trace(inv.fingerprint, trace(pools))
        plan = plan_model(path, 17 * mm.MIB, 1024, store=store.root, **kw).plan
        assert plan.hot, name
        held_out = plan.predicted.speed_terms["held_out_hit_rate"]
        notes = [n for n in plan.notes if n.startswith("routing drifts")]
        assert bool(notes) == drifts, (name, plan.notes)
        if drifts:
            assert f"hit {held_out:.1%} of its second half" in notes[0] and "--cache auto" in notes[0]
