"""Summaries of routing counts ([n_layer, n_expert] selection counts), and the per-expert
selection probabilities they stand for.

Layers without any recorded selection get NaN (entropy, hit rate) or 0 (experts needed).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / np.where(total > 0, total, 1), np.nan)


def normalized_entropy(counts: np.ndarray) -> np.ndarray:
    """Per layer: entropy of the selection distribution / log(n_expert); 1 = uniform."""
    p = _shares(counts)
    n_expert = p.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    h = h / np.log(n_expert) if n_expert > 1 else np.zeros_like(h)
    h = np.maximum(h, 0.0)  # no -0.0 for a one-expert layer
    return np.where(np.isnan(p[:, 0]), np.nan, h)


def experts_for_coverage(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per layer: fewest experts whose selections reach `fraction` of the layer's total."""
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros(counts.shape[0], dtype=np.int64)
    for layer, row in enumerate(counts):
        total = row.sum()
        if total <= 0:
            continue
        cum = np.cumsum(np.sort(row)[::-1])
        # small tolerance: float sums of shares that should hit the target exactly
        out[layer] = int(np.searchsorted(cum, fraction * total * (1 - 1e-12)) + 1)
    return out


def top_experts(counts: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """Per layer: the k most selected experts as (expert id, share of selections)."""
    p = _shares(counts)
    result = []
    for row in p:
        if np.isnan(row[0]):
            result.append([])
            continue
        order = np.argsort(-row, kind="stable")[:k]
        result.append([(int(e), float(row[e])) for e in order if row[e] > 0])
    return result


def static_hit_rate(counts: np.ndarray, slots: int) -> np.ndarray:
    """Per layer: best share of selections a fixed set of `slots` experts could serve."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1)
    best = np.sort(counts, axis=1)[:, ::-1][:, : max(0, slots)].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, best / np.where(total > 0, total, 1), np.nan)


def overall_hit_rate(counts: np.ndarray, slots: int) -> float:
    """static_hit_rate pooled over layers (weighted by each layer's selections)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    best = np.sort(counts, axis=1)[:, ::-1][:, : max(0, slots)].sum()
    return float(best / total)


def default_slots(n_expert: int, n_expert_used: int) -> list[int]:
    """Static-set sizes worth reporting: top-k, a quarter and half of the experts."""
    cands = {n_expert_used, max(1, n_expert // 4), max(1, n_expert // 2)}
    return sorted(s for s in cands if 0 < s <= n_expert)


def _clean(x: float) -> Optional[float]:
    return None if x is None or np.isnan(x) else round(float(x), 6)


def summarize(counts: np.ndarray, tokens_per_layer: np.ndarray, n_expert_used: int,
              slots: Optional[Iterable[int]] = None, top_k: int = 5) -> dict:
    """JSON-ready summaries: one dict per layer plus pooled figures."""
    counts = np.asarray(counts, dtype=np.float64)
    n_layer, n_expert = counts.shape
    slots = sorted(set(slots)) if slots else default_slots(n_expert, n_expert_used)
    ent = normalized_entropy(counts)
    n50 = experts_for_coverage(counts, 0.5)
    n90 = experts_for_coverage(counts, 0.9)
    tops = top_experts(counts, top_k)
    hits = {s: static_hit_rate(counts, s) for s in slots}
    layers = []
    for layer in range(n_layer):
        layers.append({
            "layer": layer,
            "tokens": float(tokens_per_layer[layer]),
            "selections": float(counts[layer].sum()),
            "entropy": _clean(ent[layer]),
            "experts_50": int(n50[layer]),
            "experts_90": int(n90[layer]),
            "top": [[e, round(s, 6)] for e, s in tops[layer]],
            "static_hit": {str(s): _clean(hits[s][layer]) for s in slots},
        })
    valid = ~np.isnan(ent)
    return {
        "slots": slots,
        "layers": layers,
        "overall": {
            "mean_entropy": _clean(float(np.mean(ent[valid]))) if valid.any() else None,
            "mean_experts_50": float(np.mean(n50[valid])) if valid.any() else None,
            "mean_experts_90": float(np.mean(n90[valid])) if valid.any() else None,
            "static_hit": {str(s): _clean(overall_hit_rate(counts, s)) for s in slots},
        },
    }


# --- counts -> selection probabilities (what the planner's speed model reads) ----------------


def selection_probs(counts: np.ndarray, tokens: np.ndarray, n_used: Sequence[int],
                    prior: float = 1.0) -> np.ndarray:
    """Expected selections of each expert per token, [n_layer, n_expert]; rows sum to k.

    `prior` pseudo-selections per expert shrink small profiles towards uniform routing
    (a few hundred tokens make the top experts look hotter than they are). A layer
    without tokens is uniform.
    """
    counts = np.asarray(counts, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    L, E = counts.shape
    p = np.zeros((L, E))
    for l in range(L):
        k = float(n_used[l]) if l < len(n_used) else 0.0
        if k <= 0:
            continue
        denom = tokens[l] + prior * E / k
        p[l] = (counts[l] + prior) / denom if denom > 0 else k / E
    return p


def profile_probs(profile, inv=None, prior: float = 1.0) -> np.ndarray:
    """selection_probs of a RoutingProfile (per-layer k from the inventory when given)."""
    k = [layer.n_expert_used for layer in inv.layers] if inv is not None else \
        [profile.n_expert_used] * profile.n_layer
    return selection_probs(profile.counts, profile.tokens_per_layer, k, prior)


# Decode routing is estimated from the profile's decode-phase counts, shrunk towards the
# whole profile's rates with this many pseudo-tokens: prompts (prefill of the user's text)
# and the model's own output can route differently, and decode is where the hit rate
# decides the speed; a profile with few decoded tokens predicts decode from its prompts.
DECODE_PRIOR_TOKENS = 256


def decode_probs(profile, inv=None, prior: float = 1.0,
                 strength: float = DECODE_PRIOR_TOKENS) -> np.ndarray:
    """Expected selections per decoded token, [n_layer, n_expert]; rows sum to k."""
    p_all = profile_probs(profile, inv, prior)
    td = np.asarray(profile.tokens_decode, dtype=np.float64)[:, None]
    return (np.asarray(profile.counts_decode, dtype=np.float64) + strength * p_all) / (td + strength)


# --- what a workload's routing means for placement (profile --json "routing_stats") -----------

COVERAGE_FRACTIONS = (0.1, 0.25, 0.5)


def top1_share(counts: np.ndarray) -> Optional[float]:
    """Share of selections taken by each layer's most used expert, pooled over layers."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return None if total <= 0 else float(counts.max(axis=1).sum() / total)


def coverage(counts: np.ndarray, fractions: Iterable[float] = COVERAGE_FRACTIONS) -> dict:
    """{"0.25": share of selections taken by the top 25 % of each layer's experts, ...}."""
    n_expert = np.asarray(counts).shape[1]
    return {str(f): _clean(overall_hit_rate(counts, max(1, round(f * n_expert)))) for f in fractions}


def adjacent_overlap(ids: np.ndarray) -> Optional[float]:
    """Mean share of a token's experts (per layer) that the previous token also used.
    ids: [n_tokens, n_layer, k], -1 where a layer did not route the token."""
    ids = np.asarray(ids)
    if ids.shape[0] < 2:
        return None
    cur, prev = ids[1:], ids[:-1]
    both = (cur >= 0).any(axis=2) & (prev >= 0).any(axis=2)
    if not both.any():
        return None
    shared = (cur[..., :, None] == prev[..., None, :]).any(axis=3) & (cur >= 0)
    used = (cur >= 0).sum(axis=2)
    share = shared.sum(axis=2) / np.maximum(used, 1)
    return float(share[both].mean())


def lru_hit_rate(ids: np.ndarray, slots_per_layer: int, n_expert: Optional[int] = None,
                 warm_fraction: float = 0.25) -> Optional[float]:
    """Hit rate of one LRU cache of slots_per_layer * n_layer experts over the trace's
    selections in time order, counted after the first warm_fraction of the tokens."""
    from hybrid_gguf.routing.replay import Trace, _accesses, lru_hits

    ids = np.asarray(ids, dtype=np.int32)
    n_expert = int(n_expert or ids.max() + 1)
    trace = Trace(ids, n_expert)
    split = int(trace.n_tokens * warm_fraction)
    items = _accesses(trace, split)
    if len(items) == 0:
        return None
    hits, _ = lru_hits(_accesses(trace, 0, split), items, slots_per_layer * trace.n_layer)
    return hits / len(items)


def workload_stats(counts: np.ndarray, ids: Optional[np.ndarray] = None) -> dict:
    """Coverage, top-1 share and, with a trace, adjacent overlap and the replayed hit rates
    (static plan from the first half, LRU, LFU, oracle) with 25 % of the experts resident."""
    counts = np.asarray(counts, dtype=np.float64)
    n_layer, n_expert = counts.shape
    out: dict = {"coverage": coverage(counts), "top1_share": _clean(top1_share(counts)),
                 "adjacent_overlap": None, "replay": None}
    if ids is not None and np.asarray(ids).shape[0] >= 4:
        from hybrid_gguf.routing.replay import Trace, replay

        ids = np.asarray(ids, dtype=np.int32)
        out["adjacent_overlap"] = _clean(adjacent_overlap(ids))
        slots = max(1, round(n_expert / 4)) * n_layer
        row = replay(Trace(ids, n_expert), [slots]).rows[0]
        out["replay"] = {"resident": 0.25, "static": _clean(row.static), "lru": _clean(row.lru),
                         "lfu": _clean(row.lfu), "oracle": _clean(row.oracle)}
    return out


def suitability(stats: dict, margin: float = 0.05) -> str:
    """One sentence: does this workload suit a static plan or a dynamic cache?"""
    rep = stats.get("replay")
    cov = stats["coverage"].get("0.25")
    if not rep:
        if cov is None:
            return "no routing recorded yet."
        return (f"the top quarter of experts takes {cov:.0%} of selections; record a trace "
                "(longer runs) to compare a static plan with a dynamic cache.")
    dyn = max(rep["lru"] or 0.0, rep["lfu"] or 0.0)
    if dyn > (rep["static"] or 0.0) + margin:
        return (f"suits a dynamic cache: with a quarter of the experts resident a cache would hit "
                f"{dyn:.0%} against {rep['static']:.0%} for a static plan (strong short-term reuse).")
    return (f"suits a static plan: it would hit {rep['static']:.0%} with a quarter of the experts "
            f"resident, and a dynamic cache {dyn:.0%}.")
