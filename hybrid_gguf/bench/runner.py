"""A/B benchmark of expert placements at one VRAM budget, measured in one process.

Placements (made in plans.py): all routed experts on the CPU (`cpu-experts`); the planner's
best whole-layer plan at the budget (`whole-layer`: `hybrid-gguf plan --whole-tensor`, what
--n-cpu-moe gives); the plan `hybrid-gguf plan` writes at the same budget (`per-expert`, hot
packs, needs the patched backend); and everything on the GPU where the planner finds it fits
(`all-gpu`). The budget is total VRAM, as `plan --gpu-budget` means it. The routing profile
the planner sees is recorded on one workload; the timed workload is a different one, so the
plan cannot flatter itself. Loading goes through llama.loader.load_llama; this module times.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from hybrid_gguf.bench.plans import CACHE_PREFIX, WORKER_CONFIG, Config, bench_batch, bench_memory, bench_n_batch, is_auto_cache, plan_configs
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.routing import process as routing_process
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import Inventory, read_inventory
from hybrid_gguf.planning.placement import cpu_moe

# the placements a budget changes
BUDGET_CONFIGS = ("whole-layer", "per-expert", "per-expert-cold-cpu", "per-expert-cold-gpu",
                  "per-expert-cache-lru", "per-expert-cache-lfu", "per-expert-cache-seeded")


@dataclass
class Result:
    name: str
    n_prompt: int
    n_gen: int
    pp_ts: list                  # prompt tokens/s per rep
    tg_ts: list                  # decode tokens/s per rep
    hit_rate: Optional[float]    # share of decode expert selections served on the GPU
    gpu_expert_bytes: int
    vram_model_bytes: int        # llama.cpp's reported GPU model buffers (+ hot packs)
    load_s: float
    error: Optional[str] = None
    plan: Optional[dict] = None  # Config.plan_detail: the plan timed
    cache: Optional[dict] = None  # the in-session cache's counters over the whole load (cache rows)
    worker: Optional[dict] = None  # the CPU worker's counters over the whole load (worker rows)
    # ops on the CPU backend's one-token paths during the timed reps (patch v9): MUL_MAT_IDs in
    # contiguous shares, and gate/up/swiglu/down chains fused (LLAMA_HYBRID_MOE_FUSE=1)
    cpu_paths: Optional[dict] = None
    # `bench --rounds N`: the median of each round's reps (a round loads every placement once);
    # their spread is the load-to-load noise that one round's reps cannot show
    pp_round_medians: list = field(default_factory=list)
    tg_round_medians: list = field(default_factory=list)
    # the process's resident and transparent-huge-page memory after the timed reps, in KiB
    # (Linux): a placement's CPU experts on 4 KiB pages pay more TLB misses than on 2 MiB ones
    host_memory: Optional[dict] = None

    def summary(self) -> dict:
        d = asdict(self)
        for key in ("pp_ts", "tg_ts"):
            vals = [v for v in d[key] if v > 0]
            d[key.replace("_ts", "_avg_ts")] = statistics.mean(vals) if vals else 0.0
            d[key.replace("_ts", "_median_ts")] = statistics.median(vals) if vals else 0.0
            d[key.replace("_ts", "_stddev_ts")] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            d[key.replace("_ts", "_min_ts")] = min(vals) if vals else 0.0
            d[key.replace("_ts", "_max_ts")] = max(vals) if vals else 0.0
        return d


def cpu_path_counts() -> Optional[dict]:
    """The CPU backend's one-token path counters so far (patch v9), or None without them, and
    the process's page faults (a cold expert's first touch after loading can fault in every page)
    and context switches (involuntary ones: threads that outnumber the cores, e.g. a second
    OpenMP team, docs/benchmarks.md, sixth lease)."""
    from hybrid_gguf.llama import ggml_lib

    flat, fused = ggml_lib.mmid_flat_calls(), ggml_lib.moe_fused_calls()
    if flat is None or fused is None:
        return None
    counts = {"mmid_flat_calls": flat, "moe_fused_calls": fused}
    dynamic = ggml_lib.mmid_dynamic_calls()  # patch v23: how many of the flat ones ran in claimed chunks
    if dynamic is not None:
        counts["mmid_dynamic_calls"] = dynamic
    try:
        import resource  # POSIX only
    except ImportError:
        return counts
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return dict(counts, minor_faults=usage.ru_minflt, major_faults=usage.ru_majflt,
                voluntary_switches=usage.ru_nvcsw, involuntary_switches=usage.ru_nivcsw)


def process_threads() -> Optional[int]:
    """The threads of this process now (/proc/self/task), None where there is no such folder."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def host_memory_kib(threads_before_load: Optional[int] = None) -> Optional[dict]:
    """{"rss": KiB, "anon_huge": KiB} of this process from /proc/self/smaps_rollup, with its
    thread counts ("threads" now, "threads_before_load"), or None where there is no such file.
    Threads that a row leaves behind would slow the rows after it (a static row after a cache
    row decoded about 0.8x on the real trace, fourteenth lease; cause not found)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    fields = {"Rss:": "rss", "AnonHugePages:": "anon_huge"}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in fields and parts[1].isdigit():
            out[fields[parts[0]]] = int(parts[1])
    return dict(out, threads=process_threads(), threads_before_load=threads_before_load) if out else None


def hit_rate(counts_decode: np.ndarray, gpu_experts: dict[int, list[int]]) -> Optional[float]:
    total = counts_decode.sum()
    if total == 0:
        return None
    on_gpu = sum(counts_decode[l, list(es)].sum() for l, es in gpu_experts.items() if es)
    return float(on_gpu / total)


def load_config(path: Path, inv: Inventory, cfg: Config, n_ctx: int, n_batch: int, record,
                pack_device: str, n_threads: Optional[int], stream: int = routing_process.STREAM_MEASURED,
                routing: Optional[str] = None, repack: bool = True, n_ubatch: Optional[int] = None,
                flash_attn: bool = False):
    """`cfg` loaded (`record`: a recorder.Recording, or None; `repack` False: host weights
    in plain buffers, llama.cpp's use_extra_bufts off, as `run --no-repack`)."""
    from hybrid_gguf.llama.loader import load_llama

    kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch, n_gpu_layers=cfg.n_gpu_layers, use_mmap=False,
                  verbose=False, seed=0, flash_attn=bool(flash_attn))
    if n_threads:
        kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    if not repack:
        kwargs["model_patch"] = _no_extra_bufts
    with _environment(cfg.load_env):
        return load_llama(path, cfg.placement, hot=cfg.hot or None, pack_device=pack_device,
                          cold_on_gpu=cfg.cold_on_gpu, cache=cfg.cache, worker=cfg.worker,
                          gpu_cold=cfg.gpu_cold or None, record=record,
                          route_trace=routing_process.model_trace(inv, n_ctx, stream, routing), inventory=inv,
                          **kwargs)


