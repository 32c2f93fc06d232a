"""A/B benchmark of expert placements at one VRAM budget, measured in one process.

Placements: all routed experts on the CPU (`cpu-experts`), stock whole-layer placement at
the budget (`whole-layer`, what --n-cpu-moe gives), per-expert hot packs at the same budget
(`per-expert`, needs the patched backend), and everything on the GPU where it fits
(`all-gpu`). The hot set comes from a routing profile recorded on one workload; the timed
workload is a different one, so the plan cannot flatter itself.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.routing import process as routing_process
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import Inventory, read_inventory


@dataclass
class Config:
    name: str
    placement: object            # TensorPlacement or None
    hot: dict = field(default_factory=dict)
    gpu_expert_bytes: int = 0    # routed-expert bytes placed on the GPU


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


def layer_expert_bytes(inv: Inventory) -> list[int]:
    return [l.expert_bytes for l in inv.layers]


def hot_from_counts(inv: Inventory, counts: np.ndarray, budget_bytes: int) -> dict[int, list[int]]:
    """Hot experts chosen globally by expected selections per byte until the budget is spent."""
    cands = []
    for layer in inv.layers:
        if not layer.is_moe or layer.per_expert_bytes <= 0:
            continue
        row = counts[layer.index]
        total = row.sum()
        for e in range(layer.n_expert):
            share = row[e] / total if total > 0 else 0.0
            cands.append((share / layer.per_expert_bytes, layer.index, e, layer.per_expert_bytes))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    hot: dict[int, list[int]] = {}
    spent = 0
    for score, layer, e, nbytes in cands:
        if score <= 0:
            break
        if spent + nbytes > budget_bytes:
            continue
        hot.setdefault(layer, []).append(e)
        spent += nbytes
    return hot


def whole_layer_gpu_layers(inv: Inventory, budget_bytes: int) -> int:
    """How many layers' expert tensors fit whole in the budget (taken from the last layers,
    as --n-cpu-moe keeps the first N on the CPU)."""
    n, spent = 0, 0
    for layer in reversed(inv.layers):
        if not layer.is_moe:
            continue
        if spent + layer.expert_bytes > budget_bytes:
            break
        spent += layer.expert_bytes
        n += 1
    return n


def hit_rate(counts_decode: np.ndarray, hot: dict[int, list[int]]) -> Optional[float]:
    total = counts_decode.sum()
    if total == 0:
        return None
    on_gpu = sum(counts_decode[l, list(es)].sum() for l, es in hot.items() if es)
    return float(on_gpu / total)


def build_configs(inv: Inventory, counts: Optional[np.ndarray], budget_bytes: int,
                  include_all_gpu: bool, gpu_free_bytes: int) -> list[Config]:
    from hybrid_gguf.llama.loader import cpu_moe, n_cpu_moe

    moe_layers = [l for l in inv.layers if l.is_moe]
    configs = [Config("cpu-experts", cpu_moe())]
    k = whole_layer_gpu_layers(inv, budget_bytes)
    first_moe = moe_layers[0].index if moe_layers else 0
    n_cpu = inv.n_layer - k
    whole_hot = {l.index: list(range(l.n_expert)) for l in moe_layers if l.index >= n_cpu}
    configs.append(Config("whole-layer", n_cpu_moe(n_cpu) if n_cpu > first_moe else None,
                          whole_hot, sum(l.expert_bytes for l in moe_layers if l.index >= n_cpu)))
    if counts is not None and hybrid_backend.capability().per_expert:
        hot = hot_from_counts(inv, counts, budget_bytes)
        spent = sum(inv.layers[l].per_expert_bytes * len(es) for l, es in hot.items())
        configs.append(Config("per-expert", cpu_moe(), hot, spent))
    if include_all_gpu and inv.total_bytes < gpu_free_bytes * 0.9:
        configs.append(Config("all-gpu", None, {l.index: list(range(l.n_expert)) for l in moe_layers},
                              inv.expert_bytes_total))
    return configs


def load_config(path: Path, inv: Inventory, cfg: Config, n_ctx: int, n_batch: int, record,
                pack_device: str, n_threads: Optional[int], stream: int = routing_process.STREAM_MEASURED,
                routing: Optional[str] = None):
    """`cfg` loaded (`record`: a recorder.Recording, or None)."""
    from hybrid_gguf.llama.loader import load_llama

    kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=-1, use_mmap=False,
                  verbose=False, seed=0)
    if n_threads:
        kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    return load_llama(path, cfg.placement, hot=cfg.hot if cfg.name == "per-expert" else None,
                      pack_device=pack_device, record=record,
                      route_trace=routing_process.model_trace(inv, n_ctx, stream, routing), inventory=inv, **kwargs)


def measure_once(llm, prompt: Sequence[int], decode: Sequence[int], recorder) -> tuple[float, float, Optional[np.ndarray]]:
    """(prompt tokens/s, decode tokens/s, decode routing counts when recording).

    The decode steps are teacher-forced: each step evaluates the next token of `decode`
    (the held-out text after the prompt), one at a time, as a decode step does. Every
    placement then decodes the same tokens with the same routing. Tokens chosen by the model
    itself would not do: greedy decoding of random weights soon repeats one token (one
    routing pattern, and expert weights the CPU reads again and again), and sampled tokens
    differ between placements as soon as float rounding does."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    llm.eval(list(prompt))
    llama_cpp.llama_synchronize(llm._ctx.ctx)  # perf counters are updated on synchronize
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    pp_ts = perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms > 0 else 0.0
    if recorder is not None:
        recorder.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    for tok in decode:
        llm.eval([int(tok)])
        # a decode step ends when its logits are ready (llama.cpp books one-token steps as
        # decode only when each is synchronized on its own)
        llama_cpp.llama_synchronize(llm._ctx.ctx)
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    tg_ts = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else 0.0
    counts = recorder.snapshot(trace=False).counts_decode if recorder is not None else None
    return pp_ts, tg_ts, counts


