"""The planner: inventory + budget + context + routing profile -> Plan. A pure function.

Order of business:
1. Dense, attention, shared-expert and router weights, the KV cache and the compute
   buffer go on the GPU first. If the dense weights alone do not fit, everything stays on
   the CPU (and the plan says why); if the KV cache is what does not fit, the plan says
   which context would.
2. The remaining room holds experts, chosen across all layers by expected selections per
   byte. Each layer's hot set is a prefix of its experts sorted by popularity, so the
   choice is "how many experts n_l per layer": a multiple-choice knapsack solved by branch
   and bound (exact on small and usual cases; node-limited, best-found otherwise). A layer
   whose experts are all chosen is placed whole (its tensors on the GPU, no pack).
   With several GPUs, llama.cpp splits the layers over them (in proportion to their
   budgets) and each GPU's room goes to the experts of its own layers, one knapsack per
   GPU: a layer's pack lives on its layer's card (the patch's `buft=auto`), so no token
   crosses cards for it.
3. Layers whose hot set is nearly complete are promoted whole when the bandwidth model
   says the freed CPU hand-off is worth the experts it costs.
4. Hysteresis: the previous plan's hot set is kept unless the new one is predicted to be
   better by more than `hysteresis` (absolute hit rate) or to decode more than
   SPEED_HYSTERESIS faster (promotions lower the hit rate a little to save hand-offs).

Without a profile, or on a stock llama.cpp, experts move per whole layer (the last layers
first, like llama.cpp's --n-cpu-moe).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hybrid_gguf.errors import STOCK_NOTICE, HybridError
from hybrid_gguf.planning.memory import (CPU, MemoryOptions, MemoryPrediction, gpu_alloc_bytes, kv_cells,
                           layer_devices, predict_memory, GPU_ALIGN)
from hybrid_gguf.planning.placement import (CACHE_POLICIES, EXPERT_TENSOR_RE, PACK_AUTO, CacheOptions, PlacementRule,
                                            TensorPlacement)
from hybrid_gguf.planning.cache_choice import choose_cache
from hybrid_gguf.planning.plan import DeviceBudget, Plan, Predicted, ProfileSource
from hybrid_gguf.planning.calibration import Bandwidth
from hybrid_gguf.planning.speed import hit_rate, predict_speed
from hybrid_gguf.routing.stats import decode_probs, profile_probs
from hybrid_gguf.sizes import format_size

SMALL_PROFILE_TOKENS = 2000  # routed tokens per layer below which skew is overstated
SPEED_HYSTERESIS = 0.02  # predicted decode gain that replaces the previous plan even at a lower hit rate
HANDOFFS = ("scheduler", "worker", "auto")  # make_plan's `handoff`
BB_NODE_LIMIT = 20_000  # ~0.3 s; small cases finish far below it
# Layers are considered for promotion whole (no CPU hand-off) once their hot set covers this
# share of their experts; 0 lets the speed model weigh every layer. At 10 GiB on the H200
# (Q30B-shaped model) 0 decoded 132-135 tok/s against 114-119 with 0.9, as predicted (+15 %).
PROMOTE_FROM = 0.0
_EXP_SUFFIX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


@dataclass
class _Layer:
    index: int
    n_expert: int
    order: list  # expert ids, most popular first
    values: np.ndarray  # p of `order`
    cost: np.ndarray  # cost[n] = GPU bytes of the first n experts (n == n_expert: whole tensors)
    unit: int  # bytes of one expert; cost[n] >= n * unit
    prefix: np.ndarray  # prefix[n] = value of the first n experts

    @property
    def whole_bytes(self) -> int:
        return int(self.cost[-1])


def _layer_costs(inv, layer) -> np.ndarray:
    """GPU bytes of a hot pack of n experts for n = 0..E-1 (expert slices + three F32
    lookup tables), and of the whole expert tensors at n = E."""
    tensors = [inv.tensor(n) for n in layer.expert_tensors]
    E = layer.n_expert
    tables = 3 * ((4 * E + GPU_ALIGN - 1) // GPU_ALIGN * GPU_ALIGN)
    cost = [0] + [sum(gpu_alloc_bytes(t, n) for t in tensors) + tables for n in range(1, E)]
    cost.append(sum(gpu_alloc_bytes(t) for t in tensors))
    return np.array(cost, dtype=np.int64)


def _layers(inv, p: np.ndarray) -> list:
    out = []
    for layer in inv.layers:
        if not layer.is_moe:
            continue
        vals = p[layer.index, :layer.n_expert]
        order = sorted(range(layer.n_expert), key=lambda e: (-vals[e], e))
        v = np.asarray(vals[order], dtype=np.float64)
        out.append(_Layer(layer.index, layer.n_expert, order, v, _layer_costs(inv, layer),
                          max(int(layer.per_expert_bytes), 1), np.concatenate([[0.0], np.cumsum(v)])))
    return out


# --- the knapsack ---------------------------------------------------------------------------


def _greedy(layers: Sequence[_Layer], room: int) -> list:
    """Best marginal value per marginal byte first; a layer whose next expert does not fit
    is done (its later experts cost as much and are worth less)."""
    counts = [0] * len(layers)
    used = 0
    heap = [(-ly.values[0] / max(int(ly.cost[1]), 1), i) for i, ly in enumerate(layers)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        ly, n = layers[i], counts[i]
        delta = int(ly.cost[n + 1] - ly.cost[n])
        if used + delta > room:
            continue
        counts[i] = n + 1
        used += delta
        if n + 1 < ly.n_expert:
            nxt = int(ly.cost[n + 2] - ly.cost[n + 1])
            heapq.heappush(heap, (-ly.values[n + 1] / max(nxt, 1), i))
    return counts


def choose_counts(layers: Sequence[_Layer], room: int, node_limit: int = BB_NODE_LIMIT) -> tuple:
    """Experts per layer (a prefix of each layer's popularity order) maximising expected
    GPU-served selections within `room` bytes: (counts, value, exact, upper_bound).

    Branch and bound over layers. The bound for the layers not yet fixed is the knapsack of
    their experts at `unit` bytes each (the best floor(r / unit) experts when all have one
    size, the fractional knapsack otherwise), valid because values fall within a layer and
    every real cost is at least n * unit. Branches are tried best bound first and cut
    as soon as the bound cannot beat the incumbent (the greedy answer to start with).
    """
    L = len(layers)
    if L == 0 or room <= 0:
        return [0] * L, 0.0, True, 0.0
    suffix = []
    for i in range(L + 1):
        items = sorted(((v / ly.unit, v, ly.unit) for ly in layers[i:] for v in ly.values),
                       key=lambda x: -x[0])
        cw = np.cumsum([0.0] + [w for _, _, w in items])
        cv = np.cumsum([0.0] + [v for _, v, _ in items])
        ratio = np.array([r for r, _, _ in items] + [0.0])
        units = {ly.unit for ly in layers[i:]}
        suffix.append((cw, cv, ratio, units.pop() if len(units) == 1 else None))

    def bound(i: int, r: np.ndarray) -> np.ndarray:
        cw, cv, ratio, unit = suffix[i]
        if unit is not None:
            # one expert size: at most floor(r / unit) more experts, the best ones
            return cv[np.clip((r // unit).astype(np.int64), 0, len(cv) - 1)]
        j = np.clip(np.searchsorted(cw, r, side="right") - 1, 0, len(cw) - 1)
        return np.where(j >= len(cw) - 1, cv[-1], cv[j] + (r - cw[j]) * ratio[j])

    counts = _greedy(layers, room)
    best = [list(counts), float(sum(ly.prefix[c] for ly, c in zip(layers, counts)))]
    state = {"nodes": 0, "exact": True}
    cur = [0] * L

    def dfs(i: int, r: int, val: float) -> None:
        if i == L:
            if val > best[1] * (1 + 1e-12) + 1e-15:
                best[0], best[1] = list(cur), val
            return
        state["nodes"] += 1
        if state["nodes"] > node_limit:
            state["exact"] = False
            return
        ly = layers[i]
        ns = np.nonzero(ly.cost <= r)[0]
        ub = ly.prefix[ns] + bound(i + 1, (r - ly.cost[ns]).astype(np.float64))
        for k in np.argsort(-ub, kind="stable"):
            if val + ub[k] <= best[1] * (1 + 1e-12) + 1e-15:
                break  # every other branch has a lower bound still
            n = int(ns[k])
            cur[i] = n
            dfs(i + 1, r - int(ly.cost[n]), val + float(ly.prefix[n]))
            if not state["exact"]:
                break
        cur[i] = 0

    dfs(0, int(room), 0.0)
    upper = best[1] if state["exact"] else float(bound(0, np.array([float(room)]))[0])
    return best[0], best[1], state["exact"], max(upper, best[1])


# --- planning ----------------------------------------------------------------------------


def _experts_rule(layers: Sequence[int], n_layer_moe: int, device: str) -> Optional[PlacementRule]:
    if not layers:
        return None
    if len(layers) == n_layer_moe:
        return PlacementRule(EXPERT_TENSOR_RE, device)
    alt = "|".join(str(l) for l in sorted(layers))
    return PlacementRule(rf"^blk\.({alt}){_EXP_SUFFIX}", device)


def _room(budget: int, used_wo_margin: int, opts: MemoryOptions) -> int:
    """Bytes still free on a GPU whose other contents take used_wo_margin bytes; the
    margin (margin_bytes + margin_fraction x contents) comes off the budget first."""
    def total(x: int) -> int:  # as predict_memory adds the margin
        return x + int(opts.margin_bytes + opts.margin_fraction * x)

    usable = int((budget - opts.margin_bytes) / (1.0 + opts.margin_fraction))
    while total(usable + 1) <= budget:
        usable += 1
    while usable > 0 and total(usable) > budget:
        usable -= 1
    return usable - int(used_wo_margin)


def _resolve_devices(budget_bytes: int, devices) -> list:
    if devices is None:
        return [DeviceBudget("GPU", int(budget_bytes))]
    out = []
    names = [d if isinstance(d, str) else d.name for d in devices]
    if any(isinstance(d, str) for d in devices):
        share = int(budget_bytes) // max(len(devices), 1)
    for d, name in zip(devices, names):
        if isinstance(d, str):
            out.append(DeviceBudget(name, share))
        else:
            out.append(d)
    if len(set(names)) != len(names):
        raise HybridError(f"device listed twice: {names}")
    return out


def make_plan(inventory, budget_bytes: int, n_ctx: int, profile=None, per_expert: bool = True,
              devices=None, bandwidth: Optional[Bandwidth] = None, previous: Optional[Plan] = None, *,
              memory: Optional[MemoryOptions] = None, promote_fraction: float = PROMOTE_FROM,
              hysteresis: float = 0.01, prior: float = 1.0, node_limit: int = BB_NODE_LIMIT,
              created: Optional[str] = None, cold: str = "cpu", cache: str = "static", cache_trace=None,
              cache_quota: Optional[int] = None, handoff: str = "scheduler") -> Plan:
    """Plan where every tensor and expert of `inventory` lives for a GPU budget.

    budget_bytes: total GPU bytes for this model (split evenly over `devices` given as names),
      already usable (planning/budget.py: the entry point applies the rule, not the planner).
    devices: None (one GPU, "GPU"), a list of names, or a list of DeviceBudget (each its own
      budget; the layers are split over them in proportion, and each plans its own layers'
      experts into its own budget).
    profile: a RoutingProfile for this model (None: whole-layer plan).
    per_expert: the backend can build hot packs (False: stock llama.cpp).
    memory: MemoryOptions (KV types, ubatch, flash attention, measured compute, margins).
    previous: the plan in use; kept unless the new one beats it by `hysteresis`.
    cold: who computes the experts left in host memory when there are hot packs: "cpu" (a
      hand-off per split layer), "gpu" (the packs' GPU reads them in place, patch v4) or
      "auto" (the faster by the speed model; the caller passes "auto" only where the build
      and the GPU can do both).
    handoff: with cold experts on the CPU, who takes each split layer's decode work:
      "scheduler" (the graph is cut there), "worker" (the CPU worker of patch v8 answers the
      GPU's posts) or "auto" (the faster by the speed model; the caller passes "worker" only
      where the build has the worker, and "auto" only where the packs are also on one GPU:
      across cards the worker is tested but untimed). With
      "worker" the hot-set search prices hand-offs at the worker's costs too; "auto" plans
      both ways and keeps the faster.
    cache: the in-session cache the plan's runs use when it has hot packs: a policy of
      placement.CACHE_POLICIES, or "auto" (the fastest of them by the speed model, each
      replayed on `cache_trace`, a replay.Trace of this model's routing, at `cache_quota`
      uploads per step or else at each of cache_sim.REPLAY_QUOTAS).
    """
    if cold not in ("cpu", "gpu", "auto"):
        raise HybridError(f"cold must be cpu, gpu or auto, got {cold!r}")
    if handoff not in HANDOFFS:
        raise HybridError(f"handoff must be {', '.join(HANDOFFS)}, got {handoff!r}")
    if handoff == "auto":
        # the hand-off's costs shape the hot set (promotions, the previous plan's hysteresis):
        # plan with each, keep the faster
        by = {h: make_plan(inventory, budget_bytes, n_ctx, profile, per_expert, devices, bandwidth, previous,
                           memory=memory, promote_fraction=promote_fraction, hysteresis=hysteresis, prior=prior,
                           node_limit=node_limit, created=created, cold=cold, cache=cache, cache_trace=cache_trace,
                           cache_quota=cache_quota, handoff=h) for h in ("scheduler", "worker")}
        sched, work = by["scheduler"], by["worker"]
        if not work.worker:  # no split layer with its cold experts on the CPU: nothing to choose
            return sched
        if work.predicted.decode_tokens_per_s > sched.predicted.decode_tokens_per_s:
            work.notes.append(f"split layers hand their cold experts to the CPU worker, predicted "
                              f"{work.predicted.decode_tokens_per_s:.1f} tokens/s against "
                              f"{sched.predicted.decode_tokens_per_s:.1f} with the scheduler's graph cut")
            return work
        sched.notes.append(f"split layers keep the scheduler's graph cut, predicted "
                           f"{sched.predicted.decode_tokens_per_s:.1f} tokens/s against "
                           f"{work.predicted.decode_tokens_per_s:.1f} with the CPU worker")
        return sched
    if cache != "auto" and cache not in CACHE_POLICIES:
        raise HybridError(f"cache must be auto or one of {', '.join(CACHE_POLICIES)}, got {cache!r}")
    inv = inventory
    if budget_bytes < 0:
        raise HybridError(f"GPU budget must not be negative, got {budget_bytes}")
    opts = memory if memory is not None else MemoryOptions(n_ctx)
    if opts.n_ctx != n_ctx:
        opts = replace(opts, n_ctx=n_ctx)
    bw = bandwidth or Bandwidth()
    # what the search weighs a hand-off at: the worker's costs when it takes the split layers
    search_bw = bw.with_worker_handoffs() if handoff == "worker" else bw
    devs = _resolve_devices(budget_bytes, devices)
    notes: list = []
    if len(devs) > 1 and any(d.budget_bytes <= 0 for d in devs):
        # a card with nothing to give takes no layers (a layer there would not fit)
        unused = [d.name for d in devs if d.budget_bytes <= 0]
        devs = [d for d in devs if d.budget_bytes > 0] or devs[:1]
        notes.append(f"{', '.join(unused)}: no GPU budget, no layers there")
    gpus = [d.name for d in devs]
    budgets = {d.name: int(d.budget_bytes) for d in devs}
    total_budget = sum(budgets.values())
    split = [float(b) for b in budgets.values()] if len(gpus) > 1 else None
    if split is not None and sum(split) <= 0:
        split = None

    p = None  # selections per decoded token: what the plan optimizes and predicts decode from
    p_prompt = None
    src = None
    if profile is not None:
        if profile.fingerprint != inv.fingerprint:
            raise HybridError("routing profile is for another model (fingerprint "
                              f"{profile.fingerprint[:16]}…, model {inv.fingerprint[:16]}…)")
        if (profile.n_layer, profile.n_expert) != (inv.n_layer, inv.n_expert):
            raise HybridError(f"routing profile shape {profile.n_layer}x{profile.n_expert} does not "
                              f"match the model's {inv.n_layer}x{inv.n_expert}")
        moe = [l.index for l in inv.layers if l.is_moe]
        tokens = float(np.mean(profile.tokens_per_layer[moe])) if moe else 0.0
        src = ProfileSource(profile.sessions, int(round(tokens)), profile.updated, dict(profile.labels))
        if tokens <= 0:
            notes.append("the routing profile is empty; planning as without one")
            profile = None
        else:
            if tokens < SMALL_PROFILE_TOKENS:
                notes.append(f"the routing profile holds only {int(tokens)} tokens per layer: small profiles "
                             "overstate skew, so the predicted hit rate is optimistic; profile more")
            p = decode_probs(profile, inv, prior)
            p_prompt = profile_probs(profile, inv, prior)

    def finish(rules, hot, backend, n_gpu_layers=-1, hot_device=None) -> Plan:
        placement = TensorPlacement(tuple(rules), "plan", n_gpu_layers=n_gpu_layers)
        on_gpu = bool(gpus) and n_gpu_layers != 0
        pred = predict_memory(inv, placement, opts, hot=hot, gpus=gpus if on_gpu else (),
                              hot_device=hot_device, tensor_split=split)
        plan = Plan(
            fingerprint=inv.fingerprint, model_path=str(inv.path), model_name=Path(inv.path).stem,
            arch=inv.arch, n_layer=inv.n_layer, n_expert=inv.n_expert, budget_bytes=int(total_budget),
            n_ctx=int(n_ctx), devices=devs, backend=backend, n_gpu_layers=n_gpu_layers,
            tensor_split=split, rules=list(rules), hot={int(k): list(map(int, v)) for k, v in hot.items() if v},
            hot_device=hot_device if hot else None, memory=opts, profile=src,
            notes=notes, **({"created": created} if created else {}))
        gpu_exp = plan.gpu_experts(inv) if on_gpu else {}

        cards = {d for d in layer_devices(inv.n_layer, gpus, split) if d != CPU} if on_gpu else set()

        def speed_of(cold_on_gpu: bool, worker: bool = False):
            return predict_speed(inv, p, gpu_exp, on_gpu, bw, n_ctx, opts.n_ubatch,
                                 kv_bytes_per_token=_kv_per_token(inv, opts), op_offload=opts.op_offload,
                                 p_prefill=p_prompt, cold_on_gpu=cold_on_gpu, card_hops=max(len(cards) - 1, 0),
                                 worker=worker)

        speed = speed_of(False)
        split_layers = bool(plan.hot) and on_gpu
        if split_layers and handoff == "worker":
            plan.worker, speed = True, speed_of(False, worker=True)
        if split_layers and cold != "cpu":
            read = speed_of(True)
            if cold == "gpu" or read.decode_tokens_per_s > speed.decode_tokens_per_s:
                if cold == "auto":
                    notes.append(f"cold experts: the GPU reads them from pinned host memory, predicted "
                                 f"{read.decode_tokens_per_s:.1f} tokens/s against "
                                 f"{speed.decode_tokens_per_s:.1f} with a CPU hand-off per split layer")
                plan.cold_on_gpu, plan.worker, speed = True, False, read
        cache_detail = None
        if plan.hot and on_gpu and cache != "static":
            if cache == "auto":
                plan.cache, cache_detail = choose_cache(inv, plan.hot, speed.decode_ms, cache_trace, bw, notes,
                                                        quota=cache_quota)
            else:
                plan.cache = CacheOptions(cache, CacheOptions.quota if cache_quota is None else cache_quota)
        plan.predicted = Predicted(
            hit_rate=_hit(inv, p, gpu_exp), decode_tokens_per_s=speed.decode_tokens_per_s,
            prefill_tokens_per_s=speed.prefill_tokens_per_s, gpu_bytes=pred.gpu_bytes,
            memory={n: d.to_dict() for n, d in pred.devices.items()}, bandwidth=bw,
            speed_terms={"decode_ms": speed.decode_ms, "prefill_ms": speed.prefill_ms,
                         "decode_handoffs": {k: round(v, 3) for k, v in speed.handoffs.items()},
                         **({"cache_replay": cache_detail} if cache_detail else {})})
        return plan

    if not gpus or total_budget <= 0:
        notes.append("no GPU budget: everything runs on the CPU")
        return finish([], {}, "cpu", n_gpu_layers=0)

    # 1. everything on the GPU?
    everything = predict_memory(inv, None, opts, gpus=gpus, tensor_split=split)
    if all(d.total <= budgets[n] for n, d in everything.devices.items() if n != CPU):
        notes.append("the whole model fits the budget: " + ("every expert on the GPU" if inv.is_moe
                                                               else "everything on the GPU"))
        return finish([], {}, "per-expert" if per_expert else "whole-tensor")

    if not inv.is_moe:
        notes.append(f"a dense model that does not fit {format_size(total_budget)} "
                     f"(needs {format_size(everything.gpu_bytes)}); partial layer offload is not planned: "
                     "everything on the CPU")
        return finish([], {}, "cpu", n_gpu_layers=0)

    # 2. dense + KV + compute first
    n_moe = sum(1 for l in inv.layers if l.is_moe)
    base_rule = PlacementRule(EXPERT_TENSOR_RE, CPU)
    base = predict_memory(inv, TensorPlacement((base_rule,), n_gpu_layers=-1), opts, gpus=gpus,
                          tensor_split=split)
    rooms = {}
    for name in gpus:
        d = base.devices.get(name)
        used = d.total - d.margin if d else 0
        rooms[name] = _room(budgets[name], used, opts)
    if any(r < 0 for r in rooms.values()):
        _explain_no_fit(inv, base, budgets, opts, notes)
        return finish([], {}, "cpu", n_gpu_layers=0)

    ldev = layer_devices(inv.n_layer, gpus, split)
    scratch = max(d.offload_scratch for d in base.devices.values())

    # 3. experts
    if p is None or not per_expert:
        if p is None:
            notes.append("no routing profile: experts placed per whole layer (last layers first, like "
                         "--n-cpu-moe); run `hybrid-gguf profile MODEL` so the planner can pick hot experts")
        if not per_expert:
            notes.append(STOCK_NOTICE)
        whole = _whole_layers(inv, ldev, rooms, scratch)
        rules = _rules_for(inv, whole, ldev, n_moe)
        return finish(rules, {}, "per-expert" if per_expert else "whole-tensor")

    # each GPU's room goes to the experts of its own layers: a layer's pack lives on the card
    # that holds the layer (its router's output is there), so no token crosses cards for it
    hot_device = gpus[0] if len(gpus) == 1 else PACK_AUTO
    hot: dict = {}
    whole: dict = {}
    all_layers = _layers(inv, p)
    gaps = []
    for g in gpus:
        layers = [ly for ly in all_layers if ldev[ly.index] == g]
        if not layers:
            continue
        counts, value, exact, upper = choose_counts(layers, rooms[g], node_limit)
        if not exact:
            gaps.append((upper - value) / max(float(p.sum()), 1e-12))
        for ly, c in zip(layers, counts):
            if c == ly.n_expert:
                whole[ly.index] = g
            elif c:
                hot[ly.index] = list(ly.order[:c])

        # 4. promote nearly-complete layers when the bandwidth model says it pays
        if promote_fraction <= 1.0:
            hot, whole = _promote(inv, p, layers, hot, whole, g, rooms[g], promote_fraction, search_bw, opts, notes)
    if gaps and sum(gaps) > 5e-4:
        notes.append(f"expert choice is within {sum(gaps):.2%} hit rate of the optimum "
                     f"(search stopped after {node_limit} nodes)")

    # 5. hysteresis against the previous plan
    if previous is not None:
        kept = _keep_previous(inv, p, previous, hot, whole, gpus, budgets, split, opts, hysteresis, search_bw,
                              notes, hot_device)
        if kept is not None:
            hot, whole = kept

    rules = _rules_for(inv, whole, ldev, n_moe)
    return finish(rules, hot, "per-expert", hot_device=hot_device if hot else None)



def plan_memory(plan: Plan, inv) -> MemoryPrediction:
    """Bytes per device of a (possibly hand-edited) plan, to check it against its budget or
    against llama.cpp's logged buffers (memory_model.compare_with_report)."""
    plan.check_model(inv)
    gpus = [d.name for d in plan.devices] or ["GPU"]
    on_gpu = plan.n_gpu_layers != 0
    return predict_memory(inv, plan.placement(), plan.memory, hot=plan.hot if on_gpu else {},
                          gpus=gpus if on_gpu else (), hot_device=plan.hot_device,
                          tensor_split=plan.tensor_split)


def _kv_per_token(inv, opts: MemoryOptions) -> int:
    from hybrid_gguf.planning.memory import kv_cache_bytes

    return kv_cache_bytes(inv, 256, opts.type_k, opts.type_v) // 256


def _hit(inv, p, gpu_exp) -> float:
    if p is not None:
        return hit_rate(p, gpu_exp)
    sel = sum(l.n_expert_used for l in inv.layers if l.is_moe)
    on = sum(inv.layers[l].n_expert_used * len(es) / inv.layers[l].n_expert for l, es in gpu_exp.items()
             if inv.layers[l].is_moe)
    return on / sel if sel else 0.0


def _explain_no_fit(inv, base: MemoryPrediction, budgets: dict, opts: MemoryOptions, notes: list) -> bool:
    for name, budget in budgets.items():
        d = base.devices.get(name)
        if d is None:
            continue
        if d.total <= budget:
            continue
        dense = d.weight_bytes
        if dense > budget:
            notes.append(f"the dense weights (attention, norms, router, shared experts, output) need "
                         f"{format_size(dense)} on {name}, more than its budget {format_size(budget)}: "
                         "everything stays on the CPU")
        else:
            fixed = d.total - d.kv - d.compute - d.offload_scratch - d.margin
            per_cell = d.kv / kv_cells(opts.n_ctx) if d.kv else 0
            ctx = 0
            if per_cell:
                # the compute buffer also shrinks with the context: search the largest that fits
                lo, hi = 0, opts.n_ctx
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    o = replace(opts, n_ctx=max(mid, 1))
                    b = predict_memory(inv, TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, CPU),)), o,
                                       gpus=list(budgets))
                    if b.devices[name].total <= budget:
                        lo = mid
                    else:
                        hi = mid - 1
                ctx = lo // 256 * 256
            notes.append(f"context {opts.n_ctx} needs {format_size(d.kv)} of KV cache and "
                         f"{format_size(d.compute + d.offload_scratch)} of compute buffers on {name} next to "
                         f"{format_size(fixed)} of dense weights; that exceeds {format_size(budget)}"
                         + (f"; a context of {ctx} would fit" if ctx else "")
                         + _smaller_compute_hint(inv, opts, name, budget, list(budgets))
                         + ": everything stays on the CPU")
        return True
    notes.append("the dense weights, KV cache and compute buffers do not fit the budget: "
                 "everything stays on the CPU")
    return True