@contextlib.contextmanager
def _environment(values: dict):
    """`values` in os.environ (which C's getenv sees) for the block, then as they were."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



def _no_extra_bufts(params) -> None:
    params.use_extra_bufts = False  # CPU weights in plain (or pinned host) buffers, not repacked


def untimed_prompt(llm, prompt: Sequence[int]) -> None:
    """A fresh context that has evaluated `prompt` as one batch (finished, not timed)."""
    import llama_cpp

    llm.reset()
    llm.eval(list(prompt))
    llama_cpp.llama_synchronize(llm._ctx.ctx)


def untimed_steps(llm, decode: Sequence[int]) -> None:
    """The tokens of `decode` one decode step each, each step finished before the next."""
    import llama_cpp

    for tok in decode:
        llm.eval([int(tok)])
        llama_cpp.llama_synchronize(llm._ctx.ctx)


def graph_log_events(llm, prompt: Sequence[int], decode: Sequence[int]):
    """The backend's debug messages about graphs (a GPU backend's graph capture, reuse and
    resets) over untimed decode steps of `decode` after `prompt`, counted by message with
    the numbers taken out."""
    import collections
    import re

    from hybrid_gguf.llama.log import capture_llama_log

    untimed_prompt(llm, prompt)
    with capture_llama_log(forward=False) as captured:
        untimed_steps(llm, decode)
    return collections.Counter(re.sub(r"\d+", "N", line.strip()) for line in captured.lines
                               if "graph" in line.lower())


PROFILE_STEPS_ENV = "HYBRID_GGUF_CUDA_PROFILE_STEPS"
MAX_PROFILE_STEPS = 8


def profile_steps() -> int:
    """How many decode steps `HYBRID_GGUF_CUDA_PROFILE_STEPS` asks to bracket for a CUDA
    profiler (0: none); a bad value is one line of error, not a silent default."""
    raw = os.environ.get(PROFILE_STEPS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or not 0 <= int(raw) <= MAX_PROFILE_STEPS:
        raise HybridError(f"{PROFILE_STEPS_ENV}={raw!r}: give a whole number of decode steps from 0 to {MAX_PROFILE_STEPS}")
    return int(raw)


def cuda_profile_window(llm, prompt: Sequence[int], decode: Sequence[int]) -> bool:
    """Untimed decode steps of `decode` after `prompt`, with only the decode steps between the
    CUDA driver's cuProfilerStart and cuProfilerStop: under `ncu --profile-from-start off` (or
    nsys's cudaProfilerApi capture) a profile holds just the kernels of those steps. False
    where no CUDA driver is loaded (nothing is profiled then)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1", mode=getattr(ctypes, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    untimed_prompt(llm, prompt)
    cuda.cuProfilerStart()
    try:
        untimed_steps(llm, decode)
    finally:
        cuda.cuProfilerStop()
    return True


def measure_once(llm, prompt: Sequence[int], decode: Sequence[int], recorder,
                 after_first_decode: Optional[Callable[[], None]] = None) -> tuple[float, float, Optional[np.ndarray]]:
    """(prompt tokens/s, decode tokens/s, decode routing counts when recording).
    `after_first_decode`: called once the first decode step is done (an in-session cache has
    then counted the prompt's routing, and counts only decode steps' from there on).

    The decode steps are teacher-forced: each step evaluates the next token of `decode`
    (the held-out text after the prompt), one at a time, as a decode step does. Every
    placement then decodes the same tokens with the same routing. Tokens chosen by the model
    itself would not do: greedy decoding of random weights soon repeats one token (one
    routing pattern, and expert weights the CPU reads again and again), and sampled tokens
    differ between placements as soon as float rounding does."""
    import llama_cpp

    from hybrid_gguf.llama.ggml_lib import sched_timers_window

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    llm.eval(list(prompt))
    llama_cpp.llama_synchronize(llm._ctx.ctx)  # perf counters are updated on synchronize
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    pp_ts = perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms > 0 else 0.0
    if recorder is not None:
        recorder.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    sched_timers_window("start")  # LLAMA_HYBRID_SCHED_TIMERS: the decode steps' breakdown only
    for i, tok in enumerate(decode):
        llm.eval([int(tok)])
        # a decode step ends when its logits are ready (llama.cpp books one-token steps as
        # decode only when each is synchronized on its own)
        llama_cpp.llama_synchronize(llm._ctx.ctx)
        if i == 0 and after_first_decode is not None:
            after_first_decode()
    sched_timers_window("report")
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    tg_ts = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else 0.0
    counts = recorder.snapshot(trace=False).counts_decode if recorder is not None else None
    return pp_ts, tg_ts, counts


def decode_window(marks: Sequence[Optional[dict]]) -> dict:
    """The cache's counters summed over (start, end) pairs of decode windows: hits, misses,
    uploads, upload_bytes, steps, step_us and the hit rate (the decode steps after the first of
    each rep, whose step counted the prompt's routing; the last step's routing is counted by
    the next rep's prompt step)."""
    keys = ("hits", "misses", "uploads", "upload_bytes", "steps", "step_us")
    out = dict.fromkeys(keys, 0)
    for start, end in zip(marks[0::2], marks[1::2]):
        if start is None or end is None:
            continue
        for k in keys:
            out[k] += int(end.get(k, 0)) - int(start.get(k, 0))
    served = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / served if served else None
    return out


def busy_handoffs(trace, gpu_experts: dict, layers: Sequence[int], n_expert: int) -> Optional[float]:
    """Mean over the traced tokens of the hand-offs whose host experts had work: per token,
    the layers (of `layers`, those with host experts) where some selected expert is not in
    that layer's GPU set. None without a trace."""
    if trace is None or len(trace.token) == 0:
        return None
    n_tokens = len(np.unique(trace.token))
    busy = 0
    for l in layers:
        rows = trace.ids[trace.layer == l]
        if len(rows) == 0:
            continue
        gpu = np.zeros(n_expert, dtype=bool)
        gpu[[int(e) for e in gpu_experts.get(l, ())]] = True
        valid = rows >= 0
        host = valid & ~gpu[np.where(valid, rows, 0)]
        busy += int(np.any(host, axis=1).sum())
    return busy / n_tokens


def vram_model_bytes(loaded) -> int:
    from hybrid_gguf.planning.memory import is_host

    gpu = sum(v for k, v in loaded.buffers.model.items() if not is_host(k))
    return int(gpu + hybrid_backend.pack_bytes(loaded.llm._model.model))


