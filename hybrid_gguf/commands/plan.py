"""`hybrid-gguf plan MODEL --gpu-budget 8GiB`: decide what lives where, predict what it buys,
write the plan YAML; optionally replay a routing trace against static plans and caches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hybrid_gguf.errors import HybridError
from hybrid_gguf.commands.common import (cache_type_choice, cache_type_k_option, cache_type_v_option,
                                        check_output_file, ctx_option, flash_attn_option, model_argument,
                                        model_option, resolve, ubatch_choice, ubatch_option)


def parse_devices(spec: str) -> list:
    """"CUDA0:24GiB,CUDA1:16GiB" (or NAME=SIZE) -> [(name, bytes)], the GPUs of a machine
    planned for from elsewhere and what the model may use on each."""
    from hybrid_gguf.sizes import parse_size

    out = []
    for item in spec.split(","):
        item = item.strip()
        sep = "=" if "=" in item else ":"
        name, found, size = item.rpartition(sep)
        name = name.strip()
        if not found or not name or name.upper() in ("GPU", "CPU") or any(c in name for c in ";@ "):
            raise HybridError(f"--assume-devices expects NAME:SIZE[,NAME:SIZE] with llama.cpp's device names "
                              f"(CUDA0:24GiB,CUDA1:16GiB), got {item!r}")
        out.append((name, parse_size(size)))
    if len({n.upper() for n, _ in out}) != len(out):
        raise HybridError(f"--assume-devices names a device twice: {spec!r}")
    return out


def assumed_devices(spec: str, gpu_budget: Optional[str]) -> tuple:
    """([DeviceBudget], notes) for --assume-devices: each device's stated size is its budget,
    or --gpu-budget's total is split over them in proportion (or given per device)."""
    from hybrid_gguf.planning.budget import device_budgets, parse_budget

    return device_budgets(parse_budget(gpu_budget), parse_devices(spec), stated=True)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: Optional[str] = model_argument(),
        gpu_budget: Optional[str] = typer.Option(
            None, "--gpu-budget",
            help="VRAM for this model: one total, e.g. 8GiB (with several GPUs split by their free memory), or "
                 "one per GPU, e.g. 20GiB,12GiB (with GPUs here: each at most its free memory less 512 MiB)"),
        model_opt: Optional[str] = model_option(),
        ctx: Optional[int] = ctx_option("context length to plan for"),
        out: Optional[Path] = typer.Option(None, "--out", help="write the plan YAML here"),
        explain: bool = typer.Option(False, "--explain", help="per-layer and memory breakdown"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
        profile_path: Optional[Path] = typer.Option(None, "--profile",
                                                    help="routing profile JSON (default: the store)"),
        store: Optional[Path] = typer.Option(None, "--store", help="profile store directory"),
        previous: Optional[Path] = typer.Option(
            None, "--previous", help="plan in use (default: --out if it exists); kept unless beaten"),
        replay_path: Optional[Path] = typer.Option(None, "--replay", help="routing trace (.npz) to replay"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of replay hit rate vs budget"),
        devices_spec: Optional[str] = typer.Option(
            None, "--assume-devices", "--devices",
            help="plan for these GPUs instead of this machine's: CUDA0:24GiB,CUDA1:16GiB (what the model may use "
                 "on each; `run --plan` refuses the plan on other GPUs)"),
        n_ubatch: Optional[str] = ubatch_option(help="prompt micro-batch (llama.cpp's -ub) to plan for, or auto: "
                                                     "the planner's pick of 512..4096 by predicted prefill and "
                                                     "decode (default 512)"),
        flash_attn: bool = flash_attn_option(help="plan for flash attention (llama.cpp's -fa)"),
        type_k: Optional[str] = cache_type_k_option(help="KV cache type of K to plan for (llama.cpp's -ctk; "
                                                         "default f16)"),
        type_v: Optional[str] = cache_type_v_option(help="KV cache type of V to plan for (llama.cpp's -ctv; "
                                                         "default f16; a quantized V needs --flash-attn)"),
        margin: str = typer.Option("64MiB", "--margin", help="fixed safety margin per GPU"),
        whole_tensor: bool = typer.Option(False, "--whole-tensor",
                                          help="plan for stock llama.cpp (whole expert tensors)"),
        measure: bool = typer.Option(True, "--measure/--no-measure",
                                     help="ask llama.cpp for the compute buffer size (dry run)"),
        calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                       help="use (or measure once) this machine's bandwidths"),
        hysteresis: float = typer.Option(0.01, "--hysteresis", help="minimum hit-rate gain to replace the previous plan"),
        promote_from: Optional[float] = typer.Option(
            None, "--promote-from", min=0.0, max=1.0,
            help="consider promoting a layer whole (no CPU hand-off) once its hot set covers this share of "
                 "its experts; 0 (the default) lets the speed model weigh every layer"),
        cache: str = typer.Option("static", "--cache",
                                  help="the in-session cache the plan's runs use: static, lru, lfu, seeded, or "
                                       "auto (the fastest by the speed model, each replayed on the routing trace "
                                       "`profile` stored); patch version 5"),
        cache_quota: Optional[int] = typer.Option(None, "--cache-quota", min=0, max=4096,
                                                  help="expert uploads per step (default: with --cache auto the "
                                                       "replay's best of 4, 16, 64; else 16)"),
        cold: str = typer.Option("auto", "--cold",
                                 help="who computes the experts left in host memory: cpu (a hand-off per "
                                      "split layer), gpu (the packs' GPU reads them from pinned memory; "
                                      "patch v4, CUDA), auto (the faster by the speed model, where both work)"),
        handoff: str = typer.Option("auto", "--handoff",
                                    help="with cold experts on the CPU, who takes each split layer: scheduler "
                                         "(the graph is cut there), worker (the CPU worker; hybrid patch "
                                         "version 8, one GPU), auto (the faster by the speed model, where the "
                                         "worker can run)"),
    ) -> None:
        """Plan per-expert GPU/CPU placement for a GPU budget and predict hit rate and speed."""
        from rich.console import Console

        from hybrid_gguf.autoplan import plan_model
        from hybrid_gguf.planning.calibration import Bandwidth
        from hybrid_gguf.planning.memory import check_cache_types
        from hybrid_gguf.sizes import parse_size

        from hybrid_gguf.limits import check_ctx, check_ubatch

        console = Console(stderr=as_json)
        check_ctx(ctx, "--ctx")
        model = resolve(model, model_opt).path
        n_ubatch = ubatch_choice(n_ubatch)  # None: not given (512)
        type_k = cache_type_choice(type_k, "--cache-type-k") or "f16"
        type_v = cache_type_choice(type_v, "--cache-type-v") or "f16"
        check_cache_types(type_k, type_v, flash_attn)
        # --out may name the previous plan (it is replaced), never the model or a profile
        if out is not None:
            check_output_file(out, "--out", inputs=(model, profile_path, replay_path), create_folders=True)
        if plot is not None:
            check_output_file(plot, "--plot", image=True, inputs=(model, profile_path, replay_path))
        if cold not in ("auto", "cpu", "gpu"):
            raise HybridError(f"--cold takes auto, cpu or gpu, got {cold!r}")
        if handoff not in ("auto", "scheduler", "worker"):
            raise HybridError(f"--handoff takes auto, scheduler or worker, got {handoff!r}")
        from hybrid_gguf.planning.budget import parse_budget

        if gpu_budget is None and devices_spec is None:
            raise HybridError("give --gpu-budget (e.g. 8GiB, or 20GiB,12GiB for two GPUs), or --assume-devices "
                              "CUDA0:24GiB,CUDA1:16GiB")
        if ctx is None:
            from hybrid_gguf.header.inventory import read_inventory
            from hybrid_gguf.limits import default_ctx

            ctx = default_ctx(read_inventory(model))
        check_ubatch(n_ubatch, ctx, "--ubatch")
        n_ubatch = 512 if n_ubatch is None else n_ubatch
        devs, dev_notes = assumed_devices(devices_spec, gpu_budget) if devices_spec else (None, [])
        budget = None if devs else parse_budget(gpu_budget)
        res = plan_model(model, budget, ctx, profile_path=profile_path, store=store, previous_path=previous,
                         out=out, devices=devs, per_expert=False if whole_tensor else None, measure=measure,
                         calibrate=calibrate, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                         type_v=type_v, margin_bytes=parse_size(margin), hysteresis=hysteresis,
                         promote_from=promote_from, cold=None if cold == "auto" else cold, cache=cache,
                         cache_quota=cache_quota, handoff=None if handoff == "auto" else handoff)
        plan, diff, inv = res.plan, res.diff, res.inventory
        if dev_notes:
            plan.notes = dev_notes + plan.notes
        opts = plan.memory
        per_expert = plan.backend == "per-expert"
        bw = plan.predicted.bandwidth or Bandwidth()

        report = None
        if replay_path is not None:
            from hybrid_gguf.routing.replay import load_trace

            trace = load_trace(replay_path, n_layer=inv.n_layer, n_expert=inv.n_expert)
            report, replay_plan = run_replay(trace, inv, plan.budget_bytes, ctx, opts, per_expert, bw)
            cache = replay_cache(trace, inv, replay_plan, bw)
            if plot is not None:
                from hybrid_gguf.routing.replay import plot_replay

                plot = plot_replay(report, plot, title=f"{model.name}")
        elif plot is not None:
            raise HybridError("--plot draws the replay: pass --replay TRACE too")

        here = cpu_only_prediction(inv, bw, ctx, plan.memory.n_ubatch)
        if as_json:
            d = plan.to_json_dict()
            d["per_device"] = plan.per_device(inv)
            if here is not None:
                d["here_cpu_only"] = {"decode_tokens_per_s": here.decode_tokens_per_s,
                                      "prefill_tokens_per_s": here.prefill_tokens_per_s}
            if diff is not None:
                d["diff"] = diff.to_dict()
            if report is not None:
                d["replay"] = report.to_dict()
                d["replay"]["cache"] = cache
            print(json.dumps(d))
            return
        print_plan(console, plan, inv, explain, here)
        if diff is not None:
            console.print(f"vs previous plan: {diff.summary()}")
        if report is not None:
            print_replay(console, report)
            print_cache_replay(console, cache)
        if out is not None:
            console.print(f"wrote {out}", soft_wrap=True, highlight=False)
        if plot is not None:
            console.print(f"wrote {plot}", soft_wrap=True, highlight=False)


