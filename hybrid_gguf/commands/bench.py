"""`hybrid-gguf bench MODEL --gpu-budget B`: the plans `plan` makes at budget B (total VRAM),
and the all-CPU-experts baseline, side by side, measured in one process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from hybrid_gguf.atomic import atomic_write, save_figure
from hybrid_gguf.commands.common import (check_output_file, ctx_option, model_argument, model_option,
                                         no_repack_option, resolve, threads_option)
from hybrid_gguf.errors import HybridError
from hybrid_gguf.limits import MAX_BENCH_ROUNDS


def bench_command(
    model: Optional[str] = model_argument(),
    model_opt: Optional[str] = model_option(),
    gpu_budget: Optional[str] = typer.Option(
        None, "--gpu-budget", help="total VRAM for the model, as `plan --gpu-budget` means it, e.g. 8GiB, "
                                   "or several: 6GiB,10GiB"),
    expert_share: Optional[str] = typer.Option(
        None, "--expert-share", help="the budget as the share of the routed-expert bytes that fits next to the "
                                     "rest of the model (dense weights, KV cache, compute buffers), turned into "
                                     "total VRAM once; default 0.25, or several: 0.1,0.25,0.5 (fitted together)"),
    pp: int = typer.Option(512, "--pp", min=1, help="prompt tokens per rep"),
    tg: int = typer.Option(128, "--tg", min=1, help="decoded tokens per rep"),
    ubatch: Optional[int] = typer.Option(None, "--ubatch", help="the prompt's micro-batch, planned for and loaded "
                                                               "(default: the whole prompt, at least 512)"),
    flash_attn: bool = typer.Option(False, "-fa", "--flash-attn", help="flash attention in the plans (their "
                                                                       "compute buffers) and the timed loads"),
    reps: int = typer.Option(5, "--reps", min=1),
    reverse: bool = typer.Option(False, "--reverse", help="time the placements last to first (the table keeps "
                                                         "its order): beside a forward call, shows drift"),
    rounds: int = typer.Option(1, "--rounds", min=1, max=MAX_BENCH_ROUNDS,
                               help="time every placement this many times, each round in the opposite order, "
                                    "and pool the reps: load-to-load noise and drift fall on all alike (the "
                                    "table shows each round's median)"),
    isolate: bool = typer.Option(False, "--isolate",
                                 help="time each placement in a fresh process, as a session runs: nothing an "
                                      "earlier load left behind in the bench's process can slow it"),
    profile_tokens: int = typer.Option(4096, "--profile-tokens", min=1, help="tokens of the profiling workload"),
    profile_packages: str = typer.Option("email,json,http,logging,unittest", "--profile-workload",
                                         help="stdlib packages whose source is the profiling workload"),
    eval_packages: str = typer.Option("asyncio,xml,concurrent,importlib", "--workload",
                                      help="stdlib packages whose source is the timed (held-out) workload"),
    configs: Optional[str] = typer.Option(None, "--configs", help="comma list: cpu-experts,whole-layer,per-expert,per-expert-cold-cpu,per-expert-cold-gpu,"
                                                                  "per-expert-worker,per-expert-scheduler,per-expert-unpromoted,per-expert-idle-worker[-half],per-expert-worker-hugepages,per-expert-both[-SHARE],"
                                                                  "per-expert-cache-POLICY[-qN][-bg][-worker] (POLICY auto: what plan --cache auto picks),all-gpu"),
    threads: Optional[int] = threads_option(),
    no_repack: bool = no_repack_option(),
    routing: Optional[str] = typer.Option(
        None, "--routing", help="routing replayed instead of the model's own: a preset (realistic, "
                                "gpt-oss-like, flat, optimistic; docs/routing.md) or trace:FILE, a recorded "
                                "trace of the model's shape (first half profiles, second half is timed)"),
    ctx: Optional[int] = ctx_option("context length (raised to fit pp + tg)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG bar chart"),
    as_json: bool = typer.Option(False, "--json",
                                 help="print llama-bench's JSON: an array, one row per test and placement"),
    json_detail: Optional[Path] = typer.Option(None, "--json-detail",
                                               help="write the full report (predictions, fits, per-rep runs) as JSON here"),
    no_calibrate: bool = typer.Option(False, "--no-calibrate",
                                      help="do not store the bandwidth model fitted to this run for `plan`"),
    probe_gpu: Optional[bool] = typer.Option(None, "--probe-gpu/--no-probe-gpu",
                                             help="measure the GPU's bandwidth and fixed times on three generated "
                                                  "models first (default: once per machine, when a GPU is present; "
                                                  "it needs 4.2 GB of disk while it runs)"),
    probe_only: bool = typer.Option(False, "--probe-only", help="run the GPU probe and stop (no MODEL needed)"),
) -> None:
    """Time all-CPU experts and the planner's whole-layer and per-expert plans at one or more budgets."""
    from hybrid_gguf.bench.plans import share_budgets
    from hybrid_gguf.bench.runner import PROFILE_CHUNK, run_budgets, stdlib_workloads
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.sizes import parse_size

    from hybrid_gguf.limits import check_batch, check_ctx, check_threads

    check_threads(threads, "--threads")
    check_ctx(ctx, "--ctx")
    check_batch(ubatch, "--ubatch")
    if configs is not None and not all(c.strip() for c in configs.split(",")):
        raise HybridError(f"--configs {configs!r}: an empty name (a comma too many?)")
    for option, file in (("--plot", plot), ("--json-detail", json_detail)):
        if file is not None:
            check_output_file(file, option, image=option == "--plot")
    console = Console(stderr=True)
    # soft_wrap: one log line stays one line when stderr is a file or a pipe (rich would wrap at 80)
    log = (lambda s: None) if as_json else (lambda s: console.print(f"[dim]{s}[/]", soft_wrap=True))
    probe = _maybe_probe(probe_gpu or probe_only, probe_gpu is False, no_calibrate, threads, log)
    if probe_only:
        print(json.dumps(probe, indent=2) if as_json else
              f"GPU: {probe['gpu_bytes_per_s'] / 1e9:.0f} GB/s, {1e6 * probe['gpu_layer_s']:.1f} us per layer, "
              f"{1e6 * probe['gpu_step_s']:.0f} us per decode step")
        return
    path = resolve(model, model_opt).path
    inv = read_inventory(path)
    from hybrid_gguf.limits import default_ctx

    n_ctx = max(default_ctx(inv, ctx), pp + tg + 64)
    if inv.n_expert == 0:
        raise HybridError(f"{path} has no routed experts: nothing to place per expert")
    if gpu_budget is not None and expert_share is not None:
        raise HybridError("pass --gpu-budget or --expert-share, not both")
    if gpu_budget is not None:
        budgets = [parse_size(b.strip()) for b in gpu_budget.split(",") if b.strip()]
    else:
        budgets = share_budgets(path, _shares(expert_share), n_ctx, pp, ubatch, flash_attn)
    if routing is not None:  # an unknown name or a trace of another shape fails before any work
        from hybrid_gguf.header.inventory import read_inventory
        from hybrid_gguf.routing.process import model_trace

        model_trace(read_inventory(path), 2, override=routing)
    pack_device = "CUDA0" if gpu_devices() else "CPU"
    if pack_device == "CPU":
        console.print("[dim]no GPU: hot packs go to a CPU buffer; numbers check the mechanics, not the speed-up[/]")
    prompts, eval_prompt = stdlib_workloads(path, pp, profile_tokens,
                                            [p for p in profile_packages.split(",") if p],
                                            [p for p in eval_packages.split(",") if p], n_gen=tg,
                                            chunk=min(PROFILE_CHUNK, n_ctx))  # a model of a short context too
    with _progress(console, enabled=not as_json) as on_progress:
        outs = run_budgets(path, budgets, profile_prompts=prompts, eval_prompt=eval_prompt,
                           n_prompt=pp, n_gen=tg, reps=reps, n_ctx=n_ctx,
                           configs=configs.split(",") if configs else None, pack_device=pack_device,
                           n_threads=threads, save_calibration=not no_calibrate, routing=routing, log=log,
                           on_progress=on_progress, repack=not no_repack, n_ubatch=ubatch,
                           flash_attn=flash_attn, reverse=reverse, rounds=rounds, isolate=isolate)
    for out in outs:
        out["pack_device"] = pack_device
        if probe is not None:
            out["gpu_probe"] = probe
    if json_detail is not None:
        doc = outs[0] if len(outs) == 1 else {"model": str(path), "budgets": outs,
                                               "combined_fit": outs[0].get("combined_fit")}
        atomic_write(json_detail, (json.dumps(doc, indent=2, default=float) + "\n").encode())
    if as_json:
        from hybrid_gguf.bench.runner import llama_bench_rows

        print(json.dumps(llama_bench_rows(outs, threads), indent=2, default=float))
    else:
        for out in outs:
            _print_table(out, pp, tg, reps, rounds)
        if json_detail is not None:
            console.print(f"wrote {json_detail}", highlight=False, soft_wrap=True)
    if plot is not None:
        _plot(outs, plot, cpu_only=pack_device == "CPU")