def run_bench(model_path: Path, *, budget_bytes: Optional[int], profile_prompts: Sequence[Sequence[int]],
              eval_prompt: Sequence[int], n_prompt: int, n_gen: int, reps: int, n_ctx: int = 2048,
              configs: Optional[Sequence[str]] = None, pack_device: str = "CUDA0",
              n_threads: Optional[int] = None, profile=None,
              eval_counts: Optional[np.ndarray] = None, eval_trace=None, save_calibration: bool = True,
              routing: Optional[str] = None, log: Callable[[str], None] = print,
              on_progress: Optional[Callable[[int, int], None]] = None, repack: bool = True,
              n_ubatch: Optional[int] = None, flash_attn: bool = False, reverse: bool = False,
              rounds: int = 1, isolate: bool = False) -> dict:
    """Profile (unless `profile` is given), plan, then time each placement; returns a
    JSON-able dict. `budget_bytes`: total VRAM, as `plan --gpu-budget` (None: all the GPU
    can give), made usable here once (planning/budget.py). `routing`: a routing preset
    (routing_process.PRESETS) or trace:FILE replayed instead of the model's own. `n_ubatch`:
    the prompt's micro-batch, planned for and loaded (default: the whole prompt); `flash_attn`
    likewise (the plans' compute buffers and the timed loads; the profiling load never).
    `reverse`: time the placements last to first (the report keeps their order), so a second
    call shows whether the machine drifted during the first. `rounds`: time the placements that
    many times, each round in the opposite order to the one before (a placement's reps are then
    spread over loads and over the call, so drift and load-to-load noise fall on every
    placement alike); a row's reps are pooled, its counters are its first round's.
    `on_progress(more_steps, steps_done)`: first the number of timed reps ahead, then each rep."""
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.llama.recorder import Recording
    from hybrid_gguf.autoplan import detect_devices
    from hybrid_gguf.planning.budget import expert_share
    from hybrid_gguf.routing.profile import RoutingProfile
    from hybrid_gguf.limits import MAX_BENCH_ROUNDS
    from hybrid_gguf.sizes import format_size

    if not 1 <= rounds <= MAX_BENCH_ROUNDS:
        raise HybridError(f"rounds must be 1 to {MAX_BENCH_ROUNDS}, got {rounds}")
    inv = read_inventory(model_path)
    if inv.n_expert == 0:
        raise HybridError("bench needs a MoE model; this one has no routed experts")
    gpus = gpu_devices()

    prompt = list(eval_prompt)[:n_prompt]
    decode = list(eval_prompt)[n_prompt:n_prompt + n_gen]
    if len(prompt) + len(decode) < n_prompt + n_gen:
        raise HybridError(f"evaluation text has {len(eval_prompt)} tokens, fewer than --pp {n_prompt} "
                          f"+ --tg {n_gen}")
    results: list[Result] = []

    if profile is None or eval_counts is None or eval_trace is None:
        # one recorded load: the profile workload, then the timed workload's routing, so the
        # timed loads below run without a recorder (its syncs would slow every placement)
        record = Recording(trace_records=max(n_gen, 1) * inv.n_layer)
        routed = routing_process.model_routing(inv, routing) is not None
        loaded = load_config(model_path, inv, Config("profile", cpu_moe()), n_ctx, 512, record,
                             pack_device, n_threads, routing_process.STREAM_PROFILE, routing)
        for p in profile_prompts:
            loaded.llm.reset()
            loaded.llm.eval(list(p))
        # the profile the planner sees, as `profile` would record it
        profile = RoutingProfile.from_snapshot(loaded.recorder.snapshot(trace=False), inv.fingerprint, inv.arch, "bench")
        if routed:
            # a routing preset maps positions to routing: the timed text needs its own stream,
            # or the profile would know the timed tokens' routing in advance
            loaded.close()
            loaded = load_config(model_path, inv, Config("profile", cpu_moe()), n_ctx, 512, record,
                                 pack_device, n_threads, routing=routing)
        _, _, eval_counts = measure_once(loaded.llm, prompt, decode, loaded.recorder)
        eval_trace = loaded.recorder.snapshot(trace=True).trace
        loaded.close()
        log(f"profiled {int(np.mean(profile.tokens_per_layer))} tokens")

    window = routing_process.decode_window(inv, n_prompt, n_gen, routing)
    if window is not None:
        log(f"decode replays rows {window['first_row']}..{window['first_row'] + window['rows']} of the trace's "
            f"timed half ({window['of']} rows), the same rows in every rep: a short window can sit on one "
            f"stretch of a trace whose routing changes (--pp moves it, --tg widens it)")
    devices, budget_notes = detect_devices(budget_bytes)  # the budget rule, applied once
    for note in budget_notes:
        log(note)
    budget = sum(d.budget_bytes for d in devices)
    ubatch = bench_batch(n_prompt, n_ubatch)
    share = expert_share(inv, budget, bench_memory(model_path, n_ctx, n_prompt, n_ubatch, flash_attn))
    log(f"budget {format_size(budget)} of VRAM: room for {share:.0%} of the expert bytes next to the rest")
    auto_cache = any(is_auto_cache(c) for c in configs or ())
    all_cfgs = plan_configs(model_path, inv, profile, devices, n_ctx, ubatch, configs,
                            gpu_present=bool(gpus), flash_attn=flash_attn,
                            profile_trace=routing_process.profile_trace(
                                inv, int(np.mean(profile.tokens_per_layer)), routing) if auto_cache else None)
    if configs and not all_cfgs:
        raise HybridError(f"--configs {','.join(configs)}: no placement of these names can run here "
                          "(see `hybrid-gguf bench --help` for the names)")
    for name in sorted(set(configs or ()) - {c.name for c in all_cfgs}):
        log(f"--configs {name}: not timed (an unknown name, or it needs a GPU or a newer patch here)")
    step = on_progress or (lambda more, done: None)
    step(len(all_cfgs) * reps * rounds, 0)
    timing = Timing(model_path, inv, eval_counts, prompt, decode, reps, n_ctx, pack_device, n_threads, routing,
                    repack, ubatch, flash_attn)
    first = all_cfgs[::-1] if reverse else list(all_cfgs)
    timed: dict[str, Result] = {}
    for round_no in range(rounds):
        for cfg in (first if round_no % 2 == 0 else first[::-1]):
            label = f"round {round_no + 1}/{rounds}: " if rounds > 1 else ""
            res = (time_config_isolated if isolate else time_config)(cfg, timing, step, log, label)
            timed[cfg.name] = res if cfg.name not in timed else pool_rounds(timed[cfg.name], res)
    results.extend(timed[cfg.name] for cfg in all_cfgs)  # the report's order, however they were timed

    out = {
        "model": str(model_path),
        "arch": inv.arch,
        "n_layer": inv.n_layer,
        "n_expert": inv.n_expert,
        "n_expert_used": inv.n_expert_used,
        "expert_bytes_total": inv.expert_bytes_total,
        "budget_bytes": budget,
        "budget_share_of_experts": share,
        "fingerprint": inv.fingerprint,
        "routing": routing_process.model_routing(inv, routing) or "optimistic",
        **({"decode_window": window} if window is not None else {}),
        "n_ubatch": ubatch,
        "flash_attn": bool(flash_attn),
        "results": [r.summary() for r in results],
        "profile": profile.to_dict(),
        "_profile": profile,
        "_eval_counts": eval_counts,
        "_eval_trace": eval_trace,
    }
    out["prediction"] = predict_configs(inv, profile, all_cfgs, results, n_prompt, n_gen, n_ctx,
                                        on_gpu=bool(gpus), save=save_calibration, log=log,
                                        eval_trace=eval_trace, n_ubatch=ubatch)
    base = {r.name: r for r in results}
    if "whole-layer" in base and "per-expert" in base and base["whole-layer"].tg_ts:
        wl, pe = base["whole-layer"].summary(), base["per-expert"].summary()
        out["per_expert_vs_whole_layer_tg"] = pe["tg_median_ts"] / wl["tg_median_ts"]
        out["per_expert_vs_whole_layer_pp"] = pe["pp_median_ts"] / wl["pp_median_ts"]
    return out


