"""Trace replay: how would static plans and dynamic expert caches have done on a recorded
routing trace?

The trace is split in time: the first part is the profile (static plans are chosen from
its counts; dynamic caches warm up on it), the rest is the evaluation. Every expert
selection of the evaluation part is one access; a hit is an access to an expert held in
GPU memory. Policies, all with the same number of expert slots:

- static: the planner's choice from the profile part (top experts by selections per token
  of their layer; slot sizes are equal, so this is the byte-optimal set);
- oracle: the best static set for the evaluation part itself: its most accessed experts
  (an upper bound for any static set of as many experts, the plan's included);
- LRU and LFU: one cache of expert slots shared by all layers; every miss loads the expert
  (what a dynamic cache would copy over PCIe per token).

Trace files (.npz): either `ids` [n_tokens, n_layer, k] (-1 where a layer did not route
the token), or the recorder's ring buffer `token` [N], `layer` [N], `ids` [N, k].
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.checks import MAX_EXPERTS, MAX_LAYERS
from hybrid_gguf.routing.stats import selection_probs

# a trace file's arrays are bounded before they are read: 16 M entries (20 thousand tokens of
# a 48-layer top-8 model). Replaying costs about 150 bytes of memory per entry: 64 M entries
# took 9.4 GB and over a minute on the development machine.
MAX_TRACE_ENTRIES = 1 << 24
MAX_TRACE_FILE_BYTES = 1 << 30
# the shapes llama.cpp itself allows (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS)
MAX_TRACE_LAYERS = MAX_LAYERS
MAX_TRACE_EXPERTS = MAX_EXPERTS


@dataclass
class Trace:
    ids: np.ndarray  # int32 [n_tokens, n_layer, k]; -1 = not routed
    n_expert: int

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_layer(self) -> int:
        return int(self.ids.shape[1])

    def counts(self, start: int = 0, stop: Optional[int] = None) -> tuple:
        """(selections [n_layer, n_expert], routed tokens [n_layer]) of tokens start:stop."""
        part = self.ids[start:stop]
        L, E = self.n_layer, self.n_expert
        counts = np.zeros((L, E))
        for l in range(L):
            sel = part[:, l, :].reshape(-1)
            sel = sel[sel >= 0]
            counts[l] = np.bincount(sel, minlength=E)[:E]
        tokens = (part >= 0).any(axis=2).sum(axis=0).astype(np.float64)
        return counts, tokens


def trace_from_records(token: np.ndarray, layer: np.ndarray, ids: np.ndarray,
                       n_layer: Optional[int] = None, n_expert: Optional[int] = None) -> Trace:
    """A Trace from the recorder's ring buffer (record i: token[i] at layer[i] used ids[i])."""
    token = np.asarray(token).reshape(-1)
    layer = np.asarray(layer).reshape(-1)
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(token) or len(layer) != len(token):
        raise HybridError(f"ring-buffer trace needs token [N], layer [N], ids [N, k]; got "
                          f"{token.shape}, {layer.shape}, {ids.shape}")
    if len(token) == 0 or ids.shape[1] == 0:
        raise HybridError("the routing trace is empty")
    if ids.shape[1] > MAX_TRACE_EXPERTS:
        raise HybridError(f"the routing trace has {ids.shape[1]} experts per token, more than llama.cpp allows")
    if layer.min() < 0:
        raise HybridError("the routing trace has negative layer numbers")
    if layer.max() >= MAX_TRACE_LAYERS:
        raise HybridError(f"the routing trace names layer {int(layer.max())}, more than llama.cpp allows")
    L = int(n_layer or layer.max() + 1)
    if layer.max() >= L:
        raise HybridError(f"the routing trace names layer {int(layer.max())}, the model has {L}")
    # tokens in order of first appearance (the ring buffer may start mid-sequence)
    uniq, first = np.unique(token, return_index=True)
    if len(uniq) * L * ids.shape[1] > MAX_TRACE_ENTRIES:
        raise HybridError(f"the routing trace spans {len(uniq)} tokens of {L} layers: more than a routing "
                          f"trace can be ({MAX_TRACE_ENTRIES} entries)")
    order = uniq[np.argsort(first, kind="stable")]
    row = {int(t): i for i, t in enumerate(order)}
    out = np.full((len(order), L, ids.shape[1]), -1, dtype=np.int32)
    for t, l, sel in zip(token, layer, ids):
        out[row[int(t)], int(l)] = sel
    return _checked(Trace(out, int(n_expert or max(int(ids.max()) + 1, 1))))