def _smaller_compute_hint(inv, opts: MemoryOptions, name: str, budget: int, gpus: list) -> str:
    """"; with ... the context fits" when a smaller micro-batch or flash attention would shrink
    the compute buffer enough (by the estimate: a measured buffer was for these settings)."""
    host = TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, CPU),))
    ways = []
    if not opts.flash_attn:
        ways.append(("flash attention (-fa)", replace(opts, flash_attn=True, compute_bytes=None)))
    if opts.n_ubatch > 512:
        ways.append(("ubatch 512 (-ub 512)", replace(opts, n_ubatch=512, compute_bytes=None)))
    fits = [label for label, o in ways if predict_memory(inv, host, o, gpus=gpus).devices[name].total <= budget]
    return f"; with {' or '.join(fits)} the whole context fits" if fits else ""


def _whole_layers(inv, ldev: list, rooms: dict, scratch: int) -> dict:
    """Whole layers' experts on their own GPU, each GPU's last layers first (like
    --n-cpu-moe on each card)."""
    whole = {}
    rooms = dict(rooms)
    full = set()  # GPUs whose next layer did not fit
    moe = [l for l in inv.layers if l.is_moe]
    for layer in reversed(moe):
        dev = ldev[layer.index]
        if dev in full:
            continue
        cost = sum(gpu_alloc_bytes(inv.tensor(n)) for n in layer.expert_tensors)
        last = len(whole) == len(moe) - 1
        if cost <= rooms[dev] + (scratch if last else 0):
            whole[layer.index] = dev
            rooms[dev] -= cost
        else:
            full.add(dev)
    return whole


