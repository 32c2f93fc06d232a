"""Routing presets: the generated process, its fit to the targets, and its replay through the
patched llama.cpp (the recorder must see exactly the preset's routing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from routing_record import record_routing

from hybrid_gguf.routing import process as rp
from hybrid_gguf import synth
from hybrid_gguf.errors import HybridError
from hybrid_gguf.routing.stats import adjacent_overlap, lru_hit_rate, workload_stats


def test_generated_rows_are_distinct_in_range_and_deterministic():
    ids = rp.generate(300, 3, 16, 4, s=0.8, r=0.6, seed=5)
    assert ids.shape == (300, 3, 4) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4).tolist())
    assert np.array_equal(ids, rp.generate(300, 3, 16, 4, s=0.8, r=0.6, seed=5))
    assert not np.array_equal(ids, rp.generate(300, 3, 16, 4, s=0.8, r=0.6, seed=6))


@pytest.mark.parametrize("shape", [(32, 4), (128, 8)])
def test_realistic_fit_meets_its_targets(shape):
    n_expert, k = shape
    target = rp.preset("realistic")
    m = rp.measure(rp.trace_for("realistic", 1024, 6, n_expert, k, seed=11), n_expert)
    assert abs(m["coverage_25"] - target.coverage_25) <= 0.03, m
    assert abs(m["lru_25"] - target.lru_25) <= 0.03, m


def test_flat_is_near_uniform_and_reuse_raises_lru():
    m = rp.measure(rp.trace_for("flat", 1024, 6, 32, 4, seed=2), 32)
    assert m["coverage_25"] < 0.31 and m["lru_25"] < 0.35
    no_reuse = rp.measure(rp.generate(1024, 6, 32, 4, s=0.78, r=0.0, seed=2), 32)
    reuse = rp.measure(rp.generate(1024, 6, 32, 4, s=0.78, r=0.68, seed=2), 32)
    assert reuse["lru_25"] > no_reuse["lru_25"] + 0.2
    assert abs(reuse["coverage_25"] - no_reuse["coverage_25"]) < 0.06


def test_adjacent_overlap_and_lru_on_a_known_trace():
    # layer 0 repeats {0, 1} forever; layer 1 alternates {0, 1} and {2, 3}
    ids = np.zeros((8, 2, 2), dtype=np.int32)
    ids[:, 0] = [0, 1]
    ids[:, 1] = [[0, 1] if t % 2 == 0 else [2, 3] for t in range(8)]
    assert adjacent_overlap(ids) == pytest.approx(0.5)
    # one cache for both layers: 6 distinct experts in all, each token uses 4
    assert lru_hit_rate(ids, slots_per_layer=3, n_expert=4) == pytest.approx(1.0)
    assert lru_hit_rate(ids, slots_per_layer=2, n_expert=4) == pytest.approx(0.5)  # layer 0 hits only
    assert lru_hit_rate(ids, slots_per_layer=1, n_expert=4) == 0.0
    stats = workload_stats(rp.counts_of(ids, 4), ids)
    # the top quarter is one expert: half of layer 0's 16 selections, a quarter of layer 1's
    assert stats["coverage"]["0.25"] == pytest.approx((8 + 4) / 32)
    assert stats["top1_share"] == pytest.approx((8 + 4) / 32)
    assert stats["coverage"]["0.5"] == pytest.approx((16 + 8) / 32)
    assert set(stats["replay"]) == {"resident", "static", "lru", "lfu", "oracle"}


def test_unknown_preset_and_bad_spec_are_refused():
    with pytest.raises(HybridError, match="unknown routing preset"):
        rp.preset("typical")
    with pytest.raises(HybridError, match="no trace"):
        rp.fit("optimistic", 32, 4)
    with pytest.raises(HybridError):
        synth.SynthSpec(routing="realistic", n_expert=0, arch="llama").validate()


# --- through llama.cpp ------------------------------------------------------------------------

def _routed_spec(routing: str) -> synth.SynthSpec:
    return synth.SynthSpec(n_layer=4, n_expert=32, n_expert_used=4, n_embd=64, n_head=2, head_dim=32,
                           n_ff_exp=32, routing=routing, seed=4)


def _record(path, n_tokens: int, route: bool = True):
    """What the recorder saw over n_tokens prompt tokens, and the model's trace (or None)."""
    from hybrid_gguf.header.inventory import read_inventory

    trace = rp.model_trace(read_inventory(path), n_tokens + 8) if route else None
    return record_routing(path, n_tokens, trace), trace