def trace_from_routing(routing_trace, n_layer: int, n_expert: int) -> Trace:
    """A Trace from recorder.RoutingTrace (RoutingRecorder(..., trace_capacity=N).snapshot().trace)."""
    return trace_from_records(routing_trace.token, routing_trace.layer, routing_trace.ids, n_layer, n_expert)


def _checked(trace: Trace) -> Trace:
    if trace.ids.ndim != 3:
        raise HybridError(f"trace ids must be [n_tokens, n_layer, k], got shape {trace.ids.shape}")
    if 0 in trace.ids.shape:
        raise HybridError(f"the routing trace is empty (ids of shape {trace.ids.shape})")
    if trace.n_layer > MAX_TRACE_LAYERS or trace.ids.shape[2] > MAX_TRACE_EXPERTS:
        raise HybridError(f"the routing trace has {trace.n_layer} layers and {trace.ids.shape[2]} experts per "
                          f"token; llama.cpp allows at most {MAX_TRACE_LAYERS} and {MAX_TRACE_EXPERTS}")
    if not 1 <= trace.n_expert <= MAX_TRACE_EXPERTS:
        raise HybridError(f"the routing trace's n_expert must be within 1..{MAX_TRACE_EXPERTS}, got {trace.n_expert}")
    if trace.ids.max() >= trace.n_expert:
        raise HybridError(f"the routing trace names expert {int(trace.ids.max())}, "
                          f"the model has {trace.n_expert} per layer")
    if trace.ids.min() < -1:
        raise HybridError("the routing trace has negative expert ids")
    return trace


def _npz_entries(data, key: str) -> int:
    """Entries of array `key` of an open .npz, from its header alone."""
    with data.zip.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read(f)[0]
    return int(np.prod(shape, dtype=object))


def _int_array(data, key: str, ndim: int, path) -> np.ndarray:
    a = data[key]
    if a.dtype.kind not in "iu" or a.ndim != ndim:
        raise HybridError(f"{path}: `{key}` must be an integer array of {ndim} dimension(s), "
                          f"got {a.dtype} of shape {a.shape}")
    if a.size and (int(a.max()) > np.iinfo(np.int32).max or int(a.min()) < np.iinfo(np.int32).min):
        raise HybridError(f"{path}: `{key}` holds numbers beyond 32 bits")
    return a


def load_trace(path, n_layer: Optional[int] = None, n_expert: Optional[int] = None) -> Trace:
    import zipfile
    import zlib

    from hybrid_gguf.readfile import check_regular

    path = check_regular(path, "trace file", MAX_TRACE_FILE_BYTES)
    unreadable = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
    try:
        data = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise HybridError(f"cannot read trace {path}: {str(exc)[:200] or type(exc).__name__}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise HybridError(f"{path}: a routing trace is an .npz archive")
    with data:
        keys = set(data.files)
        try:
            for key in keys:
                if _npz_entries(data, key) > MAX_TRACE_ENTRIES:
                    raise HybridError(f"{path}: array {key!r} is larger than a routing trace can be "
                                      f"({MAX_TRACE_ENTRIES} entries)")
            if "n_expert" in keys and n_expert is None:
                ne = _int_array(data, "n_expert", 0, path)
                n_expert = int(ne)
                if not 1 <= n_expert <= MAX_TRACE_EXPERTS:
                    raise HybridError(f"{path}: n_expert must be within 1..{MAX_TRACE_EXPERTS}, got {n_expert}")
            if "token" in keys and "layer" in keys and "ids" in keys:
                return trace_from_records(_int_array(data, "token", 1, path), _int_array(data, "layer", 1, path),
                                          _int_array(data, "ids", 2, path), n_layer, n_expert)
            if "ids" in keys:
                ids = _int_array(data, "ids", 3, path).astype(np.int32)
                if n_layer is not None and ids.shape[1] != n_layer:
                    raise HybridError(f"trace has {ids.shape[1]} layers, the model has {n_layer}")
                return _checked(Trace(ids, int(n_expert or max(int(ids.max(initial=-1)) + 1, 1))))
        except unreadable as exc:
            raise HybridError(f"cannot read trace {path}: {str(exc)[:200] or type(exc).__name__}") from None
    raise HybridError(f"{path}: expected `ids` [n_tokens, n_layer, k] or the ring buffer "
                      "`token`, `layer`, `ids` arrays")


def save_trace(path, trace: Trace) -> Path:
    """Written atomically; numpy's rule applies: a name without ".npz" gets it."""
    import io

    from hybrid_gguf.atomic import atomic_write

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=trace.ids, n_expert=np.int64(trace.n_expert))
    atomic_write(path, buf.getvalue())
    return path