def _rules_for(inv, whole: dict, ldev: list, n_moe: int) -> list:
    """Experts of every non-whole layer on the CPU; whole layers on a GPU other than their
    layer's own get an explicit rule."""
    host = [l.index for l in inv.layers if l.is_moe and l.index not in whole]
    rules = []
    moved: dict = {}
    for l, dev in whole.items():
        if dev != ldev[l]:
            moved.setdefault(dev, []).append(l)
    for dev, ls in sorted(moved.items()):
        rules.append(_experts_rule(ls, -1, dev))
    r = _experts_rule(host, n_moe, CPU)
    if r is not None:
        rules.append(r)
    return rules


def _promote(inv, p, layers, hot, whole, pack_dev, room, frac, bw, opts, notes):
    """Promote layers of `layers` (those on pack_dev, whose room is `room`) whose hot set
    covers >= frac of their experts to whole layers, paying with the least valuable hot
    experts of the same device, when predicted decode speed improves."""
    by_index = {ly.index: ly for ly in layers}

    def used(h, w) -> int:
        c = sum(by_index[l].cost[len(es)] for l, es in h.items() if l in by_index)
        c += sum(by_index[l].whole_bytes for l, d in w.items() if l in by_index and d == pack_dev)
        return c

    def speed(h, w) -> float:
        gpu_exp = {l: es for l, es in h.items()}
        for l in w:
            gpu_exp[l] = list(range(inv.layers[l].n_expert))
        return predict_speed(inv, p, gpu_exp, True, bw, opts.n_ctx, opts.n_ubatch,
                             op_offload=opts.op_offload).decode_tokens_per_s

    promoted = []
    for l in sorted((l for l in hot if l in by_index), key=lambda l: -len(hot[l]) / by_index[l].n_expert):
        ly = by_index[l]
        if len(hot.get(l, [])) < frac * ly.n_expert:
            continue
        h = {k: list(v) for k, v in hot.items() if k != l}
        w = dict(whole)
        w[l] = pack_dev
        free = room
        # demote the cheapest hot experts elsewhere until it fits
        while used(h, w) > free:
            cands = [(by_index[k].values[len(v) - 1], k) for k, v in h.items() if v and k in by_index]
            if not cands:
                break
            _, k = min(cands)
            h[k] = h[k][:-1]
            if not h[k]:
                del h[k]
        if used(h, w) > free:
            continue
        if speed(h, w) > speed(hot, whole):
            hot, whole = h, w
            promoted.append(l)
    if promoted:
        notes.append(f"layers {', '.join(map(str, sorted(promoted)))} promoted whole: no CPU hand-off there, "
                     f"paid for with the least used hot experts elsewhere (layers considered: hot set >= "
                     f"{frac:.0%} of their experts)")
    return hot, whole