@dataclass(frozen=True)
class Timing:
    """What every placement of one bench is timed on, and how it is loaded."""
    model_path: Path
    inv: Inventory
    eval_counts: np.ndarray  # the timed workload's decode routing (hit rates)
    prompt: list
    decode: list
    reps: int
    n_ctx: int
    pack_device: str
    n_threads: Optional[int]
    routing: Optional[str]
    repack: bool
    n_ubatch: int
    flash_attn: bool


# fault injection for the tests: the named placement's process exits before loading it
ISOLATE_CRASH_ENV = "HYBRID_GGUF_TEST_ISOLATE_CRASH"


def _time_config_child(cfg: Config, t: Timing, label: str) -> tuple:
    """time_config in a spawned process: (its Result, its log lines)."""
    import llama_cpp  # noqa: F401  before numpy's users load a model (docs/backend-patch.md, "Import order")

    if os.environ.get(ISOLATE_CRASH_ENV) == cfg.name:
        os._exit(134)

    lines: list[str] = []
    return time_config(cfg, t, lambda more, done: None, lines.append, label), lines


def time_config_isolated(cfg: Config, t: Timing, step, log: Callable[[str], None], label: str = "") -> Result:
    """time_config in a fresh process, as a user's session runs one load per process: nothing
    a row before it left in this one (threads, OpenMP teams, page-locked memory, allocator
    state) can touch its numbers. On the real trace a static row loaded right after a cache
    row in one process decoded about 0.8x of the same row loaded first (fourteenth lease).
    Its log lines arrive when it ends; a process that dies (llama.cpp aborts) is the row's error."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            res, lines = pool.submit(_time_config_child, cfg, t, label).result()
    except BrokenProcessPool:
        step(0, t.reps)
        return Result(cfg.name, len(t.prompt), len(t.decode), [], [], None, cfg.gpu_expert_bytes(t.inv), 0, 0.0,
                      "the process timing this placement died (see its output above)", cfg.plan_detail(t.inv))
    for line in lines:
        log(line)
    step(0, t.reps)
    return res


def time_config(cfg: Config, t: Timing, step, log: Callable[[str], None], label: str = "") -> Result:
    """One load of `cfg`, a warm-up, then `t.reps` timed reps (a Result with `error` when it
    does not load). `label` prefixes its log lines."""
    inv, prompt, decode, reps = t.inv, t.prompt, t.decode, t.reps
    n_prompt, n_gen = len(prompt), len(decode)
    n_profiled = profile_steps()
    threads_before = process_threads()  # what the rows before this one left running
    t0 = time.perf_counter()
    expert_bytes = cfg.gpu_expert_bytes(inv)
    try:
        loaded = load_config(t.model_path, inv, cfg, t.n_ctx, bench_n_batch(n_prompt), None, t.pack_device,
                             t.n_threads, routing=t.routing, repack=t.repack, n_ubatch=t.n_ubatch,
                             flash_attn=t.flash_attn)
    except HybridError as exc:
        step(0, reps)
        return Result(cfg.name, n_prompt, n_gen, [], [], None, expert_bytes, 0, 0.0, str(exc), cfg.plan_detail(inv))
    load_s = time.perf_counter() - t0
    measure_once(loaded.llm, prompt[:32], decode[:4], None)  # warm-up: graphs, CUDA kernels
    pps, tgs = [], []
    model_ptr = loaded.llm._model.model
    window: list = []  # the cache's counters over each rep's decode steps
    paths_before = cpu_path_counts()
    for _ in range(reps):
        mark = (lambda: window.append(hybrid_backend.cache_stats(model_ptr))) if cfg.cache is not None else None
        pp, tg, _ = measure_once(loaded.llm, prompt, decode, None, after_first_decode=mark)
        if mark is not None:
            window.append(hybrid_backend.cache_stats(model_ptr))
        pps.append(pp)
        tgs.append(tg)
        step(0, 1)
    paths_after = cpu_path_counts()
    cpu_paths = ({k: paths_after[k] - paths_before[k] for k in paths_after}
                 if paths_before is not None and paths_after is not None else None)
    hit = 0.0 if cfg.name == "cpu-experts" else hit_rate(t.eval_counts, cfg.gpu_experts)
    cache = hybrid_backend.cache_stats(model_ptr) if cfg.cache is not None else None
    if cache is not None:
        cache["decode"] = decode_window(window)
        if cache["decode"]["hit_rate"] is not None:
            hit = cache["decode"]["hit_rate"]  # what the slots served the decode steps, as `hit_rate` counts
    worker = hybrid_backend.worker_stats(loaded.llm.ctx) if cfg.worker else None
    if worker:
        # after the timed reps: a log callback per GPU graph would cost time
        events = graph_log_events(loaded.llm, prompt[:32], decode[:8])
        if events:
            log(f"{cfg.name}: backend graph messages in 8 decode steps: " +
                "; ".join(f"{n} x {msg}" for msg, n in events.most_common(4)))
    if n_profiled and cuda_profile_window(loaded.llm, prompt[:32], decode[:n_profiled]):
        log(f"{cfg.name}: {len(decode[:n_profiled])} untimed decode steps bracketed for a CUDA profiler")
    res = Result(cfg.name, n_prompt, n_gen, pps, tgs, hit, expert_bytes, vram_model_bytes(loaded), load_s,
                 plan=cfg.plan_detail(inv), cache=cache, worker=worker, cpu_paths=cpu_paths,
                 pp_round_medians=[statistics.median(pps)], tg_round_medians=[statistics.median(tgs)],
                 host_memory=host_memory_kib(threads_before))
    log(f"{label}{cfg.name:12s} pp {statistics.median(pps):8.1f} t/s  tg {statistics.median(tgs):7.2f} t/s  "
        f"hit {res.hit_rate if res.hit_rate is not None else float('nan'):.3f}  "
        f"gpu experts {expert_bytes / 2**30:.2f} GiB")
    if cpu_paths and any(cpu_paths.values()):
        chunks = (f" ({cpu_paths['mmid_dynamic_calls']} of them in claimed chunks)"
                  if "mmid_dynamic_calls" in cpu_paths else "")
        log(f"{cfg.name}: CPU one-token paths in the timed reps: {cpu_paths['mmid_flat_calls']} MUL_MAT_IDs "
            f"one token at a time{chunks}, {cpu_paths['moe_fused_calls']} expert chains fused; page faults "
            f"{cpu_paths.get('minor_faults', '?')} minor, {cpu_paths.get('major_faults', '?')} major; context switches "
            f"{cpu_paths.get('voluntary_switches', '?')} voluntary, {cpu_paths.get('involuntary_switches', '?')} involuntary"
            + (f"; resident {res.host_memory.get('rss', 0) / 2**20:.2f} GiB, "
               f"{res.host_memory.get('anon_huge', 0) / 2**20:.2f} GiB of it on huge pages, "
               f"{res.host_memory.get('threads', '?')} threads ({res.host_memory.get('threads_before_load', '?')} "
               f"before the load)" if res.host_memory else ""))
    if worker:
        log(f"{cfg.name}: CPU worker {worker['busy']} busy and {worker['idle']} idle hand-offs, "
            f"{worker['compute_us'] / max(worker['busy'], 1):.0f} us of compute per busy one, "
            f"{worker['takeovers']} graphs taken over from the decoding thread, "
            f"{worker['serve_us'] / 1e3:.1f} ms answering on the decoding thread")
        on_worker = worker["busy"] - worker["main_busy"]
        log(f"{cfg.name}: decoding thread {worker['main_busy']} busy hand-offs, "
            f"{worker['main_compute_us'] / max(worker['main_busy'], 1):.0f} us each; worker thread {on_worker}, "
            f"{(worker['compute_us'] - worker['main_compute_us']) / max(on_worker, 1):.0f} us each; "
            f"{worker['inline_graphs']} graphs armed for the decoding thread, which came "
            f"{worker['arrive_us'] / max(worker['inline_graphs'], 1):.0f} us after arming on average "
            f"(at most {worker['arrive_max_us']} us)")
        if worker.get("timed_roundtrips"):
            n_rt, n_gap = worker["timed_roundtrips"], max(worker["timed_gaps"], 1)
            log(f"{cfg.name}: busy hand-off timeline: {worker['roundtrip_us'] / n_rt:.1f} us from post to answer seen "
                f"on the device, {worker['answer_us'] / n_rt:.1f} us of it the CPU's from noticing to answering; "
                f"{worker['gap_us'] / n_gap:.1f} us on the device from an answer seen to the next busy post "
                f"({n_rt} and {worker['timed_gaps']} timed)")
        if worker.get("prefetch_calls"):
            n_pf, cold = worker["prefetch_calls"], max(worker["prefetch_cold_experts"], 1)
            log(f"{cfg.name}: prefetch (LLAMA_HYBRID_WORKER_PREFETCH=1): {n_pf} runs, {worker['prefetch_cuts']} cut short "
                f"by a post, {worker['prefetch_bytes'] / n_pf / 2**20:.2f} MiB and {worker['prefetch_us'] / n_pf:.1f} us "
                f"each; {worker['prefetch_hit_experts'] / cold:.2f} of the busy posts' cold experts had been read")
    loaded.llm.close()
    return res


def pool_rounds(a: Result, b: Result) -> Result:
    """Two rounds of one placement as one row: their reps and round medians together, the
    counters and load of the first (a round that failed to load makes the row an error)."""
    if a.error is not None or b.error is not None:
        return a if a.error is not None else b
    return replace(a, pp_ts=a.pp_ts + b.pp_ts, tg_ts=a.tg_ts + b.tg_ts,
                   pp_round_medians=a.pp_round_medians + b.pp_round_medians,
                   tg_round_medians=a.tg_round_medians + b.tg_round_medians)


def predict_configs(inv: Inventory, profile, cfgs: Sequence[Config], results: Sequence[Result],
                    n_prompt: int, n_gen: int, n_ctx: int, on_gpu: bool = True, save: bool = True,
                    log: Callable[[str], None] = print, eval_trace=None, n_ubatch: Optional[int] = None) -> dict:
    """The planner's predicted tokens/s of every placement, twice: with this machine's stored
    calibration (what `plan` predicted before this run: out of sample), and with the model
    fitted to this run's placements (in sample), which `plan` uses from then on when `save`.
    Also the decode roofline: the fitted model without the per-layer hand-off. Without a GPU
    nothing is fitted: the predictions are the CPU-only model's.

    The fit takes each placement's busy hand-offs from the timed workload's routing trace
    when there is one (what happened), not from the profile's estimate (what `plan` can
    know); both are reported, with each placement's model terms for later refits. Prefill is
    modelled per ubatch: `n_ubatch` tokens (default and at most the prompt)."""
    t_ubatch = min(int(n_ubatch or n_prompt), int(n_prompt))
    from hybrid_gguf.bench.probe import calibrate_bandwidth
    from hybrid_gguf.planning import calibration
    from hybrid_gguf.planning.speed import hit_rate, predict_speed
    from hybrid_gguf.routing.stats import decode_probs

    p = decode_probs(profile, inv)  # what the planner predicts from
    stored = calibrate_bandwidth()
    before = stored.for_model(inv.fingerprint)
    runs, terms = {}, {}
    for cfg, res in zip(cfgs, results):
        s = res.summary()
        if res.error is None and s["tg_median_ts"] > 0:
            gpu = cfg.gpu_experts
            run = calibration.MeasuredRun(gpu, s["tg_median_ts"], s["pp_median_ts"], t_ubatch, n_prompt + n_gen // 2)
            runs[cfg.name] = (cfg, run)
            t = calibration.run_terms(inv, p, run, n_ctx)
            if cfg.cold_on_gpu:
                # no CPU hand-offs to fit: this run tells the link's read rate instead (below)
                terms[cfg.name] = (t, None)
                continue
            host_layers = [l.index for l in inv.layers
                           if l.is_moe and len(set(gpu.get(l.index, ()))) < l.n_expert]
            traced = busy_handoffs(eval_trace, gpu, host_layers, inv.n_expert)
            terms[cfg.name] = (t, traced)
    # a cache row's experts on the GPU change as it runs: it tells the cache's step time, not
    # the bandwidths (its static hot set would mislead their fit); a worker row has other
    # hand-off costs than the ones fitted here
    static = [name for name in terms
              if not runs[name][0].cold_on_gpu and not _is_cache(runs[name][0]) and not runs[name][0].worker]
    fit_terms = [replace(t, handoffs_busy=traced, handoffs_idle=t.handoffs - traced) if traced is not None else t
                 for name, (t, traced) in terms.items() if name in static] if on_gpu else []
    saved = calibration.fit_bandwidth_terms(fit_terms, stored, inv.fingerprint) if fit_terms else stored
    if on_gpu:
        saved = fit_cache_step(zip(cfgs, results), saved, log)
    cold_runs = [(cfg, run) for cfg, run in runs.values() if cfg.cold_on_gpu]
    if on_gpu and cold_runs:
        saved = fit_host_read(inv, p, cold_runs, saved, n_ctx, t_ubatch, log)
    # (a cold=both row's worker computes only part of the cold bytes: not a row to fit it on)
    worker_runs = [(cfg, run, terms[name][1]) for name, (cfg, run) in runs.items()
                   if cfg.worker and not _is_cache(cfg) and not cfg.gpu_cold]
    if on_gpu and worker_runs:
        saved = fit_worker_handoff(inv, p, worker_runs, saved, n_ctx, t_ubatch, log)
    fitted = saved.for_model(inv.fingerprint)
    # the GPU's rate and fixed times come from a GPU probe or from this run's static rows;
    # without either they are the defaults, and a host whose GPU path is slower (all on the
    # GPU: 258 tok/s on one H200 host, 211-217 on later ones, stock build alike) gets
    # rooflines and predictions that are too high
    gpu_measured = (not on_gpu or "gpu_bytes_per_s" in saved.measured
                    or inv.fingerprint in dict(saved.model_gpu_rates))
    if not gpu_measured:
        log("rooflines and predictions use the default GPU rate and per-layer time (no GPU probe stored, "
            "no static row fitted it in this run): too high where this host's GPU path is slower; "
            "an all-gpu row in --configs fits them here")
    roof = replace(fitted, handoff_s=0.0, handoff_idle_s=0.0, worker_handoff_s=0.0, worker_handoff_idle_s=0.0,
                   gpu_chain_s=0.0)
    by_name = {cfg.name: res for cfg, res in zip(cfgs, results)}
    table = {}
    for name, (cfg, run) in runs.items():
        t, traced = terms[name]
        row = {"measured_decode_ts": run.decode_tokens_per_s, "measured_prefill_ts": run.prefill_tokens_per_s,
               "predicted_hit_rate": hit_rate(p, cfg.gpu_experts),
               "busy_handoffs_estimated": t.handoffs_busy, "busy_handoffs_traced": traced,
               "terms": t.to_dict()}
        for key, bw in (("predicted", before), ("fitted", fitted), ("roofline", roof)):
            sp = predict_speed(inv, p, cfg.gpu_experts if on_gpu else {}, on_gpu, bw, n_ctx,
                               n_ubatch=t_ubatch, kv_fill=run.kv_fill, cold_on_gpu=cfg.cold_on_gpu,
                               worker=cfg.worker, gpu_cold=cfg.gpu_cold)
            row[f"{key}_decode_ts"] = sp.decode_tokens_per_s
            if key != "roofline":
                row[f"{key}_prefill_ts"] = sp.prefill_tokens_per_s
        row["predicted_decode_error"] = row["predicted_decode_ts"] / run.decode_tokens_per_s - 1.0
        row["fitted_decode_error"] = row["fitted_decode_ts"] / run.decode_tokens_per_s - 1.0
        row.update(_cache_model_check(inv, p, cfg, run, by_name, fitted, n_ctx, t_ubatch, on_gpu, log))
        table[name] = row
        log(f"{name:12s} decode measured {run.decode_tokens_per_s:7.2f}, predicted {row['predicted_decode_ts']:7.2f} "
            f"(stored calibration), {row['fitted_decode_ts']:7.2f} (fitted to this run), "
            f"roofline {row['roofline_decode_ts']:7.2f} t/s; busy hand-offs {t.handoffs_busy:.1f} estimated"
            + ("" if traced is None else f", {traced:.1f} traced"))
    saving = bool(save and (fit_terms or (on_gpu and (cold_runs or worker_runs))))
    if saving:
        calibration.save_calibration(saved)
    return {"calibration_before": before.to_dict(), "calibration_fitted": fitted.to_dict(),
            "calibration_saved": saving, "gpu_rate_measured": gpu_measured, "on_gpu": on_gpu, "configs": table,
            "gpu_experts": {name: {str(l): list(map(int, es)) for l, es in cfg.gpu_experts.items()}
                            for name, (cfg, _) in runs.items()}}



def _is_cache(cfg) -> bool:
    return cfg.cache is not None and cfg.cache.active


def _cache_model_check(inv, p, cfg, run, by_name: dict, bw, n_ctx: int, n_ubatch: int, on_gpu: bool, log) -> dict:
    """For a cache row: the decode speed the planner's cache pricing (speed.cache_decode_tokens_per_s,
    what `plan --cache auto` ranks by) gives it from what this run measured, its decode hit
    rate and uploads against the static row's (the same plan: "per-expert-worker" for a cache
    row with the worker when the bench has it, else "per-expert") hit rate, with the fitted
    bandwidths; and that over the measured speed. Empty for other rows, or without a static
    row or decode counters."""
    from hybrid_gguf.bench.plans import WORKER_CONFIG
    from hybrid_gguf.planning.speed import cache_decode_tokens_per_s, predict_speed

    res = by_name.get(cfg.name)
    static = (by_name.get(WORKER_CONFIG) if cfg.worker else None) or by_name.get("per-expert")
    window = ((res.cache or {}).get("decode") or {}) if res is not None else {}
    if (not _is_cache(cfg) or static is None or static.hit_rate is None or res.hit_rate is None
            or not window.get("steps")):
        return {}
    sp = predict_speed(inv, p, cfg.gpu_experts if on_gpu else {}, on_gpu, bw, n_ctx, n_ubatch=n_ubatch,
                       kv_fill=run.kv_fill, cold_on_gpu=cfg.cold_on_gpu, worker=cfg.worker)
    ts = cache_decode_tokens_per_s(sp.decode_ms, static.hit_rate, res.hit_rate,
                                   window["upload_bytes"] / window["steps"], bw, n_cache_layers=len(cfg.hot),
                                   uploads_per_token=window.get("uploads", 0) / window["steps"])
    log(f"{cfg.name}: the cache pricing gives {ts:.2f} t/s for hit rate {static.hit_rate:.3f} -> {res.hit_rate:.3f} "
        f"and {window['upload_bytes'] / window['steps'] / 2**20:.1f} MiB uploaded per step; measured "
        f"{run.decode_tokens_per_s:.2f}")
    return {"cache_model_decode_ts": ts, "cache_model_decode_error": ts / run.decode_tokens_per_s - 1.0}


def fit_cache_step(rows, bw, log) -> object:
    """Bandwidth.cache_step_s and cache_upload_s from the cache rows' host step time over their
    decode steps (their `cache.decode` counters): per step, a base plus a cost per upload,
    least squares over the rows weighted by their steps. Rows that all upload at one rate (or
    one row) fit the base alone at the given per-upload cost. Unchanged without cache rows."""
    pts = []  # (steps, uploads per step, us per step)
    for cfg, res in rows:
        window = (res.cache or {}).get("decode") if _is_cache(cfg) else None
        if window and window.get("steps"):
            n = window["steps"]
            pts.append((n, window.get("uploads", 0) / n, window["step_us"] / n))
    if not pts:
        return bw
    n, x, y = (np.array(v, dtype=float) for v in zip(*pts))
    base, per_upload, slope_fitted = None, bw.cache_upload_s * 1e6, False
    if np.ptp(x) >= 0.25:  # upload rates far enough apart to tell the two costs apart
        w = np.sqrt(n)
        (a, b), *_ = np.linalg.lstsq(np.stack([w, w * x], axis=1), w * y, rcond=None)
        if a >= 0 and b >= 0:
            base, per_upload, slope_fitted = float(a), float(b), True
    if base is None:
        base = max(0.0, float(np.average(y - per_upload * x, weights=n)))
    log(f"in-session cache: {base / 1e3:.3f} ms of host time per decode step and {per_upload / 1e3:.3f} ms per "
        f"upload ({len(pts)} cache row(s))")
    measured = tuple(sorted(set(bw.measured) | {"cache_step_s"} | ({"cache_upload_s"} if slope_fitted else set())))
    return replace(bw, cache_step_s=max(base / 1e6, 1e-7), cache_upload_s=per_upload / 1e6, measured=measured)


def fit_host_read(inv: Inventory, p, cold_runs, bw, n_ctx: int, n_prompt: int, log) -> object:
    """The link's read rate (Bandwidth.host_read_bytes_per_s) that explains the decode speed of
    placements whose GPU reads the cold experts in place: each run's time less the model's
    other terms is its host bytes over the rate; the rate is their bytes-weighted mean.
    Unchanged when no run leaves time for the reads."""
    from hybrid_gguf.planning.speed import predict_speed

    read_bytes = read_s = 0.0
    for cfg, run in cold_runs:
        sp = predict_speed(inv, p, cfg.gpu_experts, True, bw, n_ctx, n_ubatch=n_prompt, kv_fill=run.kv_fill,
                           cold_on_gpu=True)
        host_ms = sp.decode_ms.get("experts_host_read", 0.0)
        other_s = (sum(sp.decode_ms.values()) - host_ms) / 1e3
        left = 1.0 / run.decode_tokens_per_s - other_s
        if host_ms <= 0 or left <= 0:
            continue
        read_bytes += host_ms / 1e3 * bw.host_read_bytes_per_s
        read_s += left
    if read_s <= 0:
        return bw
    rate = read_bytes / read_s
    log(f"cold experts read by the GPU over the link: {rate / 1e9:.1f} GB/s effective")
    measured = tuple(sorted(set(bw.measured) | {"host_read_bytes_per_s"}))
    return replace(bw, host_read_bytes_per_s=rate, measured=measured)


def fit_worker_handoff(inv: Inventory, p, worker_runs, bw, n_ctx: int, n_prompt: int, log) -> object:
    """Bandwidth.worker_handoff_s and worker_handoff_idle_s, the CPU worker's cost per busy
    and per idle hand-off, from rows that hand their split layers to it. Each run's time less
    the model's other terms is spent on its busy hand-offs (traced where the trace says) and
    its idle ones. Rows that mix the two in different proportions give both costs (least
    squares); otherwise the kind that dominates the rows' hand-offs gets the fit and the other
    keeps its stored cost (a plan with every routed expert on the GPU has almost only idle
    ones). Unchanged when no run leaves time for them."""
    from hybrid_gguf.planning.speed import predict_speed

    rows = []  # (busy, idle, seconds left for the hand-offs) per token
    for cfg, run, traced in worker_runs:
        sp = predict_speed(inv, p, cfg.gpu_experts, True, bw, n_ctx, n_ubatch=n_prompt, kv_fill=run.kv_fill,
                           worker=True)
        busy = sp.handoffs["busy"] if traced is None else traced
        idle = max(sp.handoffs["busy"] + sp.handoffs["idle"] - busy, 0.0)
        other_s = (sum(sp.decode_ms.values()) - sp.decode_ms["handoff"]) / 1e3
        left = 1.0 / run.decode_tokens_per_s - other_s
        if left > 0 and busy + idle > 0:
            rows.append((busy, idle, left))
    if not rows:
        return bw
    a = np.array([[b, i] for b, i, _ in rows])
    y = np.array([t for _, _, t in rows])
    shares = a[:, 0] / a.sum(axis=1)
    busy_s, idle_s = bw.worker_handoff_s, bw.worker_handoff_idle_s
    fitted = set()
    if len(rows) >= 2 and shares.max() - shares.min() >= 0.2:
        (b, i), *_ = np.linalg.lstsq(a, y, rcond=None)
        if b > 0 and i >= 0:
            busy_s, idle_s = float(b), float(i)
            fitted = {"worker_handoff_s", "worker_handoff_idle_s"}
    if not fitted:
        if a[:, 0].sum() >= a[:, 1].sum():
            busy_s = float((y.sum() - a[:, 1].sum() * idle_s) / a[:, 0].sum())
            fitted = {"worker_handoff_s"}
        else:
            idle_s = float((y.sum() - a[:, 0].sum() * busy_s) / a[:, 1].sum())
            fitted = {"worker_handoff_idle_s"}
        if busy_s <= 0 or idle_s < 0:
            return bw
    log(f"a hand-off to the CPU worker: {busy_s * 1e6:.0f} us busy besides its expert bytes, "
        f"{idle_s * 1e6:.1f} us idle ({', '.join(k.replace('worker_handoff_', '') for k in sorted(fitted))} "
        f"fitted to {len(rows)} row{'s' if len(rows) != 1 else ''})")
    measured = tuple(sorted(set(bw.measured) | fitted))
    return replace(bw, worker_handoff_s=busy_s, worker_handoff_idle_s=idle_s, measured=measured,
                   worker_patch_version=hybrid_backend.capability().version)


def run_budgets(model_path: Path, budgets: Sequence[Optional[int]], *, profile_prompts, eval_prompt,
                configs: Optional[Sequence[str]] = None, save_calibration: bool = True,
                log: Callable[[str], None] = print, **kwargs) -> list[dict]:
    """run_bench at each budget (total VRAM), profiling once. Budgets after the first time
    only the placements that depend on the budget (whole-layer, per-expert). With a GPU and
    several budgets one decode fit over all of them is the calibration stored for `plan` (it
    needs per-expert runs at different budgets to tell busy from idle hand-offs); each
    result then carries it as "combined_fit"."""
    from hybrid_gguf.llama.devices import gpu_devices

    profile_steps()  # a bad profiler window fails here, before the profiling loads
    outs: list[dict] = []
    profile = eval_counts = eval_trace = None
    # cache rows only when named (they are extra loads of the same plan)
    budget_bound = [c for c in (configs or BUDGET_CONFIGS)
                    if c in BUDGET_CONFIGS or (configs and (c.startswith(CACHE_PREFIX) or c == WORKER_CONFIG))]
    budget_bound = [c for c in budget_bound if configs or not c.startswith(CACHE_PREFIX)]
    for i, budget in enumerate(budgets):
        if i and not budget_bound:
            log("the other budgets change none of the chosen placements: skipped")
            break
        log("== budget " + ("all the GPU can give" if budget is None else f"{budget / 2**30:.2f} GiB of VRAM"))
        t0 = time.perf_counter()
        out = run_bench(model_path, budget_bytes=budget, profile_prompts=profile_prompts,
                        eval_prompt=eval_prompt,
                        configs=configs if i == 0 else budget_bound,
                        profile=profile, eval_counts=eval_counts, eval_trace=eval_trace,
                        save_calibration=save_calibration and len(budgets) == 1, log=log, **kwargs)
        profile, eval_counts, eval_trace = out.pop("_profile"), out.pop("_eval_counts"), out.pop("_eval_trace")
        out["wall_s"] = time.perf_counter() - t0
        outs.append(out)
    if len(outs) > 1 and gpu_devices():
        combined = refit_across_budgets(outs, save=save_calibration, log=log)
        for out in outs:
            out["combined_fit"] = combined
    return outs


def refit_across_budgets(outs: Sequence[dict], save: bool = True,
                         log: Callable[[str], None] = print) -> dict:
    """One decode fit over the placements of several `run_bench` results (budgets) of one
    model: per-expert runs at different budgets are what tell busy from idle hand-offs.
    Returns the fitted calibration and each run's fitted decode next to its measurement."""
    from hybrid_gguf.bench.probe import calibrate_bandwidth
    from hybrid_gguf.planning import calibration

    rows = []
    fingerprints = {out.get("fingerprint") for out in outs}
    fingerprint = fingerprints.pop() if len(fingerprints) == 1 else None
    for out in outs:
        share = out.get("budget_share_of_experts", 0.0)
        for name, row in out.get("prediction", {}).get("configs", {}).items():
            t = calibration.RunTerms.from_dict(row["terms"])
            traced = row.get("busy_handoffs_traced")
            if traced is not None:
                t = replace(t, handoffs_busy=traced, handoffs_idle=t.handoffs - traced)
            rows.append((f"{name} @ {100 * share:.0f}%", t))
    stored = calibrate_bandwidth()
    saved = calibration.fit_bandwidth_terms([t for _, t in rows], stored, fingerprint)
    fitted = saved.for_model(fingerprint)
    table = {}
    log(f"one fit over {len(outs)} budgets: gpu {fitted.gpu_bytes_per_s / 1e9:.0f} GB/s, "
        f"cpu {fitted.cpu_bytes_per_s / 1e9:.1f} GB/s, hand-off {1e6 * fitted.handoff_s:.0f} us busy, "
        f"{1e6 * fitted.handoff_idle_s:.0f} us idle")
    for label, t in rows:
        pred = 1.0 / t.decode_seconds(fitted)
        table[label] = {"measured_decode_ts": t.decode_tokens_per_s, "fitted_decode_ts": pred,
                        "fitted_decode_error": pred / t.decode_tokens_per_s - 1.0}
        log(f"  {label:22s} measured {t.decode_tokens_per_s:7.2f}  fitted {pred:7.2f}  "
            f"({100 * (pred / t.decode_tokens_per_s - 1):+.1f}%)")
    if save and rows:
        calibration.save_calibration(saved)
    return {"calibration_fitted": fitted.to_dict(), "calibration_saved": bool(save and rows), "runs": table}