# --- policies --------------------------------------------------------------------------------


def _accesses(trace: Trace, start: int, stop: Optional[int] = None) -> np.ndarray:
    """Item ids (layer * n_expert + expert) of every selection in time order."""
    part = trace.ids[start:stop]
    items = part + (np.arange(trace.n_layer) * trace.n_expert)[None, :, None]
    flat = items.reshape(-1)
    return flat[part.reshape(-1) >= 0]


def static_hit(items: np.ndarray, held: np.ndarray) -> float:
    return float(held[items].mean()) if len(items) else 0.0


def top_items(p: np.ndarray, capacity: int) -> np.ndarray:
    """Bool mask over items of the `capacity` largest p (ties: lower layer, lower id)."""
    flat = p.reshape(-1)
    order = np.lexsort((np.arange(len(flat)), -flat))
    mask = np.zeros(len(flat), dtype=bool)
    mask[order[:max(0, min(capacity, len(flat)))]] = True
    return mask


def lru_hits(warm: np.ndarray, items: np.ndarray, capacity: int) -> tuple:
    """(hits, misses) of an LRU cache over `items` after running through `warm`."""
    if capacity <= 0:
        return 0, len(items)
    cache: OrderedDict = OrderedDict()
    hits = 0
    for phase, seq in ((0, warm), (1, items)):
        for it in seq.tolist():
            if it in cache:
                cache.move_to_end(it)
                hits += phase
            else:
                cache[it] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits, len(items) - hits


def lfu_hits(warm: np.ndarray, items: np.ndarray, capacity: int) -> tuple:
    """(hits, misses) of a perfect-LFU cache (counts kept across evictions; ties evict the
    least recently used) over `items` after running through `warm`."""
    if capacity <= 0:
        return 0, len(items)
    freq: dict = {}
    cached: dict = {}  # item -> (count, last use) as pushed in the heap
    heap: list = []
    hits = 0
    clock = 0
    for phase, seq in ((0, warm), (1, items)):
        for it in seq.tolist():
            clock += 1
            freq[it] = freq.get(it, 0) + 1
            if it in cached:
                hits += phase
            elif len(cached) >= capacity:
                while True:  # lazy deletion: skip stale heap entries
                    c, t, victim = heapq.heappop(heap)
                    if cached.get(victim) == (c, t):
                        del cached[victim]
                        break
            cached[it] = (freq[it], clock)
            heapq.heappush(heap, (freq[it], clock, it))
    return hits, len(items) - hits


# --- the replay ------------------------------------------------------------------------------


@dataclass
class ReplayRow:
    label: str  # budget label ("10% of experts", "8.00 GiB")
    capacity: int  # expert slots
    static: float
    oracle: float
    lru: float
    lfu: float
    lru_loads_per_token: float  # experts a dynamic LRU cache would copy per token
    lfu_loads_per_token: float
    plan: Optional[float] = None  # the planner's own set at this budget, when given
    budget_bytes: Optional[int] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReplayReport:
    n_profile_tokens: int
    n_eval_tokens: int
    rows: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"n_profile_tokens": self.n_profile_tokens, "n_eval_tokens": self.n_eval_tokens,
                "rows": [r.to_dict() for r in self.rows], "verdicts": list(self.verdicts)}