def _keep_previous(inv, p, previous: Plan, hot, whole, gpus, budgets, split, opts, threshold, bw, notes,
                   hot_device):
    if previous.fingerprint != inv.fingerprint:
        notes.append("the previous plan is for another model; ignored")
        return None
    prev_gpus = [d.name for d in previous.devices]
    if len(gpus) > 1 and prev_gpus != list(gpus):
        notes.append(f"the previous plan is for other GPUs ({', '.join(prev_gpus) or 'GPU'}); ignored")
        return None
    try:
        previous.check_model(inv)
    except HybridError as exc:
        notes.append(f"the previous plan does not match the model ({exc}); ignored")
        return None
    prev_exp = previous.gpu_experts(inv) if previous.n_gpu_layers != 0 else {}
    prev_whole = _prev_whole(inv, previous, gpus, split)
    prev_hot = {int(l): list(v) for l, v in previous.hot.items() if v}
    new_exp = {l: list(v) for l, v in hot.items()}
    for l in whole:
        new_exp[l] = list(range(inv.layers[l].n_expert))
    old_hit, new_hit = hit_rate(p, prev_exp), hit_rate(p, new_exp)
    if new_hit - old_hit > threshold:
        notes.append(f"re-planned: predicted hit rate {old_hit:.1%} -> {new_hit:.1%}")
        return None
    # a promoted layer trades a little hit rate for a hand-off: judged by predicted speed
    old_ts, new_ts = (predict_speed(inv, p, exp, True, bw, opts.n_ctx, opts.n_ubatch,
                                    op_offload=opts.op_offload).decode_tokens_per_s for exp in (prev_exp, new_exp))
    if new_ts > old_ts * (1 + SPEED_HYSTERESIS):
        notes.append(f"re-planned: predicted decode {old_ts:.1f} -> {new_ts:.1f} tok/s")
        return None
    placement = TensorPlacement(tuple(_rules_for(inv, prev_whole, layer_devices(inv.n_layer, gpus, split),
                                                 sum(1 for l in inv.layers if l.is_moe))), n_gpu_layers=-1)
    pred = predict_memory(inv, placement, opts, hot=prev_hot, gpus=gpus,
                          hot_device=hot_device if len(gpus) > 1 else previous.hot_device or gpus[0],
                          tensor_split=split)
    if any(d.total > budgets[n] for n, d in pred.devices.items() if n in budgets):
        notes.append("the previous plan no longer fits the budget; re-planned")
        return None
    notes.append(f"kept the previous hot set: the new choice would gain {new_hit - old_hit:+.2%} hit rate "
                 f"(threshold {threshold:.1%})")
    return prev_hot, prev_whole


