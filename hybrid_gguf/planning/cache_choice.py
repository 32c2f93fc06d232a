"""Which in-session cache a plan's hot packs run as: each policy and upload quota replayed on
the profile's stored routing trace with the patch's rules (routing/cache_sim.py), its decode
speed from the plan's own speed terms (speed.cache_decode_tokens_per_s), the fastest kept."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from hybrid_gguf.planning.placement import CacheOptions

# a policy must beat the static packs by this much to be chosen: the replay and the speed
# model (with the cache's host step and per-layer cost, Bandwidth.cache_step_s and
# cache_layer_s) are estimates
MIN_GAIN = 1.02


def rank_caches(trace, hot: Mapping[int, Sequence[int]], inv, decode_ms: Optional[dict], bw, start: int = 0,
                quotas: Optional[Sequence[int]] = None) -> dict:
    """{name: replay row + predicted_decode_tokens_per_s (None without speed terms)} for the
    static packs and each policy at each quota (routing.cache_sim.predict_cache)."""
    from hybrid_gguf.planning.speed import cache_decode_tokens_per_s
    from hybrid_gguf.routing.cache_sim import REPLAY_QUOTAS, predict_cache

    sizes = {l.index: l.per_expert_bytes for l in inv.layers if l.is_moe}
    rows = predict_cache(trace, hot, inv.n_expert, sizes, start=start, quotas=quotas or REPLAY_QUOTAS)
    static_hit = rows["static"]["hit_rate"] if rows else 0.0
    for r in rows.values():
        r["predicted_decode_tokens_per_s"] = (
            cache_decode_tokens_per_s(decode_ms, static_hit, r["hit_rate"], r["upload_bytes_per_token"], bw,
                                      active=r["policy"] != "static", n_cache_layers=len(hot))
            if decode_ms else None)
    return rows


def choose_cache(inv, hot: Mapping[int, Sequence[int]], decode_ms: dict, trace, bw, notes: list,
                 quota: Optional[int] = None) -> tuple:
    """(CacheOptions, the ranked rows or None): the fastest predicted cache over `hot`, static
    unless a policy wins by MIN_GAIN. `quota`: replay only that quota (else REPLAY_QUOTAS)."""
    if trace is None:
        notes.append("no stored routing trace for this model: the in-session cache stays static "
                     "(`hybrid-gguf profile MODEL` stores one)")
        return CacheOptions(), None
    rows = rank_caches(trace, hot, inv, decode_ms, bw, quotas=None if quota is None else [quota])
    if not rows:
        return CacheOptions(), None
    rate = {name: r["predicted_decode_tokens_per_s"] or 0.0 for name, r in rows.items()}
    best = max(rows, key=lambda name: rate[name])
    static = rows["static"]
    if best == "static" or rate[best] < MIN_GAIN * rate["static"]:
        notes.append(f"in-session cache: static (replayed on {trace.n_tokens} stored tokens, no policy beats the "
                     f"static packs' {static['hit_rate']:.1%} hit rate by enough to pay its uploads)")
        return CacheOptions(), rows
    r = rows[best]
    notes.append(f"in-session cache: {r['policy']} with up to {r['quota']} uploads per step, replayed on "
                 f"{trace.n_tokens} stored tokens: hit rate {static['hit_rate']:.1%} -> {r['hit_rate']:.1%} at "
                 f"{r['uploads_per_token']:.2f} uploads per token, predicted {rate['static']:.1f} -> "
                 f"{rate[best]:.1f} tokens/s")
    return CacheOptions(r["policy"], r["quota"]), rows