def cpu_only_prediction(inv, bw, n_ctx: int, n_ubatch: int):
    """On a machine without a GPU: what the model runs at here, all on the CPU (a
    SpeedPrediction; None when a GPU is visible). Which experts are hot does not matter
    on the CPU, so no routing profile is needed."""
    from hybrid_gguf.planning.speed import predict_speed

    try:
        from hybrid_gguf.llama.devices import gpu_devices

        if gpu_devices():
            return None
    except Exception:  # no llama_cpp: no GPU to use either
        pass
    return predict_speed(inv, None, {}, False, bw, n_ctx, n_ubatch)


def replay_cache(trace, inv, replay_plan, bw) -> dict:
    """The hot packs of the replay's plan at this budget (profiled on the trace's first half)
    as an in-session cache (`run --cache`), each policy and quota replayed on the trace's
    second half with its predicted decode speed (planning/cache_choice.rank_caches)."""
    from hybrid_gguf.planning.cache_choice import rank_caches

    if replay_plan is None:
        return {}
    decode_ms = (replay_plan.predicted.speed_terms or {}).get("decode_ms")
    return rank_caches(trace, replay_plan.hot, inv, decode_ms, bw, start=trace.n_tokens // 2)


def run_replay(trace, inv, budget: int, ctx: int, opts, per_expert: bool, bw):
    """Replay the trace against the planner at several budgets (profile from its first half);
    (the report, the plan made at `budget`)."""
    from hybrid_gguf.planning.budget import expert_share_budget
    from hybrid_gguf.planning.planner import make_plan
    from hybrid_gguf.routing.profile import RoutingProfile
    from hybrid_gguf.routing.replay import replay
    from hybrid_gguf.sizes import format_size

    split = trace.n_tokens // 2
    counts, tokens = trace.counts(0, split)
    prof = RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, max(inv.n_expert_used, 1),
                          counts, counts * 0, tokens, tokens * 0, sessions=1)
    moe = [l for l in inv.layers if l.is_moe]
    per_expert_bytes = max((l.per_expert_bytes for l in moe), default=1)
    budgets = sorted({expert_share_budget(inv, f, opts) for f in (0.05, 0.1, 0.25, 0.5, 0.75)} | {budget})
    caps, labels, sets = [], [], []
    plan_here = None
    for b in budgets:
        p = make_plan(inv, b, ctx, prof, per_expert=per_expert, bandwidth=bw, memory=opts, promote_fraction=2.0)
        gpu = p.gpu_experts(inv) if p.n_gpu_layers != 0 else {}
        if b == budget:
            plan_here = p
        caps.append(sum(len(v) for v in gpu.values()))
        labels.append(format_size(b) + (" (this plan)" if b == budget else ""))
        sets.append(gpu)
    report = replay(trace, caps, 0.5, labels, sets, budget_bytes=budgets, expert_bytes=per_expert_bytes,
                    n_used=[l.n_expert_used for l in inv.layers])
    return report, plan_here