@pytest.mark.needs_patched
@pytest.mark.parametrize("routing", ["realistic", "flat"])
def test_recorder_sees_the_preset(routing, synth_cache, require_patch_v3):
    path = synth.ensure_synthetic(_routed_spec(routing), synth_cache)
    ids, trace = _record(path, 1024)
    # qwen3moe's last layer routes only the rows whose logits are kept: compare the others
    full = ids[:, :-1]
    assert np.array_equal(np.sort(full, axis=2), np.sort(trace[:1024, :-1], axis=2))
    m = rp.measure(full, 32)
    target = rp.preset(routing)
    assert abs(m["coverage_25"] - target.coverage_25) <= 0.03, m
    assert abs(m["lru_25"] - target.lru_25) <= 0.03, m


@pytest.mark.needs_patched
def test_trace_is_off_for_other_models(synth_cache, tiny_model, require_patch_v3):
    """A routed model in the same process leaves an ordinary model's routing alone."""
    plain = synth.ensure_synthetic(_routed_spec(""), synth_cache)
    before, _ = _record(plain, 128, route=False)
    _record(synth.ensure_synthetic(_routed_spec("realistic"), synth_cache), 128)
    after, _ = _record(plain, 128, route=False)
    assert np.array_equal(before, after)


@pytest.mark.needs_patched
def test_profile_json_reports_routing_stats(synth_cache, tmp_path, require_patch_v3):
    from typer.testing import CliRunner

    from hybrid_gguf.cli import app

    path = synth.ensure_synthetic(_routed_spec("realistic"), synth_cache)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 200)
    res = CliRunner().invoke(app, ["profile", str(path), "--text", str(text), "--chunk-chars", "1500",
                                   "-n", "16", "--ctx", "1024", "--json", "--no-store",
                                   "--trace", str(tmp_path / "t.npz")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)["routing_stats"]
    assert set(stats["coverage"]) == {"0.1", "0.25", "0.5"}
    assert abs(stats["coverage"]["0.25"] - 0.52) <= 0.05
    assert stats["adjacent_overlap"] > 0.5
    rep = stats["replay"]
    assert rep["lru"] > rep["static"]  # strong short-term reuse
    assert rep["oracle"] >= rep["static"] - 1e-9
    assert (tmp_path / "t.npz").exists()


def test_profile_trace_is_the_routing_the_bench_profile_saw():
    """bench's per-expert-cache-auto rows replay what the profile saw: a trace file's first half
    (cut, never wrapped), a preset's profile stream, nothing for the model's own routing."""
    from types import SimpleNamespace

    from hybrid_gguf.routing.replay import load_trace

    source = "tests/data/routing/gpt-oss-20b_mixed10.npz"
    whole = load_trace(source).ids
    oss = SimpleNamespace(n_layer=24, n_expert=32, n_expert_used=4, metadata={})
    first_half = rp.profile_trace(oss, 10**6, rp.TRACE_PREFIX + source)
    assert first_half.n_tokens == whole.shape[0] // 2 and first_half.n_expert == 32
    assert np.array_equal(first_half.ids, whole[:whole.shape[0] // 2])
    assert np.array_equal(rp.profile_trace(oss, 100, rp.TRACE_PREFIX + source).ids, whole[:100])
    q30 = SimpleNamespace(n_layer=4, n_expert=16, n_expert_used=2, metadata={})
    assert np.array_equal(rp.profile_trace(q30, 64, "realistic").ids,
                          rp.model_trace(q30, 64, rp.STREAM_PROFILE, "realistic"))
    assert rp.profile_trace(q30, 64) is None


def test_the_decode_window_names_the_trace_rows_every_rep_replays():
    """A trace file is indexed by position, so a bench's decode replays rows --pp.. of its timed
    (second) half in every rep, wrapped past its end; the bench says so (fourteenth lease: a
    64-token window where the trace changes subject made a cache look 1.20x)."""
    from types import SimpleNamespace

    from hybrid_gguf.routing.replay import load_trace

    source = "tests/data/routing/gpt-oss-20b_mixed10.npz"
    n = load_trace(source).ids.shape[0]
    measured = n - n // 2
    oss = SimpleNamespace(n_layer=24, n_expert=32, n_expert_used=4, metadata={})
    window = rp.decode_window(oss, 256, 64, rp.TRACE_PREFIX + source)
    assert window == {"first_row": 256, "rows": 64, "of": measured}
    # the rows the timed loads replay are those rows of the second half
    timed = rp.model_trace(oss, 256 + 64, rp.STREAM_MEASURED, rp.TRACE_PREFIX + source)
    assert np.array_equal(timed[256:], load_trace(source).ids[n // 2 + 256:n // 2 + 320])
    assert rp.decode_window(oss, measured + 5, 8, rp.TRACE_PREFIX + source)["first_row"] == 5
    q30 = SimpleNamespace(n_layer=4, n_expert=16, n_expert_used=2, metadata={})
    assert rp.decode_window(q30, 256, 64, "realistic") is None and rp.decode_window(q30, 256, 64) is None
