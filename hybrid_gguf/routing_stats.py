"""Summaries of routing counts ([n_layer, n_expert] selection counts).

Layers without any recorded selection get NaN (entropy, hit rate) or 0 (experts needed).
"""

from __future__ import annotations

from typing import Iterable, Optional

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