# -- output ----------------------------------------------------------------------------------


def _ranges(xs) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, xs = [], sorted(xs)
    for x in xs:
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_plan(console, plan, inv, explain: bool, here=None) -> None:
    from hybrid_gguf.tables import new_table

    from hybrid_gguf.sizes import format_size

    pr = plan.predicted
    n_hot = sum(len(v) for v in plan.hot.values())
    whole = plan.whole_layers(inv) if plan.n_gpu_layers != 0 else []
    console.print(f"[bold]{plan.model_name}[/] ({plan.arch}, {plan.n_layer} layers, {plan.n_expert} experts) "
                  f"for {format_size(plan.budget_bytes)} of GPU memory, context {plan.n_ctx}")
    console.print(f"backend: {plan.backend}; {n_hot} hot experts in {len(plan.hot)} layers; "
                  f"{len(whole)} layers' experts whole on the GPU")
    if len(plan.devices) > 1 and plan.n_gpu_layers != 0:
        for d in plan.per_device(inv):
            console.print(f"  {d['name']}: {format_size(d['bytes'])} of {format_size(d['budget_bytes'])}; "
                          f"layers {_ranges(d['layers'])}; {d['hot_experts']} hot experts, "
                          f"{len(d['whole_layers'])} layers' experts whole", highlight=False)
    hit = _pct(pr.hit_rate) if inv.is_moe else "n/a (no experts)"
    where = "predicted" if here is None else "predicted on a GPU (none here; default GPU rates)"
    console.print(f"{where}: hit rate {hit}, decode {pr.decode_tokens_per_s:.1f} tokens/s, "
                  f"prefill {pr.prefill_tokens_per_s:.0f} tokens/s, GPU {format_size(pr.gpu_bytes)}")
    if here is not None:
        console.print(f"on this machine (CPU only): decode {here.decode_tokens_per_s:.1f} tokens/s, "
                      f"prefill {here.prefill_tokens_per_s:.0f} tokens/s")
    for n in plan.notes:
        console.print(f"  note: {n}")
    if not explain:
        return
    # parts down, devices across: fits 80 columns for any number of parts
    mem = new_table(console, "memory by device")
    mem.add_column("part", no_wrap=True)
    for dev in pr.memory:
        mem.add_column(dev, justify="right", no_wrap=True)
    for key, label in (("weight_bytes", "weights"), ("hot_pack", "hot packs"), ("kv", "KV cache"),
                       ("compute", "compute"), ("offload_scratch", "offload scratch"), ("margin", "margin"),
                       ("total", "total")):
        mem.add_row(label, *(format_size(m.get(key, 0)) for m in pr.memory.values()))
    console.print(mem)
    bw = pr.bandwidth
    if bw is not None:
        console.print("bandwidth: " + ", ".join(
            f"{k} {getattr(bw, k):.3g}{'' if k in bw.measured else ' (default)'}"
            for k in ("cpu_bytes_per_s", "gpu_bytes_per_s", "gpu_layer_s", "gpu_step_s", "pcie_bytes_per_s", "handoff_s",
                      "handoff_idle_s")))
    for key, label in (("decode_ms", "decode ms/token"), ("prefill_ms", "prefill ms/ubatch")):
        parts = pr.speed_terms.get(key) or {}
        if parts:
            console.print(f"{label}: " + ", ".join(f"{k} {v:g}" for k, v in parts.items()))
    if plan.n_gpu_layers == 0 or not inv.is_moe:
        return
    gpu = plan.gpu_experts(inv)
    t = new_table(console, "experts per layer")
    for col in ("layer", "on GPU", "how", "GPU bytes"):
        t.add_column(col, justify="right", no_wrap=True)
    for layer in inv.layers:
        if not layer.is_moe:
            continue
        es = gpu.get(layer.index, [])
        how = "whole" if layer.index in whole else ("hot pack" if es else "CPU")
        t.add_row(str(layer.index), f"{len(es)}/{layer.n_expert}", how,
                  format_size(len(es) * layer.per_expert_bytes))
    console.print(t)


