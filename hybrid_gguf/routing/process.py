"""Routing as a controlled input: expert-selection traces that follow a stated process.

Random-weight models concentrate their routing by themselves (the top quarter of experts
took 95 % of selections in this project's Q30B-shaped generator), far more than real MoE
models do. Benchmarks need routing that looks like a real model's, so a bench model can
carry a routing preset: the hybrid patch (version 3) then replaces each MoE layer's top-k
choice with a trace generated here, while the router's probabilities at those experts
still weight the outputs, so the real kernels do the real work.

The process, per layer and token:
- popularity: experts ranked by a random per-layer permutation, drawn with weight
  rank^-s (sampling without replacement, k experts per token);
- short-term reuse: each of the k slots repeats one of the previous token's experts with
  probability r, otherwise it draws by popularity.
`s` and `r` are fitted per model shape (n_expert, top-k) so that the trace's coverage of
the top quarter of experts and the hit rate of an LRU cache holding a quarter of them match
the preset's targets. Targets and their sources: docs/routing.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hybrid_gguf.errors import HybridError

# GGUF metadata key naming a bench model's routing preset
ROUTING_KEY = "hybrid_gguf.routing"


@dataclass(frozen=True)
class RoutingPreset:
    name: str
    description: str
    coverage_25: Optional[float]   # share of selections taken by the top 25 % of experts
    lru_25: Optional[float]        # hit rate of an LRU cache holding 25 % of the experts
    source: str


PRESETS: dict[str, RoutingPreset] = {
    "realistic": RoutingPreset(
        "realistic", "Qwen3-30B-A3B-like: flat popularity, strong short-term reuse", 0.52, 0.78,
        "Qwen3-30B-A3B: 90 % of selections need 45-51 % of the experts, top expert 4-6 %; "
        "LRU with 25 % resident hits 67-87 % on large MoE models (Qwen3-235B about 80 %)"),
    "gpt-oss-like": RoutingPreset(
        "gpt-oss-like", "gpt-oss-20b-like: the top quarter takes about half, weaker reuse", 0.55, 0.59,
        "gpt-oss-20b: top 25 % of experts take about 51 % of selections (41-63 % by layer), "
        "top expert 8.6 % (published); a real 2367-token gpt-oss-20b decode trace over ten task "
        "domains (tests/data/routing) measures 54.5 % and an LRU hit rate of 58.6 %"),
    "flat": RoutingPreset(
        "flat", "near-uniform popularity, weak reuse (a worst case for any placement)", 0.27, 0.30,
        "none: a lower bound; uniform routing gives 25 % for both"),
    "optimistic": RoutingPreset(
        "optimistic", "the synthetic weights' own routing (very concentrated; no trace)", None, None,
        "this project's random-weight generator: top 25 % take about 95 %"),
}


def preset(name: str) -> RoutingPreset:
    if name not in PRESETS:
        raise HybridError(f"unknown routing preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def quarter(n_expert: int) -> int:
    """Experts in "the top 25 %" and in a 25 % cache (at least one)."""
    return max(1, round(n_expert / 4))


# --- the process ---------------------------------------------------------------------------


# Streams of one model's routing: the same expert popularity, different tokens. A bench
# profiles on one stream and times another, as a user's profile comes from other text than
# the session it plans for.
STREAM_MEASURED = 0
STREAM_PROFILE = 1


def generate(n_tokens: int, n_layer: int, n_expert: int, n_used: int, s: float, r: float,
             seed: int = 0, stream: int = STREAM_MEASURED) -> np.ndarray:
    """int32 [n_tokens, n_layer, n_used] expert ids, distinct within each (token, layer).
    `seed` fixes the experts' popularity, `stream` the token-by-token draws."""
    if not (0 < n_used <= n_expert) or n_tokens <= 0 or n_layer <= 0:
        raise HybridError(f"cannot generate routing for {n_tokens} tokens, {n_layer} layers, "
                          f"top-{n_used} of {n_expert}")
    popularity_rng = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1 + stream])
    rank_weight = -s * np.log(np.arange(1, n_expert + 1, dtype=np.float64))
    # per layer: expert e has log-weight rank_weight[rank of e]
    log_w = np.stack([rank_weight[popularity_rng.permutation(n_expert)] for _ in range(n_layer)])
    out = np.empty((n_tokens, n_layer, n_used), dtype=np.int32)
    rows = np.arange(n_layer)[:, None]
    prev = None
    for t in range(n_tokens):
        # Gumbel top-k: k draws without replacement, proportional to the weights
        keys = log_w + rng.gumbel(size=(n_layer, n_expert))
        if prev is not None and r > 0:
            reuse = rng.random((n_layer, n_used)) < r
            keys[rows, prev] = np.where(reuse, np.inf, keys[rows, prev])
        top = np.argpartition(-keys, n_used - 1, axis=1)[:, :n_used]
        out[t] = top
        prev = top
    return out


