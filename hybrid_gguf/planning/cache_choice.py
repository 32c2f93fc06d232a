"""Which in-session cache a plan's hot packs run as: each policy and upload quota replayed on
the profile's stored routing trace with the patch's rules (routing/cache_sim.py), its decode
speed from the plan's own speed terms (speed.cache_decode_tokens_per_s), the fastest kept.

The replay is held out: the plan's hot set was chosen from a profile that holds the stored
trace itself, so replaying the whole trace scores the static packs on the tokens they were
fitted to. Instead the trace's first half chooses a hot set of the plan's per-layer sizes and
the second half is replayed, as the next session meets routing the profile has not seen (on
the real gpt-oss-20b trace, 2026-12-01: a hot set fitted to the first half hit 0.60 of it and
0.27 of 64 tokens of the second half where its subject changes, where the caches hit 0.43-0.50
and decoded 1.11-1.21x the static packs; over 1024 tokens of the second half the static packs
hit 0.46, a seeded cache 0.55, and decode tied; docs/benchmarks.md, thirteenth and fourteenth
leases)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from hybrid_gguf.planning.placement import CacheOptions

# a policy must beat the static packs by this much to be chosen: the replay and the speed
# model (with the cache's host step, per upload and per layer costs, Bandwidth.cache_step_s,
# cache_upload_s and cache_layer_s) are estimates
MIN_GAIN = 1.02
# each half of a held-out replay needs this many tokens; a shorter trace is replayed whole,
# in sample (and the note says so)
HELD_OUT_MIN_TOKENS = 32


def held_out_hot(trace, hot: Mapping[int, Sequence[int]], stop: int) -> dict:
    """{layer: as many experts as `hot` has there, the most selected in the trace's tokens
    before `stop`}; ties go to the plan's own experts, then to the lower id."""
    counts, _ = trace.counts(0, stop)
    out = {}
    for l, es in hot.items():
        if not len(es) or not 0 <= int(l) < counts.shape[0]:
            continue
        planned = np.zeros(counts.shape[1], dtype=bool)
        planned[[int(e) for e in es if 0 <= int(e) < counts.shape[1]]] = True
        # lexsort: last key first; most selected, then planned, then lower id
        order = np.lexsort((np.arange(counts.shape[1]), ~planned, -counts[int(l)]))
        out[int(l)] = [int(e) for e in order[:len(es)]]
    return out


def _expert_bytes(inv) -> dict:
    return {l.index: l.per_expert_bytes for l in inv.layers if l.is_moe}


def rank_caches(trace, hot: Mapping[int, Sequence[int]], inv, decode_ms: Optional[dict], bw, start: int = 0,
                quotas: Optional[Sequence[int]] = None, terms_hit: Optional[float] = None) -> dict:
    """{name: replay row + predicted_decode_tokens_per_s (None without speed terms)} for the
    static packs and each policy at each quota (routing.cache_sim.predict_cache).
    `terms_hit`: the packs' hit rate `decode_ms` was computed at (default: the replay's static
    row, so the static row predicts `decode_ms` itself)."""
    from hybrid_gguf.planning.speed import cache_decode_tokens_per_s
    from hybrid_gguf.routing.cache_sim import REPLAY_QUOTAS, predict_cache

    rows = predict_cache(trace, hot, inv.n_expert, _expert_bytes(inv), start=start, quotas=quotas or REPLAY_QUOTAS)
    ref = terms_hit if terms_hit is not None else (rows["static"]["hit_rate"] if rows else 0.0)
    for r in rows.values():
        r["predicted_decode_tokens_per_s"] = (
            cache_decode_tokens_per_s(decode_ms, ref, r["hit_rate"], r["upload_bytes_per_token"], bw,
                                      active=r["policy"] != "static", n_cache_layers=len(hot),
                                      uploads_per_token=r["uploads_per_token"])
            if decode_ms else None)
    return rows


def _in_sample_hit(trace, hot: Mapping[int, Sequence[int]], inv) -> float:
    """The static packs' hit rate over the whole trace: what the plan's own speed terms assume
    (its profile holds these tokens)."""
    from hybrid_gguf.routing.cache_sim import predict_cache

    rows = predict_cache(trace, hot, inv.n_expert, _expert_bytes(inv), quotas=())
    return rows["static"]["hit_rate"] if rows else 0.0


