"""HybridModel: a llama_cpp.Llama loaded with hybrid-gguf's placement and routing recorder."""

from __future__ import annotations

import codecs
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from hybrid_gguf.llama import devices as devices_mod
from hybrid_gguf import limits
from hybrid_gguf.autoplan import session_plan
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.routing import process as routing_process
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import Inventory, read_inventory
from hybrid_gguf.models import ResolvedModel, resolve_model

# Always-on recording observes one decoded token in this many (as bursts of 8 closing every
# 8 * stride tokens, recorder.DecodeSampler). On the H200 (48 layers, docs/benchmarks.md)
# each burst cycle cost ~50 ms: 8 observed tokens at +2.6 ms (a GPU sync per MoE layer),
# the rest the two callback switches (each slows the next two tokens). 1 in 32 cost 5.0 %
# of decode time, 1 in 64 2.5 %. Prompt batches are always observed. `hybrid-gguf profile`
# records every token.
RUN_DECODE_STRIDE = 64
# Per-token routing records a profiling session keeps (one per token and layer; older ones
# drop), for routing_stats' adjacent overlap and cache replays.
PROFILE_TRACE_RECORDS = 1 << 19


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prompt_ms: float
    gen_ms: float
    finish_reason: str

    @property
    def gen_tokens_per_s(self) -> float:
        return len(self.tokens) / (self.gen_ms / 1e3) if self.gen_ms > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1e3) if self.prompt_ms > 0 else 0.0


def _perf(llm) -> tuple[float, int, float, int]:
    import llama_cpp

    llama_cpp.llama_synchronize(llm._ctx.ctx)  # perf counters are updated on synchronize
    p = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return float(p.t_p_eval_ms), int(p.n_p_eval), float(p.t_eval_ms), int(p.n_eval)


