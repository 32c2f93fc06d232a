"""Python side of the native routing recorder (hybrid_gguf/llama/native/recorder.c).

Usage::

    loaded = load_llama(path, ..., record=Recording(trace_records=4096))   # llama/loader.py
    ...generate with loaded.llm...
    snap = loaded.recorder.snapshot()      # counts by phase, tokens per layer, optional trace
    loaded.close()

The recorder must outlive every context it is attached to (the C callback holds a
raw pointer to it); the params struct of the context keeps a reference, and callers
should also keep one next to the `Llama`.  Attach one recorder to one context only: it
tells graphs apart by the layer index restarting.

Phases: a graph (ubatch) is "prompt" when its first MoE layer routes more than one token,
"decode" when it routes exactly one (so a one-token prompt chunk counts as decode).  The
last layer is not used to decide: during prompt processing it only routes output rows.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from hybrid_gguf.errors import HybridError

STAT_NAMES = (
    "graphs",
    "observed",
    "anomalies",
    "bad_ids",
    "trace_written",
    "tokens_seen",
    "device_reads",
    "weight_nodes",
)
ABI_VERSION = 2


class RecorderUnavailable(HybridError):
    """The native recorder cannot be built or loaded here; routing recording is off."""


@dataclass(frozen=True)
class Recording:
    """How load_llama records routing: the newest `trace_records` per-token (token, layer)
    records are kept (0: counts only), and one decoded token in `decode_stride` is observed
    (1: every one; more: in bursts, see DecodeSampler). Prompt batches are always observed."""

    trace_records: int = 0
    decode_stride: int = 1


@dataclass
class RoutingTrace:
    """Per-token routing, oldest first: record i is token[i] at layer[i] using ids[i]."""

    token: np.ndarray  # int64 [N]
    layer: np.ndarray  # int32 [N]
    ids: np.ndarray  # int32 [N, n_expert_used]
    written: int  # records written since reset; more than N means the oldest were dropped


@dataclass
class RoutingSnapshot:
    counts_prompt: np.ndarray  # int64 [n_layer, n_expert]
    counts_decode: np.ndarray
    tokens_prompt: np.ndarray  # int64 [n_layer]
    tokens_decode: np.ndarray
    n_expert_used: int
    stats: dict = field(default_factory=dict)
    weight_mass_prompt: Optional[np.ndarray] = None  # mean top-k router mass per layer
    weight_mass_decode: Optional[np.ndarray] = None
    coactivation: Optional[np.ndarray] = None  # uint32 [n_layer, n_expert, n_expert]
    trace: Optional[RoutingTrace] = None

    @property
    def counts(self) -> np.ndarray:
        return self.counts_prompt + self.counts_decode

    @property
    def tokens_per_layer(self) -> np.ndarray:
        return self.tokens_prompt + self.tokens_decode


_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None
_lib_lock = threading.Lock()


def _mapped_ggml_base() -> set[str]:
    try:
        with open("/proc/self/maps") as fh:
            return {ln.split()[-1] for ln in fh if "libggml-base" in ln}
    except OSError:
        return set()


def _declare(lib: ctypes.CDLL) -> None:
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    p64, p32, pd = (ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32),
                    ctypes.POINTER(ctypes.c_double))
    sigs = {
        "hg_rec_abi_version": (i32, []),
        "hg_rec_create": (vp, [i32, i32, i32]),
        "hg_rec_destroy": (None, [vp]),
        "hg_rec_reset": (None, [vp]),
        "hg_rec_set_enabled": (None, [vp, i32]),
        "hg_rec_set_decode_stride": (None, [vp, i32]),
        "hg_rec_enable_weights": (None, [vp, i32]),
        "hg_rec_enable_trace": (i32, [vp, i64]),
        "hg_rec_enable_coact": (i32, [vp, i32]),
        "hg_rec_n_stats": (i32, []),
        "hg_rec_snapshot": (None, [vp, p64, p64, pd, p64, p64, i32]),
        "hg_rec_snapshot_coact": (i32, [vp, ctypes.POINTER(ctypes.c_uint32)]),
        "hg_rec_snapshot_trace": (i64, [vp, p64, p32, p32, i64, p64]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def load_library() -> ctypes.CDLL:
    """Build (cached) and load the recorder; raises RecorderUnavailable with the reason."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise RecorderUnavailable(_lib_error)
        try:
            from hybrid_gguf.llama.native.build import BuildError, build_recorder

            try:
                built = build_recorder()  # imports llama_cpp first: libggml-base is mapped
            except BuildError as exc:
                raise RecorderUnavailable(f"routing recorder unavailable: {exc}") from None
            before = _mapped_ggml_base()
            try:
                lib = ctypes.CDLL(str(built.path), mode=ctypes.RTLD_LOCAL)
            except OSError as exc:
                raise RecorderUnavailable(f"routing recorder failed to load: {exc}") from None
            after = _mapped_ggml_base()
            if before and after - before:
                # a second libggml-base would see none of llama.cpp's buffers
                raise RecorderUnavailable(
                    f"routing recorder mapped a second libggml-base ({sorted(after - before)})"
                )
            _declare(lib)
            if lib.hg_rec_abi_version() != ABI_VERSION:
                raise RecorderUnavailable("routing recorder ABI version mismatch")
        except RecorderUnavailable as exc:
            _lib_error = str(exc)
            raise
        _lib = lib
        return lib