class _progress:
    """A progress bar over placements x reps on stderr (`on_progress(more, done)` for
    bench.run_bench); a no-op when off (--json) or when stderr is not a terminal."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda more, done: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]timing"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("reps"), TimeElapsedColumn(), console=self.console, transient=True)
        self.bar.start()
        task = self.bar.add_task("reps", total=0)

        def on_progress(more: int, done: int) -> None:
            if more:
                self.bar.update(task, total=(self.bar.tasks[0].total or 0) + more)
            if done:
                self.bar.advance(task, done)

        return on_progress

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _maybe_probe(force: bool, refused: bool, no_calibrate: bool, threads: Optional[int], log) -> Optional[dict]:
    """The GPU probe's result when it runs: on request, or with a GPU whose calibration has
    no measured fixed times yet (the fit of one model cannot measure them)."""
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.bench.probe import calibrate_bandwidth, probe_gpu

    if not force and (refused or no_calibrate or not gpu_devices()
                      or {"gpu_layer_s", "gpu_step_s"} <= set(calibrate_bandwidth().measured)):
        return None
    try:
        return probe_gpu(n_threads=threads, save=not no_calibrate, log=log)
    except HybridError as exc:
        if force:
            raise
        # the bench still measures; only predictions for other models lose accuracy
        log(f"GPU probe skipped ({exc}); `bench --probe-only` retries it")
        return None


def _shares(expert_share: Optional[str]) -> list[float]:
    shares = []
    for item in (expert_share or "0.25").split(","):
        try:
            share = float(item)
        except ValueError:
            raise HybridError(f"--expert-share wants numbers like 0.25 or 0.1,0.25, got {expert_share!r}") from None
        if not 0.0 < share <= 1.0:
            raise HybridError(f"--expert-share must be in (0, 1], got {share}")
        shares.append(share)
    return shares


def _print_table(out: dict, pp: int, tg: int, reps: int, rounds: int = 1) -> None:
    from hybrid_gguf.sizes import format_size
    from hybrid_gguf.tables import fmt_rate, narrow, new_table

    console = Console()
    wide = not narrow(console, 110)
    budget = out["budget_bytes"]
    console.print(f"[bold]{Path(out['model']).name}[/]", soft_wrap=True, highlight=False)
    share = out["budget_share_of_experts"]
    table = new_table(console, f"budget {format_size(budget)} of VRAM (room for {100 * share:.0f}% of the expert "
                               f"bytes), {out.get('routing', 'optimistic')} routing, pp {pp}, tg {tg}, "
                               + (f"{rounds} rounds of {reps} reps" if rounds > 1 else f"{reps} reps")
                               + "; t/s are medians")
    cols = ["placement", "hit", "VRAM", "pp t/s", "tg t/s", "tg min..max", "tg pred"]
    if rounds > 1:
        cols.insert(6, "tg by round")
    if wide:
        cols += ["tg fitted", "tg roofline"]
    for col in cols:
        table.add_column(col, justify="left" if col == "placement" else "right", no_wrap=True)
    pred = out.get("prediction", {}).get("configs", {})
    for r in out["results"]:
        if r.get("error"):
            table.add_row(r["name"], "-", "-", "error", *[""] * (len(cols) - 4))
            continue
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        pr = pred.get(r["name"], {})
        row = [r["name"], hit, format_size(r["vram_model_bytes"]), fmt_rate(r["pp_median_ts"]),
               fmt_rate(r["tg_median_ts"]), f"{fmt_rate(r['tg_min_ts'])}..{fmt_rate(r['tg_max_ts'])}",
               fmt_rate(pr.get("predicted_decode_ts"))]
        if rounds > 1:
            row.insert(6, " ".join(fmt_rate(v) for v in r.get("tg_round_medians", [])))
        if wide:
            row += [fmt_rate(pr.get("fitted_decode_ts")), fmt_rate(pr.get("roofline_decode_ts"))]
        table.add_row(*row)
    console.print(table)
    for r in out["results"]:
        if r.get("error"):
            console.print(f"{r['name']}: {r['error']}", soft_wrap=True, highlight=False)
    if pred:
        console.print("tg pred: the planner's model with this machine's stored calibration (before this run)"
                      + ("; fitted: the model fitted to this budget's runs" if wide else
                         "; --json-detail has the fitted model and the roofline"))
    for key in ("per_expert_vs_whole_layer_tg", "per_expert_vs_whole_layer_pp"):
        if key in out:
            console.print(f"{key}: {out[key]:.3f}")


def _plot(outs: list, path: Path, cpu_only: bool = False) -> None:
    """Bars of the median tokens/s per placement, error bars from the reps' min to max; a
    caption when no GPU took part (the numbers then check the mechanics, not the speed-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cpu-experts": "#999", "whole-layer": "#5b8", "per-expert": "#36c", "all-gpu": "#c63"}
    rows = [(r["name"] if len(outs) == 1 else f"{r['name']}\n{out['budget_share_of_experts']:.0%}", r)
            for out in outs for r in out["results"] if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(rows)), 4.2 if cpu_only else 3.8))
    for ax, kind, title in ((axes[0], "pp", "prompt tokens/s"), (axes[1], "tg", "decode tokens/s")):
        vals = [r[f"{kind}_median_ts"] for _, r in rows]
        lo = [max(0.0, v - r.get(f"{kind}_min_ts", v)) for v, (_, r) in zip(vals, rows)]
        hi = [max(0.0, r.get(f"{kind}_max_ts", v) - v) for v, (_, r) in zip(vals, rows)]
        ax.bar([label for label, _ in rows], vals, color=[colors.get(r["name"], "#666") for _, r in rows],
               yerr=[lo, hi], capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333"})
        ax.set_title(title + " (median, min..max of reps)")
        ax.tick_params(axis="x", rotation=20, labelsize=7)
        for i, v in enumerate(vals):
            if math.isfinite(v):
                ax.text(i, v / 2, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
    fig.suptitle(Path(outs[0]["model"]).name)
    if cpu_only:
        fig.text(0.5, 0.01, "CPU only: no GPU, numbers check the mechanics, not the speed-up",
                 ha="center", va="bottom", fontsize=9, color="#a33")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