def measure(ids: np.ndarray, n_expert: int) -> dict:
    """Coverage of the top 25 %, LRU hit rate with 25 % of the experts resident (one cache
    for all layers, warmed on the first quarter of the tokens), adjacent-token overlap."""
    from hybrid_gguf.routing.stats import adjacent_overlap, lru_hit_rate, overall_hit_rate

    counts = counts_of(ids, n_expert)
    q = quarter(n_expert)
    return {
        "coverage_25": overall_hit_rate(counts, q),
        "lru_25": lru_hit_rate(ids, q, n_expert),
        "adjacent_overlap": adjacent_overlap(ids),
    }


def counts_of(ids: np.ndarray, n_expert: int) -> np.ndarray:
    n_layer = ids.shape[1]
    counts = np.zeros((n_layer, n_expert))
    for layer in range(n_layer):
        sel = ids[:, layer, :].reshape(-1)
        counts[layer] = np.bincount(sel[sel >= 0], minlength=n_expert)[:n_expert]
    return counts


# --- fitting s and r to a preset -------------------------------------------------------------

# the coverage of a sample's own top quarter falls as the sample grows: fit on about as many
# tokens as a bench or a profile observes
_FIT_TOKENS = 1536
_FIT_LAYERS = 4


def _bisect(f, lo: float, hi: float, target: float, steps: int = 10) -> float:
    """x in [lo, hi] with f(x) close to target, f increasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@functools.lru_cache(maxsize=64)
def fit(name: str, n_expert: int, n_used: int) -> tuple[float, float]:
    """(s, r) for which generate() meets the preset's targets at this shape (deterministic)."""
    p = preset(name)
    if p.coverage_25 is None:
        raise HybridError(f"routing preset {name!r} has no trace: it is the model's own routing")

    def sim(s: float, r: float) -> dict:
        return measure(generate(_FIT_TOKENS, _FIT_LAYERS, n_expert, n_used, s, r, seed=1234), n_expert)

    s, r = 0.0, 0.0
    for _ in range(2):  # coverage moves mostly with s, the LRU rate mostly with r
        s = _bisect(lambda x: sim(x, r)["coverage_25"], 0.0, 4.0, p.coverage_25)
        r = _bisect(lambda x: sim(s, x)["lru_25"], 0.0, 0.999, p.lru_25)
    return s, r


def trace_for(name: str, n_rows: int, n_layer: int, n_expert: int, n_used: int,
              seed: int = 0, stream: int = STREAM_MEASURED) -> np.ndarray:
    """The preset's trace for a model shape: int32 [n_rows, n_layer, n_used]."""
    s, r = fit(name, n_expert, n_used)
    return generate(n_rows, n_layer, n_expert, n_used, s, r, seed=seed, stream=stream)


# a bench's --routing trace:FILE replays a recorded trace (routing/replay.py's .npz format)
TRACE_PREFIX = "trace:"


def file_trace(name: str, n_layer: int, n_expert: int, n_used: int) -> np.ndarray:
    """The ids of a `trace:FILE` routing, checked against the model's shape."""
    from hybrid_gguf.routing.replay import load_trace

    trace = load_trace(name[len(TRACE_PREFIX):], n_layer=n_layer, n_expert=n_expert)
    ids = np.asarray(trace.ids)
    if ids.ndim != 3 or ids.shape[2] != n_used or ids.shape[0] < 2:
        raise HybridError(f"{name}: a trace of {ids.shape[0]} tokens x top-{ids.shape[-1]} cannot drive a top-{n_used} "
                          f"model (it needs top-{n_used} and at least 2 tokens)")
    if (ids < 0).any():
        raise HybridError(f"{name}: the trace has tokens a layer did not route; a routing replay needs every one")
    return ids