def _prev_whole(inv, previous: Plan, gpus, split) -> dict:
    """{layer: GPU} of the previous plan's whole layers: by rule, or their layer's own GPU."""
    out = {}
    if previous.n_gpu_layers == 0:
        return out
    pl = previous.placement()
    ldev = layer_devices(inv.n_layer, gpus, split)
    for l in previous.whole_layers(inv):
        t = pl.target_for(inv.layers[l].expert_tensors[0])
        out[l] = t if t in gpus else (ldev[l] if t is None else gpus[0] if t.lower() == "gpu" else t)
    return out


# --- diffs ------------------------------------------------------------------------------------


@dataclass
class PlanDiff:
    promoted: dict = field(default_factory=dict)  # layer -> experts newly on the GPU
    demoted: dict = field(default_factory=dict)  # layer -> experts back on the CPU
    hit_before: float = 0.0
    hit_after: float = 0.0
    decode_before: float = 0.0
    decode_after: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.promoted or self.demoted)

    def summary(self) -> str:
        n_up = sum(len(v) for v in self.promoted.values())
        n_down = sum(len(v) for v in self.demoted.values())
        if not self.changed:
            return (f"plan unchanged (predicted hit rate {self.hit_after:.1%}, "
                    f"{self.decode_after:.1f} tokens/s decode)")
        return (f"{n_up} experts promoted in {len(self.promoted)} layers, {n_down} demoted in "
                f"{len(self.demoted)} layers; predicted hit rate {self.hit_before:.1%} -> {self.hit_after:.1%}, "
                f"decode {self.decode_before:.1f} -> {self.decode_after:.1f} tokens/s")

    def to_dict(self) -> dict:
        return {"promoted": {str(k): v for k, v in self.promoted.items()},
                "demoted": {str(k): v for k, v in self.demoted.items()},
                "hit_before": self.hit_before, "hit_after": self.hit_after,
                "decode_before": self.decode_before, "decode_after": self.decode_after}