def recorder_status() -> tuple[bool, str]:
    """(available, reason): whether routing can be recorded in this process."""
    try:
        load_library()
    except RecorderUnavailable as exc:
        return False, str(exc)
    return True, "ok"


def _ptr(a: np.ndarray, ctype) -> Any:
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class RoutingRecorder:
    """Counts expert selections per layer × expert from inside llama.cpp's graph."""

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        n_expert_used: int,
        *,
        trace_capacity: int = 0,
        coactivation: bool = False,
        weight_mass: bool = False,
    ) -> None:
        if not (n_layer > 0 and n_expert > 0 and 0 < n_expert_used <= n_expert):
            raise HybridError(
                f"bad recorder shape: {n_layer} layers, {n_expert} experts, {n_expert_used} used"
            )
        self._lib = load_library()
        self.n_layer, self.n_expert, self.n_expert_used = n_layer, n_expert, n_expert_used
        handle = self._lib.hg_rec_create(n_layer, n_expert, n_expert_used)
        if not handle:
            raise RecorderUnavailable("routing recorder: out of memory")
        self._handle = ctypes.c_void_p(handle)
        import llama_cpp.llama_cpp as bindings

        # a CFUNCTYPE object pointing at the C function: no Python runs per node
        addr = ctypes.cast(self._lib.hg_rec_cb, ctypes.c_void_p).value
        self._cb = bindings.ggml_backend_sched_eval_callback(addr)
        # the params struct keeps _cb alive, and _cb keeps us alive: no free while in use
        self._cb.recorder = self
        self._weight_mass = False
        self._coact = False
        self._trace_capacity = 0
        self.enable_trace(trace_capacity)
        self.enable_coactivation(coactivation)
        self.enable_weight_mass(weight_mass)

    # -- wiring ---------------------------------------------------------------

    def attach(self) -> Callable[[Any], None]:
        """A context_patch for `construct_llama` that installs this recorder as cb_eval."""
        self._check_open()

        def patch(params: Any) -> None:
            params.cb_eval = self._cb
            params.cb_eval_user_data = self._handle.value

        return patch

    # -- options --------------------------------------------------------------

    def enable_trace(self, capacity: int) -> None:
        """Keep the newest `capacity` (token, layer) routing records; 0 turns it off."""
        self._check_open()
        if self._lib.hg_rec_enable_trace(self._handle, int(max(0, capacity))) != 0:
            raise HybridError(f"routing trace of {capacity} records: out of memory")
        self._trace_capacity = int(max(0, capacity))

    def enable_coactivation(self, on: bool) -> None:
        self._check_open()
        if self._lib.hg_rec_enable_coact(self._handle, int(bool(on))) != 0:
            raise HybridError("co-activation counts: out of memory")
        self._coact = bool(on)

    def enable_weight_mass(self, on: bool) -> None:
        """Also observe ffn_moe_weights-<il> (one more sync per layer) for top-k mass."""
        self._check_open()
        self._lib.hg_rec_enable_weights(self._handle, int(bool(on)))
        self._weight_mass = bool(on)

    def set_decode_stride(self, stride: int) -> None:
        """Observe one decode graph (token) in `stride`; prompt batches are always observed.

        Each observed layer costs the scheduler a synchronization (on a GPU about +49 % decode
        time when every token is observed, docs/benchmarks.md), so always-on recording in
        `run` samples; the counts stay consistent (tokens per layer count sampled tokens only).
        """
        self._check_open()
        self._lib.hg_rec_set_decode_stride(self._handle, int(max(1, stride)))

    def decode_sampler(self, ctx: Any, stride: int, burst: int = 8) -> "DecodeSampler":
        """Sampling of decoded tokens for a context made with `attach()`; see DecodeSampler."""
        self._check_open()
        return DecodeSampler(self, ctx, stride, burst)

    def set_enabled(self, on: bool) -> None:
        """Pause (False) or resume recording; paused, the callback asks for nothing."""
        self._check_open()
        self._lib.hg_rec_set_enabled(self._handle, int(bool(on)))

    # -- data -----------------------------------------------------------------

    def reset(self) -> None:
        self._check_open()
        self._lib.hg_rec_reset(self._handle)

    def snapshot(self, trace: bool = True) -> RoutingSnapshot:
        """A consistent copy of everything recorded since the last reset."""
        self._check_open()
        L, E, K = self.n_layer, self.n_expert, self.n_expert_used
        counts = np.zeros((2, L, E), dtype=np.int64)
        tokens = np.zeros((2, L), dtype=np.int64)
        mass = np.zeros((2, L), dtype=np.float64)
        mass_n = np.zeros((2, L), dtype=np.int64)
        n_stats = self._lib.hg_rec_n_stats()
        stats = np.zeros(n_stats, dtype=np.int64)
        self._lib.hg_rec_snapshot(
            self._handle, _ptr(counts, ctypes.c_int64), _ptr(tokens, ctypes.c_int64),
            _ptr(mass, ctypes.c_double), _ptr(mass_n, ctypes.c_int64),
            _ptr(stats, ctypes.c_int64), n_stats,
        )
        snap = RoutingSnapshot(
            counts_prompt=counts[0], counts_decode=counts[1],
            tokens_prompt=tokens[0], tokens_decode=tokens[1], n_expert_used=K,
            stats={name: int(v) for name, v in zip(STAT_NAMES, stats)},
        )
        if self._weight_mass:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(mass_n > 0, mass / np.maximum(mass_n, 1), np.nan)
            snap.weight_mass_prompt, snap.weight_mass_decode = mean[0], mean[1]
        if self._coact:
            co = np.zeros((L, E, E), dtype=np.uint32)
            if self._lib.hg_rec_snapshot_coact(self._handle, _ptr(co, ctypes.c_uint32)) == 0:
                snap.coactivation = co
        if trace and self._trace_capacity > 0:
            cap = self._trace_capacity
            tok = np.zeros(cap, dtype=np.int64)
            lay = np.zeros(cap, dtype=np.int32)
            ids = np.zeros((cap, K), dtype=np.int32)
            written = ctypes.c_int64(0)
            n = self._lib.hg_rec_snapshot_trace(
                self._handle, _ptr(tok, ctypes.c_int64), _ptr(lay, ctypes.c_int32),
                _ptr(ids, ctypes.c_int32), cap, ctypes.byref(written),
            )
            snap.trace = RoutingTrace(tok[:n].copy(), lay[:n].copy(), ids[:n].copy(), written.value)
        return snap

    # -- lifetime -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._handle is None:
            raise HybridError("routing recorder is closed")

    def close(self) -> None:
        """Free the C state. Only call once no context using it will decode again."""
        if getattr(self, "_handle", None) is not None:
            self._lib.hg_rec_destroy(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover - depends on GC timing
        try:
            self.close()
        except Exception:
            pass


class DecodeSampler:
    """Observe every prompt batch and one decoded token in `stride`, in bursts.

    Call `before_decode(n_tokens)` before each llama_decode of the context. With a hybrid
    patch of version 2 or later the recorder's callback is taken off the context for the
    tokens it skips, so they run exactly as without a recorder: a context with any cb_eval
    synchronizes after every scheduler split, which on a GPU cost +8.7 % per token even when
    the callback asked for nothing (docs/benchmarks.md). Each switch of the callback costs
    time too: there, the two tokens after a switch took ~15 ms more between them (likely the
    CUDA graph being re-captured), so the observed
    tokens come in bursts of `burst` consecutive ones, the last of every `stride * burst`
    tokens. Other builds keep the callback and let the C recorder skip by its own stride.
    """

    def __init__(self, recorder: RoutingRecorder, ctx: Any, stride: int, burst: int = 8) -> None:
        from hybrid_gguf.llama import hybrid as hybrid_backend

        self.stride = int(max(1, stride))
        self.burst = int(max(1, burst))
        self._recorder = recorder
        self._ctx = ctx
        self._setter = hybrid_backend.eval_callback_setter() if self.stride > 1 else None
        self.switches_callback = self._setter is not None
        self._n_decoded = 0
        self._on = True
        # with the switch, the C recorder sees only the graphs it should count
        recorder.set_decode_stride(1 if self.switches_callback else self.stride)

    def observes(self, n_tokens: int) -> bool:
        """Whether the next decode of n_tokens is observed (does not advance the count).
        A burst closes its period, so short generations pay nothing for decode sampling."""
        period = self.stride * self.burst
        return n_tokens > 1 or self._n_decoded % period >= period - self.burst

    def before_decode(self, n_tokens: int) -> None:
        if not self.switches_callback:
            return
        observe = self.observes(n_tokens)
        if n_tokens == 1:
            self._n_decoded += 1
        if observe != self._on:
            rec = self._recorder
            if observe:
                self._setter(self._ctx, ctypes.cast(rec._cb, ctypes.c_void_p), rec._handle)
            else:
                self._setter(self._ctx, None, None)
            self._on = observe