class HybridModel:
    """Load a GGUF MoE model with experts placed per the plan, record routing, generate.

    `hot` ({layer: [expert, ...]}) forces a per-expert placement; `plan` applies a Plan (or a
    plan YAML path); otherwise, on a GPU machine, the model is planned from its stored routing
    profile for `gpu_budget` (total VRAM; default and upper bound: planning/budget.py) and the
    plan is kept for the next session (`auto_plan=False`: the planner's whole-layer plan,
    like --n-cpu-moe, instead). `n_cpu_moe` (experts of
    the first N layers on the CPU) or `cpu_moe` (every routed expert on the CPU) choose a
    whole-layer placement by hand, as llama.cpp's flags of those names do. `repack=False`
    keeps weights in plain CPU buffers (llama.cpp's use_extra_bufts off: no repacking into
    AMX or other extra buffer types, which can cost prompt speed on some hosts).
    `cpu_only=True` places as on a machine without a GPU (every weight on the CPU).
    `n_ubatch` (llama.cpp's -ub: prompt tokens per compute step, at most `n_ctx`; "auto": the
    planner's pick of autoplan.UBATCH_CHOICES) and `flash_attn`: the automatic plan is made
    for them (a larger ubatch prefills faster but its compute buffer leaves less VRAM for
    experts), the placements chosen by hand get them as they are ("auto": 512), and a `plan`
    fixes its own (asking for others is an error). None: the plan's, else 512 and off. The
    logical batch (llama.cpp's -b) is the ubatch, at least 512; `.placement` reports all
    three as llama.cpp took them. `type_k`/`type_v` (llama.cpp's -ctk/-ctv: the KV cache
    types of planning.memory.CACHE_TYPES, any case; a quantized V needs flash attention) go
    the same way: planned for, passed as given, or fixed by a `plan`; None: the plan's, else
    f16; `.placement` reports them as llama.cpp took them.
    `profiling=True` is a profiling session (`hybrid-gguf profile`): every decoded token is
    recorded, with a per-token trace, a bench model replays its profiling routing stream,
    and nothing is merged into the profile store on close: read `.recorder` instead.
    `inventory`: the model's header, when the caller has read it already.
    Everything `llama_cpp.Llama` offers stays reachable through `.llm`.

    One model serves one call at a time: every method that uses the llama.cpp context holds
    a lock, so calls from several threads run one after another (a generation is never
    interleaved with another); `close()` waits for the running call to finish. After
    `close()`, every such method (and `.llm`) raises HybridError("model is closed").
    """

    def __init__(
        self,
        model: Optional[Union[str, Path]] = None,
        *,
        gpu_budget: Union[None, int, str] = None,
        hot: Optional[Mapping[int, Sequence[int]]] = None,
        plan: Any = None,
        n_ctx: Optional[int] = None,
        n_ubatch: Union[None, int, str] = None,
        flash_attn: Optional[bool] = None,
        type_k: Optional[str] = None,
        type_v: Optional[str] = None,
        n_threads: Optional[int] = None,
        seed: int = 0,
        record: bool = True,
        profile_store: Any = None,
        label: Optional[str] = None,
        pack_device: Optional[str] = None,
        auto_plan: bool = True,
        n_cpu_moe: Optional[int] = None,
        cpu_moe: bool = False,
        repack: bool = True,
        cpu_only: bool = False,
        profiling: bool = False,
        inventory: Optional[Inventory] = None,
        verbose: bool = False,
        cache: Any = None,
        handoff: Optional[str] = None,
    ) -> None:
        limits.check_threads(n_threads, "n_threads")
        limits.check_ctx(n_ctx, "n_ctx")
        limits.check_ubatch(n_ubatch, None, "n_ubatch (--ubatch)")
        if handoff is not None and handoff not in HANDOFFS:
            raise HybridError(f"handoff must be {' or '.join(HANDOFFS)}, got {handoff!r}")
        self._lock = threading.RLock()
        self._owner_depth = threading.local()
        self._llm = None
        self._loaded = None
        self._closed = False
        self.resolved: ResolvedModel = resolve_model(None if model is None else str(model))
        self.path = self.resolved.path
        self.inventory: Inventory = inventory if inventory is not None else read_inventory(self.path)
        n_ctx = limits.default_ctx(self.inventory, n_ctx)  # the model's, at most DEFAULT_CTX
        limits.check_ubatch(n_ubatch, n_ctx, "n_ubatch (--ubatch)")
        self.label = label
        self._profile_store = profile_store
        self.cpu_only = bool(cpu_only)
        self.profiling = bool(profiling)
        self.recorder = None
        self.decode_sampler = None
        self.recorder_notice: Optional[str] = None

        gpus = [] if self.cpu_only else devices_mod.gpu_devices()
        chosen = session_plan(self.path, self.inventory, gpus, n_ctx, gpu_budget=gpu_budget, hot=hot, plan=plan,
                              pack_device=pack_device, auto_plan=auto_plan, n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe,
                              n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k, type_v=type_v)
        self.plan = chosen.plan  # the Plan applied, if any
        self.repack = bool(repack)
        self.placement = summary = chosen.summary
        # an explicit `cache` wins; else the plan's (`cache:` in a plan file)
        self.cache = _cache_options(cache if cache is not None else chosen.cache)
        if self.cache.active and not chosen.hot:
            summary.notices.append(f"cache {self.cache.policy}: this placement has no hot packs to adapt; "
                                   "the session runs without a cache")
            self.cache = _cache_options(None)
        elif self.cache.active:
            summary.description += f"; in-session cache {self.cache.policy} (at most {self.cache.quota} uploads per step)"
        self.worker = _worker_choice(handoff, chosen, summary)

        recording = self._recording() if record and self.inventory.n_expert > 0 else None

        from hybrid_gguf.llama.loader import load_llama
        from hybrid_gguf.planning.memory import hot_pack_reported

        kwargs: dict[str, Any] = dict(n_ctx=n_ctx, seed=seed, verbose=verbose, n_gpu_layers=summary.n_gpu_layers)
        kwargs.update(chosen.llama_kwargs)  # with n_ubatch, n_batch, flash_attn, type_k and type_v
        if n_threads:
            kwargs["n_threads"] = n_threads
            kwargs["n_threads_batch"] = n_threads
        if not self.repack:
            kwargs["model_patch"] = _no_extra_bufts
        stream = routing_process.STREAM_PROFILE if self.profiling else routing_process.STREAM_MEASURED
        t0 = time.perf_counter()
        loaded = load_llama(self.path, chosen.placement, hot=chosen.hot, pack_device=summary.pack_device,
                            cold_on_gpu=chosen.cold_on_gpu, cache=self.cache if self.cache.active else None,
                            worker=self.worker,
                            record=recording, route_trace=routing_process.model_trace(self.inventory, n_ctx, stream),
                            inventory=self.inventory, **kwargs)
        self.load_seconds = time.perf_counter() - t0
        self._loaded, self._llm = loaded, loaded.llm
        self.recorder, self.decode_sampler = loaded.recorder, loaded.decode_sampler
        summary.buffers = _buffer_dict(loaded.buffers)
        summary.hot_pack_bytes = hybrid_backend.pack_bytes(self._llm._model.model)
        summary.hot_pack_by_device = hot_pack_reported(loaded.log)
        summary.n_ubatch, summary.n_batch, summary.flash_attn = _batch_settings(self._llm)
        summary.type_k, summary.type_v = _cache_types(self._llm)

    # -- recording -----------------------------------------------------------------------

    def _recording(self):
        """What the loader's recorder keeps, or None (with a notice) where it cannot run."""
        from hybrid_gguf.llama.recorder import Recording, recorder_status

        ok, why = recorder_status()
        if not ok:
            self.recorder_notice = f"routing recording off: {why}"
            return None
        if self.profiling:
            return Recording(trace_records=PROFILE_TRACE_RECORDS)
        self._check_profile_store()
        return Recording(decode_stride=RUN_DECODE_STRIDE)

    def _check_profile_store(self) -> None:
        """Fail before loading, not after generating, when the session could not be saved:
        a store that is not a directory, or a stored profile of another model. A corrupt
        one is moved aside now (with a notice) rather than at the end."""
        from hybrid_gguf.routing.profile import ProfileStore

        store = self._profile_store or ProfileStore()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store.load(self.inventory.fingerprint)
        for w in caught:
            warnings.warn(str(w.message), stacklevel=3)

    # -- one call at a time ----------------------------------------------------------------

    @property
    def llm(self):
        """The underlying llama_cpp.Llama (HybridError once the model is closed). Calls made
        on it directly bypass this model's lock: do not share them across threads."""
        if self._closed or self._llm is None:
            raise HybridError("model is closed")
        return self._llm

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def _using(self):
        """Hold the model for one call; the Llama to use, or HybridError if closed."""
        with self._lock:
            if self._closed or self._llm is None:
                raise HybridError("model is closed")
            depth = getattr(self._owner_depth, "n", 0)
            self._owner_depth.n = depth + 1
            try:
                yield self._llm
            finally:
                self._owner_depth.n = depth

    def cache_stats(self) -> Optional[dict]:
        """The in-session cache's counters (policy, hits, misses, hit_rate, uploads,
        upload_bytes, evictions, steps, blocking_uploads, page_locked_bytes, step_us) over the
        layers with hot packs (llama.hybrid.cache_stats); None without a cache."""
        with self._using() as llm:
            if not self.cache.active:
                return None
            stats = hybrid_backend.cache_stats(llm._model.model)
        return None if stats is None else {"policy": self.cache.policy, **stats}

    def worker_stats(self) -> Optional[dict]:
        """The CPU worker's counters since the load (busy and idle hand-offs, compute time;
        llama.hybrid.worker_stats); None when the session's split layers do not use it."""
        with self._using() as llm:
            if not self.worker:
                return None
            return hybrid_backend.worker_stats(llm.ctx)

    def routing_snapshot(self):
        with self._using():
            return None if self.recorder is None else self.recorder.snapshot(trace=False)

    def session_routing(self) -> Optional[dict]:
        """What the recorder saw this session against the placement: the share of expert
        selections served from GPU memory, for prompts and for the sampled decode steps
        (the number a plan's predicted hit rate is about). None without a recorder."""
        with self._using():
            if self.recorder is None:
                return None
            snap = self.recorder.snapshot(trace=False)
        return self._hit_rates(snap)

    def _hit_rates(self, snap) -> dict:
        out = {}
        for phase, counts in (("prompt", snap.counts_prompt), ("decode", snap.counts_decode)):
            total = int(counts.sum())
            hit = sum(int(counts[l, list(es)].sum()) for l, es in self.placement.gpu_experts.items() if es)
            out[f"{phase}_selections"] = total
            out[f"{phase}_hit_rate"] = hit / total if total else None
        return out

    def _session_record(self, snap, sessions: int) -> dict:
        """What `hybrid-gguf status` shows of the last session merged into the profile."""
        import datetime

        return {"model": str(self.path), "fingerprint": self.inventory.fingerprint,
                "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "label": self.label, "placement": self.placement.description, "profile_sessions": sessions,
                **self._hit_rates(snap)}

    def save_profile(self) -> Optional[Any]:
        """Merge what the recorder saw into the profile store; returns the merged profile."""
        with self._using():
            return self._save_profile()

    def _save_profile(self) -> Optional[Any]:
        if self.recorder is None:
            return None
        from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

        snap = self.recorder.snapshot(trace=False)
        if int(snap.counts.sum()) == 0:
            return None
        delta = RoutingProfile.from_snapshot(snap, self.inventory.fingerprint, self.inventory.arch,
                                             label=self.label)
        store = self._profile_store or ProfileStore()
        merged = store.merge_session(delta)
        store.save_last_session(self.inventory.fingerprint, self._session_record(snap, merged.sessions))
        self.recorder.reset()
        return merged

    # -- generation ----------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = _utf8(text)
        with self._using() as llm:
            return llm.tokenize(data, add_bos=add_bos, special=False)

    def stream(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 40, top_p: float = 0.95, on_text: Optional[Callable[[str], None]] = None):
        """Generate text piece by piece.

        Without `on_text`: a TextStream, an iterator of decoded text pieces; once it is
        exhausted its `.result` is the GenerationResult (text, ids, timings). It holds the
        model (other calls wait) until exhausted or closed: iterate it to the end, or use
        `with hm.stream(...) as pieces:`.
        With `on_text` (the older form): calls on_text with each piece and returns the
        GenerationResult."""
        limits.check_new_tokens(max_tokens, "max_tokens")
        if on_text is not None:
            with self._using() as llm:
                return self._stream(llm, prompt, max_tokens, temperature, top_k, top_p, on_text)
        self.check_prompt(prompt, max_tokens)  # a closed model or a prompt too long fails now
        return TextStream(self._locked_pieces(prompt, max_tokens, temperature, top_k, top_p))

    def _locked_pieces(self, prompt, max_tokens, temperature, top_k, top_p):
        with self._using() as llm:
            return (yield from self._pieces(llm, prompt, max_tokens, temperature, top_k, top_p))

    def check_prompt(self, prompt: Union[str, Sequence[int]], max_tokens: int) -> int:
        """HybridError unless the prompt and max_tokens new tokens fit the context; the
        prompt's length in tokens."""
        limits.check_new_tokens(max_tokens, "max_tokens")
        with self._using() as llm:
            return len(self._prompt_tokens(llm, prompt, max_tokens))

    def _prompt_tokens(self, llm, prompt, max_tokens: int) -> list:
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise HybridError("empty prompt")
        n_vocab = llm.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise HybridError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
        n_ctx = limits.context_size(llm)
        if len(tokens) + max_tokens > n_ctx:
            raise HybridError(f"prompt ({len(tokens)} tokens) + {max_tokens} new tokens exceed the "
                              f"context of {n_ctx}; raise --ctx (n_ctx) or ask for fewer tokens")
        return tokens

    def _stream(self, llm, prompt, max_tokens, temperature, top_k, top_p, on_text) -> GenerationResult:
        pieces = self._pieces(llm, prompt, max_tokens, temperature, top_k, top_p)
        while True:
            try:
                on_text(next(pieces))
            except StopIteration as done:
                return done.value

    def _pieces(self, llm, prompt, max_tokens, temperature, top_k, top_p):
        """Yields decoded text pieces; returns the GenerationResult."""
        import llama_cpp

        tokens = self._prompt_tokens(llm, prompt, max_tokens)
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        pieces: list[str] = []
        finish = "length"
        greedy = temperature <= 0
        for tok in llm.generate(tokens, temp=max(temperature, 0.0), top_k=1 if greedy else top_k,
                                top_p=1.0 if greedy else top_p, min_p=0.0, repeat_penalty=1.0,
                                reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                finish = "stop"
                break
            out.append(int(tok))
            piece = decoder.decode(llm.detokenize([tok], prev_tokens=tokens + out[:-1]))
            if piece:
                pieces.append(piece)
                yield piece
            if len(out) >= max_tokens:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            yield tail
        p_ms, n_p, g_ms, n_g = _perf(llm)
        return GenerationResult("".join(pieces), out, len(tokens), p_ms, g_ms, finish)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, **kw) -> GenerationResult:
        kw.setdefault("on_text", lambda s: None)
        return self.stream(prompt, max_tokens=max_tokens, temperature=temperature, **kw)

    def create_completion(self, *args, **kwargs):
        """llama_cpp.Llama.create_completion under this model's lock. A streaming call
        (stream=True) holds the lock until its iterator is exhausted or closed."""
        if kwargs.get("stream"):
            return self._locked_iter(lambda llm: llm.create_completion(*args, **kwargs))
        with self._using() as llm:
            return llm.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args, **kwargs):
        """llama_cpp.Llama.create_chat_completion under this model's lock (see create_completion)."""
        if kwargs.get("stream"):
            return self._locked_iter(lambda llm: llm.create_chat_completion(*args, **kwargs))
        with self._using() as llm:
            return llm.create_chat_completion(*args, **kwargs)

    def _locked_iter(self, start):
        with self._using() as llm:
            yield from start(llm)

    # -- lifetime ------------------------------------------------------------------------

    def close(self, save_profile: bool = True) -> None:
        """Free the model. Waits for a call running in another thread; calling it from inside
        one (an on_text callback) raises HybridError instead of freeing the context under it."""
        with self._lock:
            if self._closed:
                return
            if getattr(self._owner_depth, "n", 0):
                raise HybridError("close() called from inside a call on the same model; "
                                  "close it after the call returns")
            self._closed = True
            try:
                if save_profile and self._llm is not None and not self.profiling:
                    self._save_profile()
            finally:
                if self._loaded is not None:
                    self._loaded.close()

    def __enter__(self) -> "HybridModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TextStream:
    """HybridModel.stream()'s iterator of text pieces; `.result` (GenerationResult) once it
    is exhausted. Closing it early (or leaving a `with` block) frees the model."""

    def __init__(self, gen) -> None:
        self._gen = gen
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as done:
            if done.value is not None:
                self.result = done.value
            raise StopIteration from None

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch_settings(llm) -> tuple:
    """(n_ubatch, n_batch, flash_attn) of a loaded Llama's context, as llama.cpp took them."""
    import llama_cpp

    ctx = llm._ctx.ctx
    fa = getattr(llm.context_params, "flash_attn_type", None)
    return (int(llama_cpp.llama_n_ubatch(ctx)), int(llama_cpp.llama_n_batch(ctx)),
            None if fa is None else fa == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)