def llama_bench_rows(outs: Sequence[dict], n_threads: Optional[int] = None) -> list[dict]:
    """`bench` results in llama-bench's JSON shape: one row per test (a prompt test with
    n_gen 0, a generation test with n_prompt 0) and placement, with llama-bench's field names
    (model_type, n_prompt, n_gen, avg_ts, stddev_ts, samples_ts, ...) plus ours (placement,
    budget, hit rate, GPU bytes). Generation rows also carry `roofline_tg_ts`: the decode rate
    the fitted bandwidths allow for that placement's bytes, without hand-offs or cold-chain
    fixed times (prediction.configs[...].roofline_decode_ts), and `roofline_gpu_rate`: "measured"
    (a GPU probe or a static row of the run fitted it), "default" (neither did: the roofline
    is too fast where the host's GPU path is slower) or "none" (a run without a GPU)."""
    from hybrid_gguf import __version__

    rows = []
    for out in outs:
        model = Path(out["model"])
        model_type = f"{out.get('arch', '?')} {out.get('n_expert', 0)}x top-{out.get('n_expert_used', 0)}"
        pred = out.get("prediction", {})
        predicted = pred.get("configs", {})
        gpu_rate = ("none" if pred.get("on_gpu") is False else
                    None if "gpu_rate_measured" not in pred else
                    "measured" if pred["gpu_rate_measured"] else "default")
        for r in out["results"]:
            if r.get("error"):
                continue
            roofline = predicted.get(r["name"], {}).get("roofline_decode_ts")
            common = {
                "build_commit": f"hybrid-gguf {__version__}",
                "model_filename": str(model),
                "model_type": model_type,
                "n_threads": n_threads,
                "n_gpu_layers": None,
                "placement": r["name"],
                "budget_bytes": out["budget_bytes"],
                "budget_share_of_experts": out["budget_share_of_experts"],
                "hit_rate": r["hit_rate"],
                "gpu_expert_bytes": r["gpu_expert_bytes"],
                "vram_model_bytes": r["vram_model_bytes"],
                "pack_device": out.get("pack_device"),
                "routing": out.get("routing"),
            }
            for kind, n_prompt, n_gen in (("pp", r["n_prompt"], 0), ("tg", 0, r["n_gen"])):
                samples = [float(v) for v in r[f"{kind}_ts"] if v > 0]
                avg = statistics.mean(samples) if samples else 0.0
                sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
                n_tok = n_prompt + n_gen
                ns = [int(n_tok / v * 1e9) for v in samples]
                extra = {"roofline_tg_ts": roofline, "roofline_gpu_rate": gpu_rate} if kind == "tg" else {}
                rows.append({**common, **extra, "n_prompt": n_prompt, "n_gen": n_gen,
                             "avg_ns": int(statistics.mean(ns)) if ns else 0,
                             "stddev_ns": int(statistics.stdev(ns)) if len(ns) > 1 else 0,
                             "avg_ts": avg, "stddev_ts": sd,
                             "samples_ns": ns, "samples_ts": samples})
    return rows


