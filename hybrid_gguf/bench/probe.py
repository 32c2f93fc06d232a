"""This machine's calibration constants, measured: the CPU side in about a second (a
streaming read and a matmul, no model; `calibrate_bandwidth`), the GPU side once per machine
on three generated models (`probe_gpu`).

A decode step on the GPU costs the bytes it reads over the GPU's bandwidth plus fixed
times: one per step (launch, sync, logits) and one per layer (kernel launches and small
ops). The runs of one model cannot tell these apart, since every placement of it has the
same layers. Three generated models can: "deep" has many layers of few bytes, "wide" a
few layers of many bytes, "tiny" two small layers (little more than the per-step time).
Each is decoded all on the GPU, teacher-forced on random tokens (routing does not matter
when every expert is on the GPU), and their step times give gpu_bytes_per_s, gpu_layer_s
and gpu_step_s for the stored calibration. Without them a calibration fitted on one model
mispredicts another: fitted on a 48-layer Qwen3-30B-shaped model, one GPU rate predicted a
32-layer Mixtral-shaped model all on the GPU at 70 tok/s against 190 measured
(docs/benchmarks.md).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.calibration import (Bandwidth, MeasuredRun, fit_decode, load_calibration, machine_id,
                                              run_terms, save_calibration)

_SMALL_LAYER = dict(n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_expert=32, n_expert_used=8, n_ff_exp=256)
# (bench preset, overrides): per decode step "deep" and "tiny" read ~6 MB per layer, "wide" ~240 MB
PROBES: Mapping[str, tuple] = {
    "deep": ("qwen3-30b-a3b-like", dict(_SMALL_LAYER, n_layer=48)),
    "wide": ("mixtral-8x7b-like", dict(n_layer=4)),
    "tiny": ("qwen3-30b-a3b-like", dict(_SMALL_LAYER, n_layer=2)),
}
PROBE_PROMPT = 16


def probe_spec(name: str, weight_type: str = "Q4_K"):
    from hybrid_gguf.bench.model_maker import bench_spec

    preset, overrides = PROBES[name]
    return bench_spec(preset, weight_type, **overrides)


def ensure_probe_model(name: str, cache_dir: Optional[Path] = None,
                       log: Callable[[str], None] = print) -> Path:
    """The probe model's file in the cache, written when absent (3.4 GB for "wide")."""
    from hybrid_gguf.bench.model_maker import write_bench_model
    from hybrid_gguf.synth import default_cache_dir

    spec = probe_spec(name)
    path = Path(cache_dir or default_cache_dir()) / f"gpu-probe-{name}-{spec.key()}.gguf"
    if not path.exists():
        res = write_bench_model(path, spec)
        log(f"wrote probe model {name}: {res.file_bytes / 1e9:.2f} GB in {res.seconds:.1f} s")
    return path