def replay(trace: Trace, capacities: Sequence[int], profile_fraction: float = 0.5,
           labels: Optional[Sequence[str]] = None, plan_sets: Optional[Sequence[Optional[Mapping]]] = None,
           budget_bytes: Optional[Sequence[Optional[int]]] = None, expert_bytes: Optional[float] = None,
           margin: float = 0.01, n_used: Optional[Sequence[int]] = None, prior: float = 0.0) -> ReplayReport:
    """Replay `trace` against static plans, the oracle, LRU and LFU at each capacity.

    plan_sets[i]: {layer: experts on GPU} of a real plan at capacities[i] (optional).
    expert_bytes: bytes of one expert, to say what a dynamic cache would move per token.
    """
    if not 0.0 < profile_fraction < 1.0:
        raise HybridError(f"profile fraction must be between 0 and 1, got {profile_fraction}")
    split = int(round(trace.n_tokens * profile_fraction))
    if split < 1 or split >= trace.n_tokens:
        raise HybridError(f"a trace of {trace.n_tokens} tokens is too short to split into profile and "
                          "evaluation parts")
    k = list(n_used) if n_used is not None else [trace.ids.shape[2]] * trace.n_layer
    c_prof, t_prof = trace.counts(0, split)
    c_eval, t_eval = trace.counts(split)
    p_prof = selection_probs(c_prof, t_prof, k, prior)
    warm, items = _accesses(trace, 0, split), _accesses(trace, split)
    n_eval = trace.n_tokens - split
    report = ReplayReport(split, n_eval)
    for i, cap in enumerate(capacities):
        lru_h, lru_m = lru_hits(warm, items, cap)
        lfu_h, lfu_m = lfu_hits(warm, items, cap)
        row = ReplayRow(
            label=labels[i] if labels else f"{cap} slots",
            capacity=int(cap),
            static=static_hit(items, top_items(p_prof, cap)),
            # by accesses, not per-token probability: layers that route fewer tokens (a -1 in
            # the trace) would otherwise rank above busier ones and the bound would not hold
            oracle=static_hit(items, top_items(c_eval, cap)),
            lru=lru_h / len(items) if len(items) else 0.0,
            lfu=lfu_h / len(items) if len(items) else 0.0,
            lru_loads_per_token=lru_m / n_eval,
            lfu_loads_per_token=lfu_m / n_eval,
            budget_bytes=budget_bytes[i] if budget_bytes else None,
        )
        if plan_sets and plan_sets[i] is not None:
            held = np.zeros(trace.n_layer * trace.n_expert, dtype=bool)
            for l, es in plan_sets[i].items():
                for e in es:
                    held[int(l) * trace.n_expert + int(e)] = True
            row.plan = static_hit(items, held)
        report.rows.append(row)
    report.verdicts = _verdicts(report, expert_bytes, margin)
    return report


def _verdicts(report: ReplayReport, expert_bytes: Optional[float], margin: float) -> list:
    from hybrid_gguf.sizes import format_size

    out = []
    beaten = False
    for r in report.rows:
        if r.capacity == 0:
            continue
        planned = r.plan if r.plan is not None else r.static
        what = "the plan" if r.plan is not None else "the static plan"
        name, dyn, loads = max((("LRU", r.lru, r.lru_loads_per_token), ("LFU", r.lfu, r.lfu_loads_per_token)),
                               key=lambda x: x[1])
        if dyn > planned + margin:
            beaten = True
            moved = f" ({format_size(loads * expert_bytes)} per token over PCIe)" if expert_bytes else ""
            out.append(f"{r.label}: a dynamic {name} cache would beat {what}, {dyn:.1%} vs {planned:.1%} "
                       f"hit rate, but it loads {loads:.2f} experts per token{moved}")
        if r.plan is not None and r.static > r.plan + 0.05:
            out.append(f"{r.label}: per-expert placement of the same slots would reach {r.static:.1%} "
                       f"vs the plan's {r.plan:.1%} (whole tensors)")
        if r.oracle > r.static + 0.05:
            out.append(f"{r.label}: the profiled static set reaches {r.static:.1%} of the {r.oracle:.1%} an "
                       "oracle static set gets on this trace: routing drifted from the profile part")
    if not beaten:
        out.insert(0, f"the static plan is within {margin:.0%} of LRU and LFU (or better) at every "
                      "budget: a dynamic expert cache would not pay here")
    return out


def plot_replay(report: ReplayReport, path, title: str = "expert hit rate vs budget") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    use_bytes = all(r.budget_bytes for r in rows)
    scale, unit = (2**30, "GiB") if use_bytes and max(r.budget_bytes for r in rows) >= 2**30 else (2**20, "MiB")
    x = [r.budget_bytes / scale for r in rows] if use_bytes else [r.capacity for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r.oracle for r in rows], "k--", label="oracle static (eval part)")
    ax.plot(x, [r.static for r in rows], "o-", label="static, profiled on first part")
    if any(r.plan is not None for r in rows):
        ax.plot([xi for xi, r in zip(x, rows) if r.plan is not None],
                [r.plan for r in rows if r.plan is not None], "s-", label="planner's plan")
    ax.plot(x, [r.lru for r in rows], "^-", label="LRU cache")
    ax.plot(x, [r.lfu for r in rows], "v-", label="LFU cache")
    ax.set_xlabel(f"GPU budget ({unit})" if use_bytes else "expert slots on the GPU")
    ax.set_ylabel("hit rate (expert selections served from GPU)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\nprofile {report.n_profile_tokens} tokens, evaluated on {report.n_eval_tokens}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    from hybrid_gguf.atomic import save_figure

    try:
        return save_figure(fig, Path(path), dpi=120)
    finally:
        plt.close(fig)