def _cache_types(llm) -> tuple:
    """(type_k, type_v) of a loaded Llama's context as llama.cpp took them (its context
    parameters; llama.cpp has no getter), named as planning.memory.CACHE_TYPES names them."""
    from hybrid_gguf.planning.memory import CACHE_TYPE_IDS

    names = {v: k for k, v in CACHE_TYPE_IDS.items()}
    params = llm.context_params
    return tuple(names.get(int(t), f"ggml type {int(t)}") for t in (params.type_k, params.type_v))


def _no_extra_bufts(params) -> None:
    # llama.cpp's use_extra_bufts: false keeps CPU weights in the plain CPU buffer type
    params.use_extra_bufts = False


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HybridError(f"the prompt is not valid UTF-8 text (character {exc.object[exc.start]!r} at "
                          f"position {exc.start} cannot be encoded)") from None


def _buffer_dict(report) -> dict:
    """llama.cpp's reported buffers as {"model CUDA0": bytes, "KV CPU": bytes, ...}."""
    out = {}
    for kind in ("model", "kv", "compute", "output"):
        for name, size in getattr(report, kind, {}).items():
            out[f"{kind} {name}"] = int(size)
    return out


HANDOFFS = ("scheduler", "worker")


def _worker_choice(handoff: Optional[str], chosen, summary) -> bool:
    """Whether the session's split layers go to the CPU worker: `handoff` when given
    ("scheduler" or "worker"), else the plan's; fills in summary.handoff."""
    worker = chosen.worker if handoff is None else handoff == "worker"
    if worker and (not chosen.hot or chosen.cold_on_gpu):
        why = "no split layers" if not chosen.hot else "its GPU reads the cold experts itself"
        summary.notices.append(f"handoff worker: this placement has {why}; no CPU worker")
        worker = False
    if worker and hybrid_backend.capability().version < 6:
        summary.notices.append("handoff worker: this build has no CPU worker (hybrid patch version 6+); "
                               "`hybrid-gguf backend install` builds one")
        worker = False
    if worker and handoff is not None and not chosen.worker:
        summary.description += "; split layers handed to the CPU worker"
    summary.handoff = None if not chosen.hot else "gpu" if chosen.cold_on_gpu else "worker" if worker else "scheduler"
    return worker


def _cache_options(cache):
    """HybridModel's `cache`: None or "static" (no cache), a policy name, or CacheOptions."""
    from hybrid_gguf.planning.placement import CacheOptions

    if cache is None:
        return CacheOptions()
    if isinstance(cache, CacheOptions):
        return cache
    return CacheOptions(policy=str(cache))