def choose_cache(inv, hot: Mapping[int, Sequence[int]], decode_ms: dict, trace, bw, notes: list,
                 quota: Optional[int] = None) -> tuple:
    """(CacheOptions, the ranked rows or None): the fastest predicted cache, static unless a
    policy wins by MIN_GAIN, replayed held out (the module's docstring): the second half of
    the trace over a hot set of `hot`'s sizes chosen from the first half. `quota`: replay only
    that quota (else REPLAY_QUOTAS)."""
    if trace is None:
        notes.append("no stored routing trace for this model: the in-session cache stays static "
                     "(`hybrid-gguf profile MODEL` stores one)")
        return CacheOptions(), None
    quotas = None if quota is None else [quota]
    half = trace.n_tokens // 2
    if half >= HELD_OUT_MIN_TOKENS:
        # static and caches alike are priced from the plan's terms, rescaled from the hit rate
        # those terms assume (in sample) to the held-out ones
        in_sample = _in_sample_hit(trace, hot, inv)
        rows = rank_caches(trace, held_out_hot(trace, hot, half), inv, decode_ms, bw, start=half, quotas=quotas,
                           terms_hit=in_sample)
        where = (f"a hot set chosen from the first {half} of {trace.n_tokens} stored tokens, replayed on the "
                 f"other {trace.n_tokens - half}; the plan's packs hit {in_sample:.1%} of the whole trace, "
                 f"whose tokens its profile holds")
    else:
        rows = rank_caches(trace, hot, inv, decode_ms, bw, quotas=quotas)
        where = (f"replayed in sample on all {trace.n_tokens} stored tokens (under {2 * HELD_OUT_MIN_TOKENS}: "
                 f"too few to hold half out)")
    if not rows:
        return CacheOptions(), None
    rate = {name: r["predicted_decode_tokens_per_s"] or 0.0 for name, r in rows.items()}
    best = max(rows, key=lambda name: rate[name])
    static = rows["static"]
    if best == "static" or rate[best] < MIN_GAIN * rate["static"]:
        notes.append(f"in-session cache: static ({where}: no policy beats the static packs' "
                     f"{static['hit_rate']:.1%} hit rate by enough to pay its uploads)")
        return CacheOptions(), rows
    r = rows[best]
    notes.append(f"in-session cache: {r['policy']} with up to {r['quota']} uploads per step ({where}): hit rate "
                 f"{static['hit_rate']:.1%} -> {r['hit_rate']:.1%} at {r['uploads_per_token']:.2f} uploads per "
                 f"token, predicted {rate['static']:.1f} -> {rate[best]:.1f} tokens/s")
    return CacheOptions(r["policy"], r["quota"]), rows


# a held-out hit rate this far below the in-sample one gets a note in the plan
DRIFT_NOTE = 0.05


def drift_note(plan, inv, trace) -> Optional[str]:
    """How far the stored routing drifts from what the plan's packs were chosen on: sets the
    plan's `held_out_hit_rate` (speed_terms: the static hit rate of packs chosen from the
    trace's first half, over its second half) and returns a note when that is DRIFT_NOTE below
    the packs' hit rate on the tokens they were chosen from. The plan's predicted hit rate
    and decode are in sample, so drift is what they cannot see. None without a trace long
    enough to hold half out, or without packs on a GPU."""
    from hybrid_gguf.routing.cache_sim import predict_cache

    if trace is None or not plan.hot or plan.n_gpu_layers == 0 or trace.n_tokens // 2 < HELD_OUT_MIN_TOKENS:
        return None
    half = trace.n_tokens // 2
    # `cache auto` replayed the same held-out static packs (choose_cache): take its row
    replayed = ((plan.predicted.speed_terms or {}).get("cache_replay") or {}).get("static")
    held_out = replayed["hit_rate"] if replayed else predict_cache(
        trace, held_out_hot(trace, plan.hot, half), inv.n_expert, _expert_bytes(inv), start=half,
        quotas=())["static"]["hit_rate"]
    in_sample = _in_sample_hit(trace, plan.hot, inv)
    plan.predicted.speed_terms = {**(plan.predicted.speed_terms or {}), "held_out_hit_rate": round(held_out, 4)}
    if in_sample - held_out <= DRIFT_NOTE:
        return None
    return (f"routing drifts: packs chosen from the first half of the stored trace hit {held_out:.1%} of its second "
            f"half, against {in_sample:.1%} for this plan's packs over the whole trace (which its profile holds), so "
            f"decode may fall short of the prediction"
            + ("" if plan.cache.active else "; `--cache auto` replays whether an in-session cache recovers it"))
