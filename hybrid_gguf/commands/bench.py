"""`hybrid-gguf bench MODEL --gpu-budget B`: placements side by side, measured in one process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import HybridError
from .common import ctx_option, model_argument, model_option, resolve, threads_option


def bench_command(
    model: Optional[str] = model_argument(),
    model_opt: Optional[str] = model_option(),
    gpu_budget: Optional[str] = typer.Option(None, "--gpu-budget",
                                             help="expert bytes on the GPU, e.g. 4GiB, or several: 2GiB,4GiB"),
    budget_share: Optional[str] = typer.Option(None, "--budget-share",
                                               help="budget as a share of the routed-expert bytes (default 0.25), "
                                                    "or several: 0.1,0.25,0.5 (their runs are fitted together)"),
    pp: int = typer.Option(512, "--pp", min=1, help="prompt tokens per rep"),
    tg: int = typer.Option(128, "--tg", min=1, help="decoded tokens per rep"),
    reps: int = typer.Option(5, "--reps", min=1),
    profile_tokens: int = typer.Option(4096, "--profile-tokens", min=1, help="tokens of the profiling workload"),
    profile_packages: str = typer.Option("email,json,http,logging,unittest", "--profile-workload",
                                         help="stdlib packages whose source is the profiling workload"),
    eval_packages: str = typer.Option("asyncio,xml,concurrent,importlib", "--workload",
                                      help="stdlib packages whose source is the timed (held-out) workload"),
    configs: Optional[str] = typer.Option(None, "--configs", help="comma list: cpu-experts,whole-layer,per-expert,all-gpu"),
    threads: Optional[int] = threads_option(),
    routing: Optional[str] = typer.Option(
        None, "--routing", help="routing preset replayed instead of the model's own: realistic, "
                                "gpt-oss-like, flat, optimistic (docs/routing.md)"),
    ctx: Optional[int] = ctx_option("context length (raised to fit pp + tg)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG bar chart"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (llama-bench field names where they exist)"),
    no_calibrate: bool = typer.Option(False, "--no-calibrate",
                                      help="do not store the bandwidth model fitted to this run for `plan`"),
    probe_gpu: Optional[bool] = typer.Option(None, "--probe-gpu/--no-probe-gpu",
                                             help="measure the GPU's bandwidth and fixed times on three generated "
                                                  "models first (default: once per machine, when a GPU is present; "
                                                  "it needs 4.2 GB of disk while it runs)"),
    probe_only: bool = typer.Option(False, "--probe-only", help="run the GPU probe and stop (no MODEL needed)"),
) -> None:
    """Time all-CPU experts, whole-layer (stock) and per-expert placement at one or more budgets."""
    from ..bench import run_budgets, stdlib_workloads
    from ..devices import gpu_devices
    from ..inventory import read_inventory
    from ..sizes import parse_size

    from ..limits import check_ctx, check_threads

    check_threads(threads, "--threads")
    check_ctx(ctx, "--ctx")
    if plot is not None and plot.is_dir():
        raise HybridError(f"--plot {plot} is a directory; give a file name")
    console = Console(stderr=True)
    log = (lambda s: None) if as_json else (lambda s: console.print(f"[dim]{s}[/]"))
    probe = _maybe_probe(probe_gpu or probe_only, probe_gpu is False, no_calibrate, threads, log)
    if probe_only:
        print(json.dumps(probe, indent=2) if as_json else
              f"GPU: {probe['gpu_bytes_per_s'] / 1e9:.0f} GB/s, {1e6 * probe['gpu_layer_s']:.1f} us per layer, "
              f"{1e6 * probe['gpu_step_s']:.0f} us per decode step")
        return
    path = resolve(model, model_opt).path
    inv = read_inventory(path)
    from ..limits import default_ctx

    ctx = default_ctx(inv, ctx)
    if inv.n_expert == 0:
        raise HybridError(f"{path} has no routed experts: nothing to place per expert")
    if gpu_budget is not None and budget_share is not None:
        raise HybridError("pass --gpu-budget or --budget-share, not both")
    budgets = _budgets(gpu_budget, budget_share, inv.expert_bytes_total, parse_size)
    if routing is not None:
        from ..routing_process import preset as routing_preset

        routing_preset(routing)  # an unknown name fails before any work
    pack_device = "CUDA0" if gpu_devices() else "CPU"
    if pack_device == "CPU":
        console.print("[dim]no GPU: hot packs go to a CPU buffer; numbers check the mechanics, not the speed-up[/]")
    prompts, eval_prompt = stdlib_workloads(path, pp, profile_tokens,
                                            [p for p in profile_packages.split(",") if p],
                                            [p for p in eval_packages.split(",") if p], n_gen=tg)
    outs = run_budgets(path, budgets, profile_prompts=prompts, eval_prompt=eval_prompt,
                       n_prompt=pp, n_gen=tg, reps=reps, n_ctx=max(ctx, pp + tg + 64),
                       configs=configs.split(",") if configs else None, pack_device=pack_device,
                       n_threads=threads, save_calibration=not no_calibrate, routing=routing, log=log)
    for out in outs:
        out["pack_device"] = pack_device
        if probe is not None:
            out["gpu_probe"] = probe
    if as_json:
        doc = outs[0] if len(outs) == 1 else {"model": str(path), "budgets": outs,
                                               "combined_fit": outs[0].get("combined_fit")}
        print(json.dumps(doc, indent=2, default=float))
    else:
        for out in outs:
            _print_table(out, inv, pp, tg, reps)
    if plot is not None:
        _plot(outs, plot)


def _maybe_probe(force: bool, refused: bool, no_calibrate: bool, threads: Optional[int], log) -> Optional[dict]:
    """The GPU probe's result when it runs: on request, or with a GPU whose calibration has
    no measured fixed times yet (the fit of one model cannot measure them)."""
    from ..devices import gpu_devices
    from ..gpu_probe import probe_gpu
    from ..predict import calibrate_bandwidth

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


def _budgets(gpu_budget: Optional[str], budget_share: Optional[str], expert_bytes: int, parse_size) -> list[int]:
    if gpu_budget is not None:
        return [parse_size(b.strip()) for b in gpu_budget.split(",") if b.strip()]
    shares = []
    for item in (budget_share or "0.25").split(","):
        try:
            share = float(item)
        except ValueError:
            raise HybridError(f"--budget-share wants numbers like 0.25 or 0.1,0.25, got {budget_share!r}") from None
        if not 0.0 < share <= 1.0:
            raise HybridError(f"--budget-share must be in (0, 1], got {share}")
        shares.append(share)
    return [int(s * expert_bytes) for s in shares]


def _print_table(out: dict, inv, pp: int, tg: int, reps: int) -> None:
    from ..sizes import format_size

    budget = out["budget_bytes"]
    table = Table(title=f"{Path(out['model']).name}: budget {format_size(budget)} "
                        f"({100 * budget / inv.expert_bytes_total:.0f}% of expert bytes), {out.get('routing', 'optimistic')} routing, "
                        f"pp {pp}, tg {tg}, {reps} reps")
    for col in ("placement", "hit rate", "VRAM", "pp t/s (median)", "tg t/s (median)", "tg min..max",
                "tg predicted", "tg fitted", "tg roofline"):
        table.add_column(col, justify="right")
    pred = out.get("prediction", {}).get("configs", {})
    for r in out["results"]:
        if r.get("error"):
            table.add_row(r["name"], "-", "-", "error", r["error"][:40], "", "", "", "")
            continue
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        pr = pred.get(r["name"], {})
        fitted = f"{pr['fitted_decode_ts']:.2f}" if pr else "-"
        table.add_row(r["name"], hit, format_size(r["vram_model_bytes"]), f"{r['pp_median_ts']:.1f}",
                      f"{r['tg_median_ts']:.2f}", f"{r['tg_min_ts']:.2f}..{r['tg_max_ts']:.2f}",
                      f"{pr['predicted_decode_ts']:.2f}" if pr else "-", fitted,
                      f"{pr['roofline_decode_ts']:.2f}" if pr else "-")
    Console().print(table)
    if pred:
        Console().print("tg predicted: the planner's model with this machine's stored calibration "
                        "(before this run); fitted: the model fitted to this budget's runs")
    for key in ("per_expert_vs_whole_layer_tg", "per_expert_vs_whole_layer_pp"):
        if key in out:
            Console().print(f"{key}: {out[key]:.3f}")


def _plot(outs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cpu-experts": "#999", "whole-layer": "#5b8", "per-expert": "#36c", "all-gpu": "#c63"}
    rows = [(r["name"] if len(outs) == 1 else f"{r['name']}\n{out['budget_share_of_experts']:.0%}", r)
            for out in outs for r in out["results"] if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(rows)), 3.8))
    for ax, key, title in ((axes[0], "pp_median_ts", "prompt tokens/s"), (axes[1], "tg_median_ts", "decode tokens/s")):
        vals = [r[key] for _, r in rows]
        ax.bar([label for label, _ in rows], vals, color=[colors.get(r["name"], "#666") for _, r in rows])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20, labelsize=7)
        for i, v in enumerate(vals):
            if math.isfinite(v):
                ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(Path(outs[0]["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