def diff_plans(old: Plan, new: Plan, inventory=None, profile=None, prior: float = 1.0) -> PlanDiff:
    """Experts promoted/demoted between two plans of one model. With the inventory and a
    profile, both hit rates are re-evaluated under that profile (apples to apples);
    otherwise each plan's own prediction is reported."""
    if old.fingerprint != new.fingerprint:
        raise HybridError("cannot diff plans of two different models")
    if inventory is not None:
        a, b = old.gpu_experts(inventory), new.gpu_experts(inventory)
        if old.n_gpu_layers == 0:
            a = {}
        if new.n_gpu_layers == 0:
            b = {}
    else:
        a = {int(k): list(v) for k, v in old.hot.items()}
        b = {int(k): list(v) for k, v in new.hot.items()}
    promoted, demoted = {}, {}
    for l in sorted(set(a) | set(b)):
        sa, sb = set(a.get(l, ())), set(b.get(l, ()))
        if sb - sa:
            promoted[l] = sorted(sb - sa)
        if sa - sb:
            demoted[l] = sorted(sa - sb)
    d = PlanDiff(promoted, demoted, old.predicted.hit_rate, new.predicted.hit_rate,
                 old.predicted.decode_tokens_per_s, new.predicted.decode_tokens_per_s)
    if inventory is not None and profile is not None:
        p = decode_probs(profile, inventory, prior)
        d.hit_before, d.hit_after = hit_rate(p, a), hit_rate(p, b)
    return d