def model_routing(inventory, override: Optional[str] = None) -> Optional[str]:
    """The routing to replay: `override` (a bench's --routing: a preset name or trace:FILE) or
    the preset a bench model carries in its metadata; None for the model's own routing."""
    name = override or inventory.metadata.get(ROUTING_KEY)
    if not name:
        return None
    name = str(name)
    if name.startswith(TRACE_PREFIX):
        if not override:  # a file's metadata does not get to name a file to read
            raise HybridError("this model's metadata names a routing trace file; only bench --routing may")
        return name
    preset(name)
    return None if PRESETS[name].coverage_25 is None else name


def _n_used(inventory) -> int:
    """The model's experts per token (the largest, where layers differ)."""
    used = inventory.n_expert_used
    return max(used) if isinstance(used, (list, tuple)) else int(used)


def model_trace(inventory, n_rows: int, stream: int = STREAM_MEASURED,
                override: Optional[str] = None) -> Optional[np.ndarray]:
    """The routing trace to replay (None for ordinary models): `stream` STREAM_PROFILE for
    profiling runs, STREAM_MEASURED for the sessions they plan for."""
    name = model_routing(inventory, override)
    if name is None:
        return None
    if inventory.n_expert <= 0:
        raise HybridError("a routing preset needs a model with routed experts")
    used = _n_used(inventory)
    if name.startswith(TRACE_PREFIX):
        # the first half profiles, the second is the measured session; a longer run wraps
        ids = file_trace(name, inventory.n_layer, inventory.n_expert, used)
        half = ids.shape[0] // 2
        part = ids[:half] if stream == STREAM_PROFILE else ids[half:]
        return np.ascontiguousarray(part[np.arange(max(1, int(n_rows))) % part.shape[0]], dtype=np.int32)
    seed = int(inventory.metadata.get(ROUTING_KEY + ".seed", 0) or 0)
    return trace_for(name, max(1, int(n_rows)), inventory.n_layer, inventory.n_expert, used,
                     seed=seed, stream=stream)


def decode_window(inventory, n_prompt: int, n_gen: int, override: Optional[str] = None) -> Optional[dict]:
    """Which rows of a `trace:FILE` routing a bench's timed decode replays: the trace is indexed
    by position, so every rep decodes rows n_prompt.. of its second half (wrapped), and a short
    window can sit on one answer of a trace that changes subject. None for other routings
    (a preset's stream is stationary)."""
    name = model_routing(inventory, override)
    if name is None or not name.startswith(TRACE_PREFIX):
        return None
    used = _n_used(inventory)
    rows = file_trace(name, inventory.n_layer, inventory.n_expert, used).shape[0]
    measured = rows - rows // 2
    return {"first_row": int(n_prompt) % measured, "rows": int(n_gen), "of": measured}


def profile_trace(inventory, n_rows: int, override: Optional[str] = None):
    """The routing a bench's profile saw, as a replay.Trace for `plan --cache auto`'s replay:
    a trace file's first half (at most `n_rows` tokens, not wrapped), or a preset's profile
    stream of `n_rows` tokens; None for the model's own routing."""
    from hybrid_gguf.routing.replay import Trace

    name = model_routing(inventory, override)
    if name is None:
        return None
    if name.startswith(TRACE_PREFIX):
        used = _n_used(inventory)
        ids = file_trace(name, inventory.n_layer, inventory.n_expert, used)
        ids = ids[:min(max(1, int(n_rows)), ids.shape[0] // 2)]  # model_trace's profile half, unwrapped
    else:
        ids = model_trace(inventory, max(1, int(n_rows)), STREAM_PROFILE, override)
    return Trace(np.ascontiguousarray(ids, dtype=np.int32), inventory.n_expert)