def text_workload(texts: Sequence[str], llm_tokenize: Callable[[str], list[int]], n_tokens: int) -> list[list[int]]:
    """Chunks of n_tokens tokens from texts (for profiling prompts)."""
    out = []
    for text in texts:
        toks = llm_tokenize(text)
        for i in range(0, len(toks) - n_tokens + 1, n_tokens):
            out.append(toks[i:i + n_tokens])
    return out


# -- workloads: Python stdlib sources, different packages for profiling and timing ---------

PROFILE_PACKAGES = ("email", "json", "http", "logging", "unittest")
EVAL_PACKAGES = ("asyncio", "xml", "concurrent", "importlib")


def package_text(names: Sequence[str], limit_bytes: int) -> str:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for name in names:
        paths = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / f"{name}.py"]
        for path in paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            chunks.append(text)
            size += len(text)
            if size >= limit_bytes:
                return "".join(chunks)
    return "".join(chunks)


PROFILE_CHUNK = 512  # tokens per profiling prompt


def stdlib_workloads(model: Path, n_prompt: int, profile_tokens: int,
                     profile_packages: Sequence[str] = PROFILE_PACKAGES,
                     eval_packages: Sequence[str] = EVAL_PACKAGES, n_gen: int = 0, chunk: int = PROFILE_CHUNK):
    """(profile prompts of `chunk` tokens, the timed prompt): held-out packages for timing."""
    from hybrid_gguf.llama.loader import tokenizer_for

    tok = tokenizer_for(model)
    prof = tok(package_text(profile_packages, profile_tokens * 6))[:profile_tokens]
    prompts = [prof[i:i + chunk] for i in range(0, len(prof), chunk)]
    return prompts, tok(package_text(eval_packages, (n_prompt + n_gen) * 8))
