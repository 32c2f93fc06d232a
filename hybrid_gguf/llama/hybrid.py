"""The per-expert channel into the hybrid-patched llama.cpp (hybrid_gguf/backend/llama-cpp-hybrid.patch).

The patch exports `llama_hybrid_*` functions from libllama. A plan is handed over as text
(planning/placement.py's plan_text) right before a model load; the loader copies the
listed experts into hot packs on the chosen buffer type. A stock build lacks the symbols: `capability()` says so and callers
fall back to whole-tensor placement.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

from hybrid_gguf.errors import STOCK_NOTICE, HybridError
from hybrid_gguf.planning.placement import COLD_BOTH, COLD_ON_GPU, HANDOFF_WORKER, per_layer_pack_text


@dataclass(frozen=True)
class Capability:
    per_expert: bool
    version: int
    reason: str


def _libllama() -> ctypes.CDLL:
    import llama_cpp.llama_cpp as bindings

    return bindings._lib


def _fn(name: str, restype, argtypes) -> Optional[ctypes._CFuncPtr]:
    lib = _libllama()
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return None
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def capability() -> Capability:
    fn = _fn("llama_hybrid_version", ctypes.c_int32, [])
    if fn is None:
        return Capability(per_expert=False, version=0, reason=STOCK_NOTICE)
    return Capability(per_expert=True, version=int(fn()), reason="hybrid-gguf patch present")


def eval_callback_setter() -> Optional[ctypes._CFuncPtr]:
    """`llama_hybrid_set_eval_callback(ctx, cb, user_data)` of a patch of version 2 or later,
    else None (stock builds, and older patches, only take cb_eval when a context is made)."""
    if capability().version < 2:
        return None
    # the callback travels as a plain address, so None can mean "no callback"
    return _fn("llama_hybrid_set_eval_callback", None, [ctypes.c_void_p] * 3)


def validate_hot(hot: Mapping[int, Sequence[int]], n_layer: int, n_expert_of_layer) -> None:
    """Clear errors before llama.cpp sees the plan (it would only fail the load)."""
    for layer, experts in hot.items():
        if not 0 <= int(layer) < n_layer:
            raise HybridError(f"hot set names layer {layer}, but the model has layers 0..{n_layer - 1}")
        n_exp = n_expert_of_layer(int(layer))
        if not len(experts):
            raise HybridError(f"hot set: layer {layer} lists no experts (leave the layer out)")
        if n_exp == 0:
            raise HybridError(f"hot set names layer {layer}, which has no routed experts")
        seen = set()
        for e in experts:
            if not 0 <= int(e) < n_exp:
                raise HybridError(f"hot set names expert {e} in layer {layer}, which has experts 0..{n_exp - 1}")
            if int(e) in seen:
                raise HybridError(f"hot set lists expert {e} twice in layer {layer}")
            seen.add(int(e))


@contextlib.contextmanager
def pending_plan(text: str) -> Iterator[None]:
    """Make `text` (placement.plan_text) the plan of the model load inside the block, and
    clear it afterwards."""
    if COLD_ON_GPU in text.split(";") and capability().version < 4:
        raise HybridError("cold experts on the GPU need hybrid patch version 4; rebuild the backend "
                          "with `hybrid-gguf backend install`")
    if any(item.startswith("cache=") for item in text.split(";")) and capability().version < 5:
        raise HybridError("the in-session expert cache needs hybrid patch version 5; rebuild the backend "
                          "with `hybrid-gguf backend install`")
    if per_layer_pack_text(text) and capability().version < 5:
        raise HybridError("hot packs on each layer's own GPU (several GPUs) need hybrid patch version 5; "
                          "rebuild the backend with `hybrid-gguf backend install`")
    if COLD_BOTH in text.split(";") and capability().version < 10:
        raise HybridError("cold experts read by both the GPU and the CPU need hybrid patch version 10; rebuild "
                          "the backend with `hybrid-gguf backend install`")
    if HANDOFF_WORKER in text.split(";") and capability().version < 6:
        raise HybridError("the CPU worker hand-off needs hybrid patch version 6; rebuild the backend "
                          "with `hybrid-gguf backend install`")
    fn = _fn("llama_hybrid_set_plan", ctypes.c_int32, [ctypes.c_char_p])
    if fn is None:
        raise HybridError(STOCK_NOTICE)
    if fn(text.encode()) != 0:
        raise HybridError(f"llama.cpp rejected the hybrid plan text: {text[:200]!r}")
    try:
        yield
    finally:
        fn(b"")  # a failed load must not leave the plan for the next one


@contextlib.contextmanager
def pending_route_trace(ids) -> Iterator[None]:
    """Make `ids` ([n_rows, n_layer, n_used] expert ids, by token position) the routing of
    the model loaded inside the block (patch version 3; benchmark models only), and clear
    it afterwards."""
    import numpy as np

    if capability().version < 3:
        raise HybridError("this backend cannot replay a routing trace (needs hybrid patch version 3); "
                          "rebuild it with `hybrid-gguf backend install`")
    fn = _fn("llama_hybrid_set_route_trace", ctypes.c_int32,
             [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32])
    arr = np.ascontiguousarray(ids, dtype=np.int32)
    if arr.ndim != 3 or 0 in arr.shape:
        raise HybridError(f"a routing trace is [n_rows, n_layer, n_used], got shape {arr.shape}")
    if fn(arr.ctypes.data, *arr.shape) != 0:
        raise HybridError("llama.cpp rejected the routing trace (a token lists an expert twice or a "
                          "negative one)")
    try:
        yield
    finally:
        fn(None, 0, 0, 0)


def pack_bytes(model_ptr) -> int:
    fn = _fn("llama_hybrid_model_pack_bytes", ctypes.c_size_t, [ctypes.c_void_p])
    return 0 if fn is None else int(fn(model_ptr))


class _CacheStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("hits", "misses", "uploads", "upload_bytes", "evictions", "steps",
                                                    "blocking_uploads", "page_locked_bytes", "step_us")]


def cache_stats(model_ptr) -> Optional[dict]:
    """The in-session cache's counters since load (patch version 5): routed selections of the
    layers with packs served by a resident expert (hits) or not (misses), uploads, their
    bytes, evictions and steps (ubatches); blocking_uploads (those the step waited for: on the
    CPU all, on CUDA those from pageable memory), page_locked_bytes (host memory locked so
    that uploads run beside decode) and step_us (host time the steps took); None when the
    model has no cache."""
    d = _counters("llama_hybrid_model_cache_stats", _CacheStats, model_ptr, 5)
    if d is None:
        return None
    served = d["hits"] + d["misses"]
    d["hit_rate"] = d["hits"] / served if served else None
    return d


class _WorkerStats(ctypes.Structure):
    # an older patch fills the first fields only; the rest stay 0
    _fields_ = [(name, ctypes.c_int64) for name in (
        "busy", "idle", "compute_us", "takeovers", "serve_us",
        "main_busy", "main_compute_us", "inline_graphs", "arrive_us", "arrive_max_us",
        "timed_roundtrips", "roundtrip_us", "answer_us", "timed_gaps", "gap_us",
        "prefetch_calls", "prefetch_cuts", "prefetch_bytes", "prefetch_us", "prefetch_hit_experts",
        "prefetch_cold_experts")]


def worker_stats(ctx_ptr) -> Optional[dict]:
    """The counters of a context's CPU worker (patch version 7, plan handoff=worker): hand-offs
    it computed (busy), hand-offs that named no cold expert (idle), its compute time, the
    graphs whose answers its own thread took over from the decoding thread (takeovers) and the
    decoding thread's time answering, waiting for the GPU's posts included (serve_us); of
    those, the busy hand-offs the decoding thread computed and their time (main_busy,
    main_compute_us); the graphs armed for the decoding thread to answer (inline_graphs) and
    its time from arming to answering, in all and at most (arrive_us, arrive_max_us: the
    compute call queueing the GPU's work). Version 12 adds a timeline of the busy hand-offs:
    timed_roundtrips of them took roundtrip_us of the device's time from post to the collect
    seeing the answer, answer_us of it the CPU's (noticing the post to answering); timed_gaps
    pairs of consecutive busy hand-offs in one graph spent gap_us of device time between one's
    answer seen and the next one's post. Version 17 adds the prefetch's counters
    (LLAMA_HYBRID_WORKER_PREFETCH=1): prefetch_calls runs, prefetch_cuts of them cut short by
    a post, prefetch_bytes read in prefetch_us; of the busy one-token posts' cold experts
    (prefetch_cold_experts), those their layer's last prefetch had read (prefetch_hit_experts).
    None when the context has no worker or the patch is older."""
    return _counters("llama_hybrid_context_worker_stats", _WorkerStats, ctx_ptr, 7)


def _counters(fn_name: str, struct, ptr, min_version: int) -> Optional[dict]:
    """`fn_name(ptr, &struct)` of a patch of `min_version` or later as {field: int}; None where
    the build lacks it or the function says there is nothing (it returns non-zero)."""
    if capability().version < min_version:
        return None
    fn = _fn(fn_name, ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(struct)])
    if fn is None:
        return None
    out = struct()
    if fn(ptr, ctypes.byref(out)) != 0:
        return None
    return {name: int(getattr(out, name)) for name, _ in struct._fields_}


def n_hot(model_ptr, layer: int) -> int:
    fn = _fn("llama_hybrid_model_n_hot", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32])
    return 0 if fn is None else int(fn(model_ptr, layer))


def pack_buffer_type(model_ptr, layer: int) -> Optional[str]:
    """The buffer type of a loaded layer's hot pack ("CUDA1", "CPU"); None when the layer has
    no pack or the patch is older than version 5."""
    if capability().version < 5:
        return None
    fn = _fn("llama_hybrid_model_pack_buft", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int32])
    name = None if fn is None else fn(model_ptr, layer)
    return None if name is None else name.decode()


def parse_hot_spec(spec: str) -> dict[int, list[int]]:
    """Parse the CLI's --hot "layer:e,e;layer:e" (',' inside, ';' or ' ' between layers)."""
    hot: dict[int, list[int]] = {}
    for item in spec.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        layer_txt, sep, experts_txt = item.partition(":")
        try:
            layer = int(layer_txt)
            experts = [int(x) for x in experts_txt.split(",") if x.strip()]
        except ValueError:
            raise HybridError(f"--hot expects 'layer:expert,expert;layer:...', got {item!r}") from None
        if not sep:
            raise HybridError(f"--hot expects 'layer:expert,expert;layer:...', got {item!r}")
        if not experts:
            raise HybridError(f"--hot: layer {layer} lists no experts (give 'layer:expert,expert', "
                              "or leave the layer out)")
        if layer in hot:
            raise HybridError(f"--hot names layer {layer} twice")
        hot[layer] = experts
    return hot
