"""The in-session expert cache of the patch (version 5), replayed on a routing trace.

The same rules as `llama_hybrid_cache_step` (docs/backend-patch.md): per step (one ubatch) each
layer's selections count as hits or misses against the slots resident at that step; the
missed experts are candidates, the most missed this step first (LRU) or the most used by a
decayed count first (LFU); each upload, at most `quota` per step, evicts an unpinned slot
whose resident the step did not select: the least recently selected (LRU) or the least
frequently (LFU, which also skips an upload that would not beat the resident). So the hit
rate, uploads and evictions a plan's hot set would see under a cache can be told from a
stored trace before a session runs it; tests check the counts against the patch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

HALF_LIFE_STEPS = 128.0  # the patch's LFU decay


@dataclass
class CacheSimResult:
    hits: int = 0
    misses: int = 0
    uploads: int = 0
    evictions: int = 0
    steps: int = 0
    upload_experts: dict = field(default_factory=dict)  # layer -> uploads

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class _Layer:
    def __init__(self, n_expert: int, slots: Sequence[int], n_pinned: int) -> None:
        self.slot_expert = [int(e) for e in slots]
        self.expert_slot = [-1] * n_expert
        for s, e in enumerate(self.slot_expert):
            self.expert_slot[e] = s
        self.last_use = [0] * n_expert
        self.score = [0.0] * n_expert
        self.score_step = [0] * n_expert
        self.n_pinned = n_pinned
        self.incoming: dict = {}  # slot -> expert whose upload is in flight

    def score_at(self, e: int, step: int) -> float:
        self.score[e] *= 2.0 ** (-(step - self.score_step[e]) / HALF_LIFE_STEPS)
        self.score_step[e] = step
        return self.score[e]


def simulate_cache(steps: Iterable[Mapping[int, np.ndarray]], hot: Mapping[int, Sequence[int]], n_expert: int,
                   policy: str = "lru", quota: int = 4, pinned: float = 0.0,
                   asynchronous: bool = False) -> CacheSimResult:
    """Replay the cache. `steps`: per ubatch, {layer: expert ids selected in it (any shape)};
    `hot`: {layer: the plan's experts in slot order} (the slots and their first residents);
    `policy`: "lru" or "lfu" ("seeded" is lfu with `pinned` > 0, as CacheOptions sends it).
    `asynchronous`: uploads as on CUDA, where the victim leaves at once and the new expert
    serves from the step after next (its copy runs beside the next ubatch); else as on the CPU,
    where it serves the next ubatch."""
    if policy not in ("lru", "lfu"):
        raise ValueError(f"policy must be lru or lfu, got {policy!r}")
    lfu = policy == "lfu"
    layers = {int(l): _Layer(n_expert, es, min(len(es), int(np.floor(pinned * len(es) + 0.5))))
              for l, es in hot.items() if len(es)}
    out = CacheSimResult()
    step = 0
    for ids_by_layer in steps:
        step += 1
        out.steps += 1
        candidates = []
        for l in sorted(layers):
            cl = layers[l]
            misses_now: dict = {}
            for e in np.asarray(ids_by_layer.get(l, ()), dtype=np.int64).ravel().tolist():
                if not 0 <= e < n_expert:
                    continue
                if cl.expert_slot[e] >= 0:
                    out.hits += 1
                else:
                    out.misses += 1
                    misses_now[e] = misses_now.get(e, 0) + 1
                cl.score_at(e, step)
                cl.score[e] += 1.0
                cl.last_use[e] = step
            # the uploads issued one step ago have completed during this step's ubatch, which
            # ran without them: they serve from the next one
            for slot, e in cl.incoming.items():
                cl.expert_slot[e] = slot
            cl.incoming.clear()
            # in expert order, as the patch scans them; not one that became resident just now
            for e in sorted(misses_now):
                if cl.expert_slot[e] < 0:
                    candidates.append((l, e, cl.score[e] if lfu else misses_now[e] + 1e-6 * cl.score[e]))
        candidates.sort(key=lambda c: -c[2])  # stable, as the patch's std::stable_sort
        uploads = 0
        for l, e, _ in candidates:
            if uploads >= quota:
                break
            cl = layers[l]
            victim_slot, victim_key = -1, 0.0
            for s in range(cl.n_pinned, len(cl.slot_expert)):
                v = cl.slot_expert[s]
                if cl.last_use[v] == step or s in cl.incoming:
                    continue
                key = cl.score_at(v, step) if lfu else float(cl.last_use[v])
                if victim_slot < 0 or key < victim_key:
                    victim_slot, victim_key = s, key
            if victim_slot < 0:
                continue
            if lfu and victim_key >= cl.score_at(e, step):
                continue
            victim = cl.slot_expert[victim_slot]
            cl.expert_slot[victim] = -1
            if asynchronous:
                cl.incoming[victim_slot] = e
            else:
                cl.expert_slot[e] = victim_slot
            cl.slot_expert[victim_slot] = e
            out.uploads += 1
            out.evictions += 1
            out.upload_experts[l] = out.upload_experts.get(l, 0) + 1
            uploads += 1
    return out


def steps_from_trace(trace, prompt_tokens: int = 0, n_ubatch: int = 512, max_rows: int = 512) -> list:
    """Cache steps of a replay.Trace (ids [n_tokens, n_layer, k], -1 = not routed): the first
    `prompt_tokens` tokens in ubatches of `n_ubatch` (of each, the first `max_rows` rows, what
    the patch's id sink holds), then one step per token."""
    ids = np.asarray(trace.ids)

    def step(rows: np.ndarray) -> dict:
        return {l: rows[:, l].ravel() for l in range(ids.shape[1])}

    steps = []
    for start in range(0, prompt_tokens, max(1, n_ubatch)):
        stop = min(start + n_ubatch, prompt_tokens)
        steps.append(step(ids[start:min(stop, start + max_rows)]))
    for t in range(prompt_tokens, ids.shape[0]):
        steps.append(step(ids[t:t + 1]))
    return steps


# the upload quotas a replay tries: each policy's best is what the planner compares
REPLAY_QUOTAS = (4, 16, 64)


def predict_cache(trace, hot: Mapping[int, Sequence[int]], n_expert: int, expert_bytes: Mapping[int, int],
                  start: int = 0, quotas: Sequence[int] = REPLAY_QUOTAS, pinned: float = 0.5,
                  background: bool = False) -> dict:
    """What an in-session cache over `hot` (the plan's packs: slots and first residents) would
    do on the decode tokens of `trace` from `start`, one step per token: {name: {policy, quota,
    hit_rate, uploads_per_token, upload_bytes_per_token}} for the static hot set ("static")
    and each policy of CacheOptions at each quota ("lru q16", ...). `expert_bytes`: {layer:
    bytes of one expert}; `background`: the uploads run as CacheOptions.background's."""
    ids = np.asarray(trace.ids)[start:]
    if ids.shape[0] == 0 or not any(len(v) for v in hot.values()):
        return {}
    steps = [{l: ids[t, l] for l in range(ids.shape[1])} for t in range(ids.shape[0])]

    def row(policy: str, quota: int) -> dict:
        sim_policy, share = ("lfu", pinned) if policy == "seeded" else (policy, 0.0)
        res = simulate_cache(steps, hot, n_expert, "lru" if policy == "static" else sim_policy,
                             0 if policy == "static" else quota, share, asynchronous=background)
        moved = sum(n * expert_bytes.get(l, 0) for l, n in res.upload_experts.items())
        return {"policy": policy, "quota": quota, "hit_rate": res.hit_rate,
                "uploads_per_token": res.uploads / len(steps), "upload_bytes_per_token": moved / len(steps)}

    out = {"static": row("static", 0)}
    for policy in ("lru", "lfu", "seeded"):
        for quota in quotas:
            out[f"{policy} q{int(quota)}"] = row(policy, int(quota))
    return out