def measure_probe(path: Path, n_gen: int = 64, reps: int = 3, n_threads: Optional[int] = None,
                  pack_device: str = "CUDA0"):
    """RunTerms of one model decoded with everything on the GPU (median of reps)."""
    from hybrid_gguf.bench.plans import Config
    from hybrid_gguf.bench.runner import load_config, measure_once
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.synth import VOCAB_SIZE

    inv = read_inventory(path)
    n_ctx = PROBE_PROMPT + n_gen + 64
    tokens = np.random.default_rng(0).integers(3, VOCAB_SIZE, size=PROBE_PROMPT + n_gen)
    prompt, decode = tokens[:PROBE_PROMPT].tolist(), tokens[PROBE_PROMPT:].tolist()
    loaded = load_config(path, inv, Config("all-gpu", None), n_ctx, 512, None, pack_device, n_threads)
    try:
        measure_once(loaded.llm, prompt, decode[:4], None)  # warm-up: graphs, kernels
        runs = [measure_once(loaded.llm, prompt, decode, None) for _ in range(reps)]
    finally:
        loaded.llm.close()
    pp = statistics.median(r[0] for r in runs)
    tg = statistics.median(r[1] for r in runs)
    every = {l.index: list(range(l.n_expert)) for l in inv.layers if l.is_moe}
    run = MeasuredRun(every, tg, pp, PROBE_PROMPT, PROBE_PROMPT + n_gen // 2)
    return run_terms(inv, None, run, n_ctx)


def probe_gpu(cache_dir: Optional[Path] = None, n_gen: int = 64, reps: int = 3,
              n_threads: Optional[int] = None, save: bool = True, keep_models: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Measure gpu_bytes_per_s, gpu_layer_s and gpu_step_s on the probe models and (with
    save) store them in this machine's calibration. Returns what was measured and fitted.
    The models (4.2 GB) are deleted afterwards unless keep_models: writing them again takes
    seconds, and the probe runs once per machine."""
    from hybrid_gguf.llama.devices import gpu_devices

    if not gpu_devices():
        raise HybridError("the GPU probe needs a GPU; llama.cpp sees none in this build")
    terms = {}
    for name in PROBES:
        path = ensure_probe_model(name, cache_dir, log)
        try:
            terms[name] = measure_probe(path, n_gen, reps, n_threads)
        finally:
            if not keep_models:
                path.unlink(missing_ok=True)
        t = terms[name]
        log(f"probe {name}: {t.gpu_layers:.0f} layers, {t.gpu_bytes / 1e9:.3f} GB read per token, "
            f"decode {t.decode_tokens_per_s:.1f} tok/s")
    before = calibrate_bandwidth()
    fitted = fit_decode(list(terms.values()), before)
    if not fitted.get("gpu_layer_s") or not fitted.get("gpu_step_s"):
        raise HybridError("the probe runs did not separate the GPU's bandwidth from its fixed times "
                          f"(decode {', '.join(f'{n} {t.decode_tokens_per_s:.1f}' for n, t in terms.items())} "
                          "tok/s); the calibration is unchanged")
    if before.model_gpu_rates:
        log("the GPU rates `bench` fitted per model used the old fixed times: dropped; bench again to refit")
    bw = replace(before, **fitted, model_gpu_rates=(), measured=tuple(sorted(set(before.measured) | set(fitted))),
                 measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    log(f"GPU: {bw.gpu_bytes_per_s / 1e9:.0f} GB/s, {1e6 * bw.gpu_layer_s:.1f} us per layer and "
        f"{1e6 * bw.gpu_step_s:.0f} us per decode step")
    if save:
        save_calibration(bw)
    return {"gpu_bytes_per_s": bw.gpu_bytes_per_s, "gpu_layer_s": bw.gpu_layer_s, "gpu_step_s": bw.gpu_step_s,
            "probes": {n: t.to_dict() for n, t in terms.items()}, "calibration_saved": save}


# --- the CPU side: seconds, no model ------------------------------------------------------


_READ_MIN = 256 * 2**20
_READ_MAX = 4 * 2**30


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache of cpu0 in bytes (Linux sysfs), 0 where unknown."""
    best = 0
    try:
        entries = sorted(root.glob("index*"))[:16]
    except OSError:
        return 0
    for entry in entries:
        try:
            text = (entry / "size").read_text().strip()[:32]
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best


def cpu_read_size(llc_bytes: int, available_bytes: int) -> int:
    """How many bytes the streaming read must cover to time DRAM, not the last-level
    cache: four times that cache, at least 256 MiB, at most 4 GiB and a quarter of the free
    memory. (The H200 host's 300 MiB L3 is larger than the old fixed 256 MiB; there the two
    sizes read alike, 80-94 against 84-95 GB/s, but a cache that keeps what it streams
    would not.)"""
    want = max(_READ_MIN, 4 * max(0, llc_bytes))
    cap = _READ_MAX if available_bytes <= 0 else min(_READ_MAX, available_bytes // 4)
    return max(16 * 2**20, min(want, cap))


def measure_cpu_read(n_bytes: Optional[int] = None, repeats: int = 5, threads: Optional[int] = None) -> float:
    """Bytes/s of a multi-threaded streaming read (numpy reductions release the GIL), over
    `n_bytes` (default: `cpu_read_size` of this machine)."""
    from concurrent.futures import ThreadPoolExecutor

    if n_bytes is None:
        from hybrid_gguf.llama.devices import cpu_ram

        n_bytes = cpu_read_size(last_level_cache_bytes(), cpu_ram().available_bytes)
    threads = threads or os.cpu_count() or 1
    a = np.ones(max(n_bytes // 8, threads), dtype=np.int64)
    chunks = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.add.reduce, chunks))  # fault the pages in first
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.add.reduce, chunks))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def measure_cpu_flops(n: int = 1024, repeats: int = 3) -> float:
    x = np.ones((n, n), dtype=np.float32)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def calibrate_bandwidth(force: bool = False, path: Optional[Path] = None,
                        n_bytes: Optional[int] = None) -> Bandwidth:
    """This machine's Bandwidth: the cached entry, or a short measurement (~1 s) of CPU
    read bandwidth and matmul throughput, stored for next time (a cached entry without the
    streaming read gets it measured and stored). GPU fields stay at their
    defaults until someone measures them and calls save_calibration."""
    if not force:
        cached = load_calibration(path)
        if cached is not None and cached.cpu_read_bytes_per_s > 0:
            return cached
        if cached is not None:
            # stored before the streaming read was kept apart from the fitted CPU rate:
            # measure the read (the fit's bound), keep everything else
            bw = replace(cached, cpu_read_bytes_per_s=measure_cpu_read(n_bytes),
                         measured=tuple(sorted(set(cached.measured) | {"cpu_read_bytes_per_s"})))
            try:
                save_calibration(bw, path)
            except OSError:
                pass
            return bw
    prev = load_calibration(path)
    base = prev if prev is not None else Bandwidth()
    measured = set(base.measured) | {"cpu_bytes_per_s", "cpu_read_bytes_per_s", "cpu_flops"}
    read = measure_cpu_read(n_bytes)
    bw = replace(base, cpu_bytes_per_s=read, cpu_read_bytes_per_s=read, cpu_flops=measure_cpu_flops(),
                 measured=tuple(sorted(measured)), machine=machine_id(),
                 measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        save_calibration(bw, path)
    except OSError:
        pass  # a read-only home still gets the numbers for this run
    return bw