def busy_handoffs(trace, hot: dict, layers: Sequence[int], n_expert: int) -> Optional[float]:
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
        gpu[[int(e) for e in hot.get(l, ())]] = True
        valid = rows >= 0
        host = valid & ~gpu[np.where(valid, rows, 0)]
        busy += int(np.any(host, axis=1).sum())
    return busy / n_tokens


def vram_model_bytes(loaded) -> int:
    gpu = sum(v for k, v in loaded.buffers.model.items() if not k.startswith("CPU") and "Host" not in k)
    return int(gpu + hybrid_backend.pack_bytes(loaded.llm._model.model))


def run_bench(model_path: Path, *, budget_bytes: int, profile_prompts: Sequence[Sequence[int]],
              eval_prompt: Sequence[int], n_prompt: int, n_gen: int, reps: int, n_ctx: int = 2048,
              configs: Optional[Sequence[str]] = None, pack_device: str = "CUDA0",
              n_threads: Optional[int] = None, counts: Optional[np.ndarray] = None,
              eval_counts: Optional[np.ndarray] = None, eval_trace=None, save_calibration: bool = True,
              routing: Optional[str] = None, log: Callable[[str], None] = print,
              on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Profile (unless counts are given), then time each placement; returns a JSON-able dict.
    `routing`: a routing preset (routing_process.PRESETS) replayed instead of the model's own.
    `on_progress(more_steps, steps_done)`: first the number of timed reps ahead, then each rep."""
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.llama.recorder import Recording

    inv = read_inventory(model_path)
    if inv.n_expert == 0:
        raise HybridError("bench needs a MoE model; this one has no routed experts")
    gpus = gpu_devices()
    gpu_free = gpus[0].free_bytes if gpus else 0

    prompt = list(eval_prompt)[:n_prompt]
    decode = list(eval_prompt)[n_prompt:n_prompt + n_gen]
    if len(prompt) + len(decode) < n_prompt + n_gen:
        raise HybridError(f"evaluation text has {len(eval_prompt)} tokens, fewer than --pp {n_prompt} "
                          f"+ --tg {n_gen}")
    results: list[Result] = []

    if counts is None or eval_counts is None or eval_trace is None:
        # one recorded load: the profile workload, then the timed workload's routing, so the
        # timed loads below run without a recorder (its syncs would slow every placement)
        record = Recording(trace_records=max(n_gen, 1) * inv.n_layer)
        routed = routing_process.model_routing(inv, routing) is not None
        loaded = load_config(model_path, inv, Config("profile", _cpu_moe()), n_ctx, 512, record,
                             pack_device, n_threads, routing_process.STREAM_PROFILE, routing)
        for p in profile_prompts:
            loaded.llm.reset()
            loaded.llm.eval(list(p))
        counts = loaded.recorder.snapshot(trace=False).counts
        if routed:
            # a routing preset maps positions to routing: the timed text needs its own stream,
            # or the profile would know the timed tokens' routing in advance
            loaded.close()
            loaded = load_config(model_path, inv, Config("profile", _cpu_moe()), n_ctx, 512, record,
                                 pack_device, n_threads, routing=routing)
        _, _, eval_counts = measure_once(loaded.llm, prompt, decode, loaded.recorder)
        eval_trace = loaded.recorder.snapshot(trace=True).trace
        loaded.close()
        log(f"profiled {int(counts.sum() / max(inv.n_expert_used, 1) / max(inv.n_layer, 1))} tokens")

    all_cfgs = build_configs(inv, counts, budget_bytes, include_all_gpu=True, gpu_free_bytes=gpu_free)
    if configs:
        all_cfgs = [c for c in all_cfgs if c.name in configs]
    step = on_progress or (lambda more, done: None)
    step(len(all_cfgs) * reps, 0)
    for cfg in all_cfgs:
        t0 = time.perf_counter()
        try:
            loaded = load_config(model_path, inv, cfg, n_ctx, max(512, n_prompt), None, pack_device, n_threads,
                                 routing=routing)
        except HybridError as exc:
            results.append(Result(cfg.name, n_prompt, n_gen, [], [], None, cfg.gpu_expert_bytes, 0, 0.0, str(exc)))
            step(0, reps)
            continue
        load_s = time.perf_counter() - t0
        measure_once(loaded.llm, prompt[:32], decode[:4], None)  # warm-up: graphs, CUDA kernels
        pps, tgs = [], []
        for _ in range(reps):
            pp, tg, _ = measure_once(loaded.llm, prompt, decode, None)
            pps.append(pp)
            tgs.append(tg)
            step(0, 1)
        hit = 0.0 if cfg.name == "cpu-experts" else hit_rate(eval_counts, cfg.hot)
        res = Result(cfg.name, n_prompt, n_gen, pps, tgs, hit, cfg.gpu_expert_bytes, vram_model_bytes(loaded), load_s)
        log(f"{cfg.name:12s} pp {statistics.median(pps):8.1f} t/s  tg {statistics.median(tgs):7.2f} t/s  "
            f"hit {res.hit_rate if res.hit_rate is not None else float('nan'):.3f}  "
            f"gpu experts {cfg.gpu_expert_bytes / 2**30:.2f} GiB")
        results.append(res)
        loaded.llm.close()

    out = {
        "model": str(model_path),
        "arch": inv.arch,
        "n_layer": inv.n_layer,
        "n_expert": inv.n_expert,
        "n_expert_used": inv.n_expert_used,
        "expert_bytes_total": inv.expert_bytes_total,
        "budget_bytes": budget_bytes,
        "budget_share_of_experts": budget_bytes / inv.expert_bytes_total,
        "fingerprint": inv.fingerprint,
        "routing": routing_process.model_routing(inv, routing) or "optimistic",
        "results": [r.summary() for r in results],
        "_counts": counts,
        "_eval_counts": eval_counts,
        "_eval_trace": eval_trace,
    }
    out["prediction"] = predict_configs(inv, counts, all_cfgs, results, n_prompt, n_gen, n_ctx,
                                        on_gpu=bool(gpus), save=save_calibration, log=log,
                                        eval_trace=eval_trace)
    base = {r.name: r for r in results}
    if "whole-layer" in base and "per-expert" in base and base["whole-layer"].tg_ts:
        wl, pe = base["whole-layer"].summary(), base["per-expert"].summary()
        out["per_expert_vs_whole_layer_tg"] = pe["tg_median_ts"] / wl["tg_median_ts"]
        out["per_expert_vs_whole_layer_pp"] = pe["pp_median_ts"] / wl["pp_median_ts"]
    return out


def predict_configs(inv: Inventory, counts: np.ndarray, cfgs: Sequence[Config], results: Sequence[Result],
                    n_prompt: int, n_gen: int, n_ctx: int, on_gpu: bool = True, save: bool = True,
                    log: Callable[[str], None] = print, eval_trace=None) -> dict:
    """The planner's predicted tokens/s of every placement, twice: with this machine's stored
    calibration (what `plan` predicted before this run: out of sample), and with the model
    fitted to this run's placements (in sample), which `plan` uses from then on when `save`.
    Also the decode roofline: the fitted model without the per-layer hand-off. Without a GPU
    nothing is fitted: the predictions are the CPU-only model's.

    The fit takes each placement's busy hand-offs from the timed workload's routing trace
    when there is one (what happened), not from the profile's estimate (what `plan` can
    know); both are reported, with each placement's model terms for later refits."""
    from hybrid_gguf.bench.probe import calibrate_bandwidth
    from hybrid_gguf.planning import calibration
    from hybrid_gguf.planning.speed import hit_rate, predict_speed
    from hybrid_gguf.routing.stats import selection_probs

    tokens = counts.sum(axis=1) / max(inv.n_expert_used, 1)
    p = selection_probs(counts, tokens, [l.n_expert_used for l in inv.layers])
    stored = calibrate_bandwidth()
    before = stored.for_model(inv.fingerprint)
    runs, terms = {}, {}
    for cfg, res in zip(cfgs, results):
        s = res.summary()
        if res.error is None and s["tg_median_ts"] > 0:
            run = calibration.MeasuredRun(cfg.hot, s["tg_median_ts"], s["pp_median_ts"], n_prompt, n_prompt + n_gen // 2)
            runs[cfg.name] = (cfg, run)
            t = calibration.run_terms(inv, p, run, n_ctx)
            host_layers = [l.index for l in inv.layers
                           if l.is_moe and len(set(cfg.hot.get(l.index, ()))) < l.n_expert]
            traced = busy_handoffs(eval_trace, cfg.hot, host_layers, inv.n_expert)
            terms[cfg.name] = (t, traced)
    fit_terms = [t if traced is None else replace(t, handoffs_busy=traced, handoffs_idle=t.handoffs - traced)
                 for t, traced in terms.values()] if on_gpu else []
    saved = calibration.fit_bandwidth_terms(fit_terms, stored, inv.fingerprint) if fit_terms else stored
    fitted = saved.for_model(inv.fingerprint)
    roof = replace(fitted, handoff_s=0.0, handoff_idle_s=0.0)
    table = {}
    for name, (cfg, run) in runs.items():
        t, traced = terms[name]
        row = {"measured_decode_ts": run.decode_tokens_per_s, "measured_prefill_ts": run.prefill_tokens_per_s,
               "predicted_hit_rate": hit_rate(p, cfg.hot),
               "busy_handoffs_estimated": t.handoffs_busy, "busy_handoffs_traced": traced,
               "terms": t.to_dict()}
        for key, bw in (("predicted", before), ("fitted", fitted), ("roofline", roof)):
            sp = predict_speed(inv, p, cfg.hot if on_gpu else {}, on_gpu, bw, n_ctx,
                               n_ubatch=n_prompt, kv_fill=run.kv_fill)
            row[f"{key}_decode_ts"] = sp.decode_tokens_per_s
            if key != "roofline":
                row[f"{key}_prefill_ts"] = sp.prefill_tokens_per_s
        row["predicted_decode_error"] = row["predicted_decode_ts"] / run.decode_tokens_per_s - 1.0
        row["fitted_decode_error"] = row["fitted_decode_ts"] / run.decode_tokens_per_s - 1.0
        table[name] = row
        log(f"{name:12s} decode measured {run.decode_tokens_per_s:7.2f}, predicted {row['predicted_decode_ts']:7.2f} "
            f"(stored calibration), {row['fitted_decode_ts']:7.2f} (fitted to this run), "
            f"roofline {row['roofline_decode_ts']:7.2f} t/s; busy hand-offs {t.handoffs_busy:.1f} estimated"
            + ("" if traced is None else f", {traced:.1f} traced"))
    if save and fit_terms:
        calibration.save_calibration(saved)
    return {"calibration_before": before.to_dict(), "calibration_fitted": fitted.to_dict(),
            "calibration_saved": bool(save and fit_terms), "configs": table,
            "profile_counts": counts.astype(int).tolist(),
            "hot": {name: {str(l): list(map(int, es)) for l, es in cfg.hot.items()}
                    for name, (cfg, _) in runs.items()}}


def run_budgets(model_path: Path, budgets: Sequence[int], *, profile_prompts, eval_prompt,
                configs: Optional[Sequence[str]] = None, save_calibration: bool = True,
                log: Callable[[str], None] = print, **kwargs) -> list[dict]:
    """run_bench at each budget, profiling once. Budgets after the first time only the
    placements that depend on the budget (whole-layer, per-expert). With a GPU and several
    budgets one decode fit over all of them is the calibration stored for `plan` (it needs
    per-expert runs at different budgets to tell busy from idle hand-offs); each result
    then carries it as "combined_fit"."""
    from hybrid_gguf.llama.devices import gpu_devices

    inv = read_inventory(model_path)
    outs: list[dict] = []
    counts = eval_counts = eval_trace = None
    budget_bound = [c for c in (configs or ("whole-layer", "per-expert")) if c in ("whole-layer", "per-expert")]
    for i, budget in enumerate(budgets):
        if i and not budget_bound:
            log("the other budgets change none of the chosen placements: skipped")
            break
        log(f"== budget {budget / 2**30:.2f} GiB of expert bytes "
            f"({100 * budget / inv.expert_bytes_total:.0f}% of {inv.expert_bytes_total / 2**30:.2f} GiB)")
        t0 = time.perf_counter()
        out = run_bench(model_path, budget_bytes=budget, profile_prompts=profile_prompts,
                        eval_prompt=eval_prompt,
                        configs=configs if i == 0 else budget_bound,
                        counts=counts, eval_counts=eval_counts, eval_trace=eval_trace,
                        save_calibration=save_calibration and len(budgets) == 1, log=log, **kwargs)
        counts, eval_counts, eval_trace = out.pop("_counts"), out.pop("_eval_counts"), out.pop("_eval_trace")
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
    budget, hit rate, GPU bytes)."""
    from hybrid_gguf import __version__

    rows = []
    for out in outs:
        model = Path(out["model"])
        model_type = f"{out.get('arch', '?')} {out.get('n_expert', 0)}x top-{out.get('n_expert_used', 0)}"
        for r in out["results"]:
            if r.get("error"):
                continue
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
                rows.append({**common, "n_prompt": n_prompt, "n_gen": n_gen,
                             "avg_ns": int(statistics.mean(ns)) if ns else 0,
                             "stddev_ns": int(statistics.stdev(ns)) if len(ns) > 1 else 0,
                             "avg_ts": avg, "stddev_ts": sd,
                             "samples_ns": ns, "samples_ts": samples})
    return rows


def _cpu_moe():
    from hybrid_gguf.llama.loader import cpu_moe

    return cpu_moe()


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


def tokenizer_for(model: Path) -> Callable[[str], list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


def stdlib_workloads(model: Path, n_prompt: int, profile_tokens: int,
                     profile_packages: Sequence[str] = PROFILE_PACKAGES,
                     eval_packages: Sequence[str] = EVAL_PACKAGES, n_gen: int = 0):
    """(profile prompts of 512 tokens, the timed prompt): held-out packages for timing."""
    tok = tokenizer_for(model)
    prof = tok(package_text(profile_packages, profile_tokens * 6))[:profile_tokens]
    prompts = [prof[i:i + 512] for i in range(0, len(prof), 512)]
    return prompts, tok(package_text(eval_packages, (n_prompt + n_gen) * 8))