def print_cache_replay(console, cache: dict) -> None:
    if not cache:
        console.print("  in-session cache: this plan has no hot packs to adapt")
        return
    from hybrid_gguf.tables import new_table

    t = new_table(console, "the replay's plan at this budget as an in-session cache (run --cache), same tokens")
    for col in ("cache", "hit rate", "uploads/token", "MiB/token", "tg pred"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, r in cache.items():
        pred = r.get("predicted_decode_tokens_per_s")
        t.add_row(name, _pct(r["hit_rate"]), f"{r['uploads_per_token']:.2f}", f"{r['upload_bytes_per_token'] / 2**20:.2f}",
                  "-" if pred is None else f"{pred:.1f}")
    console.print(t)


def print_replay(console, report) -> None:
    from hybrid_gguf.tables import new_table

    t = new_table(console, f"trace replay: profile {report.n_profile_tokens} tokens, evaluated on "
                           f"{report.n_eval_tokens}; * this plan's budget")
    for col in ("budget", "slots", "plan", "static", "oracle", "LRU", "LFU", "LRU ld/tok"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in report.rows:
        label = r.label.replace(" (this plan)", " *")
        t.add_row(label, str(r.capacity), "-" if r.plan is None else _pct(r.plan), _pct(r.static),
                  _pct(r.oracle), _pct(r.lru), _pct(r.lfu), f"{r.lru_loads_per_token:.2f}")
    console.print(t)
    for v in report.verdicts:
        console.print(f"  {v}")
