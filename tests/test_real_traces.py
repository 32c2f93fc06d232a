"""Real routing traces (tests/data/routing, see its README): they load, have the shape of the
model they come from, sit in the real-routing regime, and replay, directly and through
`plan --replay` on a synthetic model of the same shape. Also the converter's input formats."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from hybrid_gguf.routing.replay import Trace, load_trace, replay

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "routing"

# file -> (n_tokens, n_layer, k, n_expert); all GPT-OSS-20B decode traces
TRACES = {
    "gpt-oss-20b_gpqa-genetics.npz": (511, 24, 4, 32),
    "gpt-oss-20b_mmlu-hs-math.npz": (511, 24, 4, 32),
    "gpt-oss-20b_mmlu-law.npz": (511, 24, 4, 32),
    "gpt-oss-20b_tulu3-if.npz": (511, 24, 4, 32),
    "gpt-oss-20b_mixed10.npz": (2367, 24, 4, 32),
}


def _converter():
    spec = importlib.util.spec_from_file_location("convert_routing_trace", ROOT / "scripts" / "convert_routing_trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _converter()


def test_every_shipped_trace_is_listed_and_small():
    shipped = sorted(p.name for p in DATA.glob("*.npz"))
    assert shipped == sorted(TRACES)
    sizes = [(DATA / n).stat().st_size for n in shipped]
    assert max(sizes) < 300 * 1024 and sum(sizes) < 1024 * 1024
    readme = (DATA / "README.md").read_text()
    for name in shipped:
        assert name in readme  # every file has its source and stats written down


@pytest.mark.parametrize("name", sorted(TRACES))
def test_trace_loads_with_model_shape(name):
    n_tokens, n_layer, k, n_expert = TRACES[name]
    t = load_trace(DATA / name)
    assert t.ids.shape == (n_tokens, n_layer, k) and t.n_expert == n_expert
    assert t.ids.min() >= 0 and t.ids.max() < n_expert  # decode traces: every layer routes
    srt = np.sort(t.ids, axis=2)
    assert (np.diff(srt, axis=2) > 0).all()  # k distinct experts per token and layer
    # the loader checks the layer count against a model's
    assert load_trace(DATA / name, n_layer=n_layer).n_layer == n_layer


@pytest.mark.parametrize("name", sorted(TRACES))
def test_trace_is_in_the_real_routing_regime(name):
    t = load_trace(DATA / name)
    s = conv.trace_stats(t.ids, t.n_expert)
    cov = s["coverage"]
    assert 0.3 <= cov["0.25"] <= 0.8  # skewed, not flat (0.25) and not collapsed (1.0)
    assert cov["0.1"] < cov["0.25"] < cov["0.5"] < 1.0
    uniform_top1 = 1 / t.n_expert
    assert 2 * uniform_top1 < s["top1_share"] < 0.5
    # consecutive tokens share more experts than independent draws would (k / n_expert)
    k = t.ids.shape[2]
    assert k / t.n_expert + 0.1 < s["adjacent_overlap"] < 0.9
    rep = s["replay"]
    for key in ("static", "lru", "lfu", "oracle"):
        assert 0.25 < rep[key] < 1.0
    assert rep["oracle"] >= rep["static"] - 1e-9


def test_replay_runs_on_real_traces():
    t = load_trace(DATA / "gpt-oss-20b_mixed10.npz")
    caps = [round(f * t.n_expert) * t.n_layer for f in (0.125, 0.25, 0.5)]
    rep = replay(t, caps)
    assert rep.n_profile_tokens + rep.n_eval_tokens == t.n_tokens
    rows = rep.rows
    assert [r.capacity for r in rows] == caps
    for a, b in zip(rows, rows[1:]):  # more slots never hurt
        assert b.static >= a.static and b.oracle >= a.oracle and b.lru >= a.lru
    # ten different prompts one after the other: the first half's hot set goes stale, so at
    # a quarter resident an LRU cache beats the static plan (measured 0.59 vs 0.47)
    quarter = rows[1]
    assert quarter.lru > quarter.static + 0.05


def test_single_prompt_suits_a_static_plan():
    # one long answer: the profile half predicts the rest; LFU/static beat LRU
    t = load_trace(DATA / "gpt-oss-20b_mmlu-law.npz")
    row = replay(t, [8 * t.n_layer]).rows[0]
    assert row.static > row.lru and row.lfu > row.lru


def test_plan_replay_on_a_model_of_the_trace_shape(tiny_model_factory, tmp_path):
    from typer.testing import CliRunner

    from hybrid_gguf.commands import plan as plan_cmd
    from hybrid_gguf.header.inventory import read_inventory
    import typer

    n_tokens, n_layer, k, n_expert = TRACES["gpt-oss-20b_mmlu-hs-math.npz"]
    path = tiny_model_factory("gpt-oss", n_layer=n_layer, n_expert=n_expert, n_expert_used=k,
                              n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_ff_exp=32)
    inv = read_inventory(path)
    assert (inv.n_layer, inv.n_expert, inv.n_expert_used) == (n_layer, n_expert, k)
    app = typer.Typer()

    @app.callback()
    def _group() -> None:
        pass

    plan_cmd.register(app)
    budget = "16MiB"  # about half of the experts (18 MiB of them) beside the rest of the model
    r = CliRunner().invoke(app, ["plan", str(path), "--gpu-budget", budget, "--ctx", "512", "--margin", "0",
                                 "--no-calibrate", "--replay", str(DATA / "gpt-oss-20b_mmlu-hs-math.npz"),
                                 "--json"], env={"COLUMNS": "200", "HYBRID_GGUF_HOME": str(tmp_path)})
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["replay"]
    assert rep["n_profile_tokens"] + rep["n_eval_tokens"] == n_tokens
    assert abs(rep["n_profile_tokens"] - n_tokens / 2) <= 1
    assert len(rep["rows"]) >= 5 and any("this plan" in row["label"] for row in rep["rows"])
    for row in rep["rows"]:
        assert 0.0 <= row["static"] <= row["oracle"] + 1e-9 <= 1.0 + 1e-9
    # this plan's packs as an in-session cache, on the same real decode tokens
    cache = rep["cache"]
    assert cache, "the replay's plan at this budget has hot packs"
    if cache:
        assert set(cache) == {"static"} | {f"{p} q{q}" for p in ("lru", "lfu", "seeded") for q in (4, 16, 64)}
        assert cache["static"]["uploads_per_token"] == 0.0
        assert all(0.0 <= c["hit_rate"] <= 1.0 for c in cache.values())
        for q in (4, 16, 64):
            assert 0 < cache[f"lru q{q}"]["uploads_per_token"] <= q  # the quota per step
        # real routing's short-term reuse: a cache beats the static packs on these tokens
        assert cache["static"]["hit_rate"] < cache["lru q4"]["hit_rate"]
        for c in cache.values():
            assert c["predicted_decode_tokens_per_s"] > 0


def test_load_rejects_a_trace_of_another_shape():
    from hybrid_gguf.errors import HybridError

    with pytest.raises(HybridError, match="24 layers"):
        load_trace(DATA / "gpt-oss-20b_mmlu-law.npz", n_layer=3)


# --- the converter's input formats (made-up inputs, format checks only) -------------------


def test_convert_fingerprint_format(tmp_path):
    doc = {"router_data": [
        {"token_7": {"layer_0": {"selected_experts": [3, 1], "selected_probs": [0.6, 0.4]},
                     "layer_1": {"selected_experts": [0, 2], "selected_probs": [0.5, 0.5]}}},
        {"token_8": {"layer_0": {"selected_experts": [3, 2], "selected_probs": [0.7, 0.3]},
                     "layer_1": {"selected_experts": [1, 2], "selected_probs": [0.9, 0.1]}}},
    ]}
    src = tmp_path / "a.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "a.npz"
    assert conv.main(["--format", "fingerprint", "--n-expert", "4", "-o", str(out), str(src), str(src)]) == 0
    t = load_trace(out)
    assert t.n_expert == 4 and t.ids.shape == (4, 2, 2)
    assert t.ids[:, 0].tolist() == [[3, 1], [3, 2], [3, 1], [3, 2]]


def test_convert_records_format(tmp_path):
    lines = [{"type": "meta", "model_id": "x"}]
    # layer-major order, two sequences, one missing decision (seq 1, layer 1, token 1)
    for seq, n in ((0, 3), (1, 2)):
        for layer in range(2):
            for tok in range(n):
                if (seq, layer, tok) == (1, 1, 1):
                    continue
                lines.append({"problem_id": seq, "layer": layer, "token_idx": tok,
                              "experts": [(tok + layer) % 4, (tok + layer + 1) % 4]})
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    ids, n_expert = conv.convert([src], "records", n_expert=4, seq_key="problem_id")
    assert ids.shape == (5, 2, 2) and n_expert == 4
    assert ids[4, 1].tolist() == [-1, -1]  # not routed
    assert ids[3, 1].tolist() == [1, 2]
    t = Trace(ids.astype(np.int32), n_expert)
    assert replay(t, [4]).rows[0].oracle > 0


def test_convert_refuses_pickles(tmp_path):
    p = tmp_path / "traces.pkl"
    p.write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="pickle"):
        conv.convert([p], "records")


@pytest.mark.needs_patched
def test_real_trace_replays_through_the_patch_override(synth_cache, require_patch_v3):
    """The gpt-oss-20b trace drives a model of its shape through the real kernels: the
    recorder sees exactly the trace's routing, and the preset it informs matches it."""
    from routing_record import record_routing

    from hybrid_gguf.routing import process as rp
    from hybrid_gguf import synth

    trace = load_trace(DATA / "gpt-oss-20b_mixed10.npz")
    n = 384
    ids = trace.ids[:n]
    path = synth.ensure_synthetic(synth.SynthSpec(n_layer=24, n_expert=32, n_expert_used=4, n_embd=64,
                                                  n_head=2, head_dim=32, n_ff_exp=32, seed=5), synth_cache)
    seen = record_routing(path, n, ids)
    # the last layer routes only kept rows during a prompt: compare the others
    assert np.array_equal(np.sort(seen[:, :-1], axis=2), np.sort(ids[:, :-1], axis=2))
    # the gpt-oss-like preset was fitted to this trace's statistics
    real = rp.measure(trace.ids, 32)
    target = rp.preset("gpt-oss-like")
    assert abs(real["coverage_25"] - target.coverage_25) <= 0.03
    assert abs(real["lru_25"] - target.lru_25) <= 0.03


def test_a_trace_file_is_bounded_before_it_is_read(tmp_path):
    """An .npz whose header declares a huge array fails with one line, before allocating."""
    import zipfile

    from hybrid_gguf.errors import HybridError

    bad = tmp_path / "huge.npz"
    header = {"descr": "<i4", "fortran_order": False, "shape": (10**9, 48, 8)}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("ids.npy", buf.getvalue())  # the header only: reading the data would fail anyway
    with pytest.raises(HybridError, match="larger than a routing trace"):
        load_trace(bad)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 2, 2), dtype=np.int32))
    with pytest.raises(HybridError, match="npz"):
        load_trace(plain)
