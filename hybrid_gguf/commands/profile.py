"""`hybrid-gguf profile MODEL`: run a workload, record expert routing, store the profile.

numpy and llama_cpp are imported lazily: the CLI imports every command module at start,
and numpy before libllama made model loading crash on one machine (docs/backend-patch.md).

A model without experts prints "nothing to record" and exits 0 (it is not an error to
ask; there is simply no routing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from hybrid_gguf.errors import HybridError
from hybrid_gguf.atomic import save_figure
from hybrid_gguf.commands.common import (check_output_file, ctx_option, model_argument, model_option, resolve,
                                         threads_option)


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during a profiling run; carries the routing recorded until then."""

    def __init__(self, snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


# more characters than any token of a model's vocabulary covers on average
MAX_CHARS_PER_TOKEN = 32


def run_prompt(hm, text: str, n_predict: int, temp: float = 0.0) -> tuple[int, int]:
    """Prefill `text` (cut to leave room), then decode up to n_predict tokens (greedy at
    temp 0); (prompt tokens, decode steps)."""
    from hybrid_gguf.limits import context_size

    n_ctx = context_size(hm.llm)  # what llama-cpp-python allocated, not llama.cpp's padded size
    room = n_ctx - n_predict - 1
    if room < 1:
        raise HybridError(f"--ctx {n_ctx} leaves no room for a prompt with -n {n_predict}")
    # tokenizing grows with the square of a line's length in llama.cpp (a 300 KB line of one
    # letter: 9 s), and only `room` tokens are kept: text far beyond them is never tokenized
    tokens = hm.tokenize(text[:room * MAX_CHARS_PER_TOKEN])[:room]
    # a generation evaluates every token it returns but the last: one more token is asked
    # for, so n_predict decode steps are recorded
    res = hm.generate(tokens, max_tokens=n_predict + 1, temperature=temp)
    return len(tokens), min(len(res.tokens), n_predict)


def profile_model(inv, workload, n_predict: int, n_ctx: int,
                  n_threads: Optional[int] = None,
                  on_prompt: Optional[Callable[[int, int, int], None]] = None,
                  temp: float = 0.0, seed: int = 0, cpu_only: bool = False,
                  on_load: Optional[Callable[[str], None]] = None):
    """Run the workload in a profiling session of the model (as many whole layers on a GPU
    as its free memory holds: routing does not depend on placement, the GPU makes profiling
    fast); returns the RoutingSnapshot. Ctrl-C raises ProfileInterrupted with the snapshot
    of what was recorded so far."""
    from hybrid_gguf.model import HybridModel

    hm = HybridModel(inv.path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, auto_plan=False,
                     cpu_only=cpu_only, profiling=True, inventory=inv)
    if hm.recorder is None:
        hm.close()
        raise HybridError(hm.recorder_notice or "routing recording is off")
    if on_load:
        on_load(hm.placement.description)
    try:
        for prompt in workload.prompts:
            n_in, n_out = run_prompt(hm, prompt.text, n_predict, temp)
            if on_prompt:
                on_prompt(1, n_in, n_out)
        return hm.recorder.snapshot(trace=True)
    except KeyboardInterrupt:
        raise ProfileInterrupted(hm.recorder.snapshot(trace=False)) from None
    finally:
        hm.close()


def snapshot_ids(inv, snap):
    """The snapshot's trace as [n_tokens, n_layer, k] expert ids (-1: not routed), or None."""
    from hybrid_gguf.routing.replay import trace_from_routing

    if snap.trace is None or len(snap.trace.token) == 0:
        return None
    return trace_from_routing(snap.trace, inv.n_layer, inv.n_expert).ids


# -- output -------------------------------------------------------------------


def profile_json(inv, snap, summary: dict, label: str, n_prompts: int,
                 stored: Optional[Path], stored_sessions: Optional[int], stats: dict) -> dict:
    return {
        "model": str(inv.path),
        "fingerprint": inv.fingerprint,
        "arch": inv.arch,
        "n_layer": inv.n_layer,
        "n_expert": inv.n_expert,
        "n_expert_used": inv.n_expert_used,
        "label": label,
        "prompts": n_prompts,
        "counts": snap.counts.tolist(),
        "counts_prompt": snap.counts_prompt.tolist(),
        "counts_decode": snap.counts_decode.tolist(),
        "tokens_per_layer": snap.tokens_per_layer.tolist(),
        "tokens_prompt": snap.tokens_prompt.tolist(),
        "tokens_decode": snap.tokens_decode.tolist(),
        "summaries": summary,
        "routing_stats": stats,
        "store": str(stored) if stored else None,
        "store_sessions": stored_sessions,
    }


def print_summary(console, inv, summary: dict, top_k: int = 4) -> None:
    from hybrid_gguf.tables import new_table

    slots = summary["slots"]
    console.print(f"routing: {Path(inv.path).name} ({inv.n_layer} layers, {inv.n_expert} experts, "
                  f"top-{inv.n_expert_used})", soft_wrap=True, highlight=False)
    table = new_table(console)
    # the numbers keep their width; only the top-experts list is cut short at 80 columns
    for col in ("layer", "tokens", "entropy", "n50", "n90", *(f"hit@{s}" for s in slots)):
        table.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 6 if "@" in col else 0))
    table.add_column("top experts: share", no_wrap=True, overflow="ellipsis")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for row in summary["layers"]:
        ent = "-" if row["entropy"] is None else f"{row['entropy']:.3f}"
        tops = " ".join(f"{e}:{100 * s:.0f}%" for e, s in row["top"][:top_k])
        table.add_row(str(row["layer"]), f"{row['tokens']:.0f}", ent, str(row["experts_50"]),
                      str(row["experts_90"]), *[pct(row["static_hit"][str(s)]) for s in slots],
                      tops)
    console.print(table)
    o = summary["overall"]
    hits = ", ".join(f"{s} experts/layer {pct(o['static_hit'][str(s)])}" for s in slots)
    console.print(f"best static hit rate: {hits}")


def print_routing_stats(console, stats: dict) -> None:
    """The workload's routing in one small table and one sentence."""
    from hybrid_gguf.tables import new_table

    from hybrid_gguf.routing.stats import suitability

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    table = new_table(console, "routing of this workload", show_header=True)
    for col in ("top 10%", "top 25%", "top 50%", "top-1", "adjacent"):
        table.add_column(col, justify="right", no_wrap=True)
    cov = stats["coverage"]
    table.add_row(pct(cov["0.1"]), pct(cov["0.25"]), pct(cov["0.5"]), pct(stats["top1_share"]),
                  pct(stats["adjacent_overlap"]))
    console.print(table)
    rep = stats.get("replay")
    if rep:
        console.print(f"hit rate with 25% of experts resident: static plan {pct(rep['static'])}, "
                      f"LRU {pct(rep['lru'])}, LFU {pct(rep['lfu'])}, best static (oracle) {pct(rep['oracle'])}")
    console.print("this workload " + suitability(stats))


def heatmap_path(path: Path) -> Path:
    """The file draw_heatmap writes: matplotlib adds .png to a name without a suffix."""
    return path if path.suffix else path.with_name(path.name + ".png")


def draw_heatmap(path: Path, counts, title: str) -> Path:
    """Layer × expert share heatmap, and per-layer coverage curves; returns the file written."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax1.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
    ax1.set_xlabel("expert id")
    ax1.set_ylabel("layer")
    ax1.set_title("share of the layer's selections")
    fig.colorbar(im, ax=ax1)
    ranked = np.cumsum(np.sort(share, axis=1)[:, ::-1], axis=1)
    x = np.arange(1, counts.shape[1] + 1)
    for row in ranked[total[:, 0] > 0]:
        ax2.plot(x, row, color="tab:blue", alpha=0.25, linewidth=0.8)
    if (total > 0).any():
        ax2.plot(x, ranked[total[:, 0] > 0].mean(axis=0), color="black", label="mean")
    ax2.plot(x, x / counts.shape[1], color="gray", linestyle=":", label="uniform")
    ax2.legend(loc="lower right")
    ax2.set_xlabel("experts kept per layer (most used first)")
    ax2.set_ylabel("fraction of selections covered")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("coverage")
    fig.suptitle(title)
    fig.tight_layout()
    path = heatmap_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


# -- command --------------------------------------------------------------------


def _store_interrupted(err, inv, snap, label: str, store: Optional[Path], no_store: bool,
                       decay: float) -> None:
    """Ctrl-C: merge the prompts profiled so far into the store (a second Ctrl-C skips it;
    the store's writes are atomic, so the profile stays as it was)."""
    from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

    recorded = int(snap.counts.sum())
    if no_store or recorded == 0:
        err.print("interrupted: nothing stored")
        return
    try:
        merged = ProfileStore(store).merge_session(
            RoutingProfile.from_snapshot(snap, inv.fingerprint, inv.arch, label), decay=decay)
    except KeyboardInterrupt:
        err.print("interrupted twice: nothing stored")
        return
    err.print(f"interrupted: merged the routing recorded so far ({int(snap.tokens_per_layer[0])} "
              f"tokens) into the store ({merged.sessions} sessions)")


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        model: Optional[str] = model_argument(),
        model_opt: Optional[str] = model_option(),
        prompts: Optional[Path] = typer.Option(
            None, "--prompts", help="prompts file: one per line, or .jsonl"),
        text: Optional[Path] = typer.Option(None, "--text", help="text file cut into prompts"),
        chunk_chars: int = typer.Option(2000, "--chunk-chars", help="--text chunk size"),
        n_predict: int = typer.Option(64, "-n", "--n-predict", help="tokens generated per prompt"),
        ctx: Optional[int] = ctx_option(),
        threads: Optional[int] = threads_option(),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
        out: Optional[Path] = typer.Option(None, "--out", help="write this run's profile here"),
        heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="draw a PNG heatmap"),
        trace_out: Optional[Path] = typer.Option(
            None, "--trace", help="write the per-token routing trace (.npz) that `plan --replay` reads"),
        store: Optional[Path] = typer.Option(None, "--store", help="profile store directory"),
        no_store: bool = typer.Option(False, "--no-store", help="do not merge into the store"),
        label: Optional[str] = typer.Option(None, "--label", help="workload label"),
        decay: float = typer.Option(1.0, "--decay",
                                    help="weight of the stored profile before adding this run"),
        slots: Optional[str] = typer.Option(
            None, "--slots", help="static set sizes for hit rates, e.g. 8,32"),
        temp: float = typer.Option(0.0, "--temp", help="sampling temperature of the decoded tokens (0 = greedy)"),
        seed: int = typer.Option(0, "--seed", help="sampling seed"),
        cpu_only: bool = typer.Option(False, "--cpu-only", help="keep every weight on the CPU"),
    ) -> None:
        """Record which experts a workload routes to, store it, and summarize per layer."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeElapsedColumn

        from hybrid_gguf.routing import stats as routing_stats
        from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile
        from hybrid_gguf.routing.workload import select_workload

        console = Console(stderr=as_json)
        err = Console(stderr=True)
        model = resolve(model, model_opt).path
        from hybrid_gguf.limits import check_ctx, check_threads

        if n_predict < 0:
            raise HybridError(f"-n must be >= 0, got {n_predict}")
        check_ctx(ctx, "--ctx")
        check_threads(threads, "--threads")
        if store is not None and not no_store and store.exists() and not store.is_dir():
            raise HybridError(f"--store {store} is not a directory")
        if out is not None:
            check_output_file(out, "--out", inputs=(model, prompts, text))
        if heatmap is not None:
            if heatmap.is_dir():
                raise HybridError(f"--heatmap {heatmap} is a directory; give a file name such as "
                                  f"{heatmap / 'heatmap.png'}")
            check_output_file(heatmap_path(heatmap), "--heatmap", image=True, inputs=(model, prompts, text))
        if trace_out is not None:
            trace_out = trace_out if trace_out.suffix == ".npz" else trace_out.with_name(trace_out.name + ".npz")
            check_output_file(trace_out, "--trace", inputs=(model, prompts, text))
        if not temp >= 0 or temp == float("inf"):  # NaN fails every comparison
            raise HybridError(f"--temp must be a finite number >= 0, got {temp}")
        if not 0.0 < decay <= 1.0:
            raise HybridError(f"--decay must be in (0, 1], got {decay}")
        slot_list = None
        if slots:
            try:
                slot_list = [int(s) for s in slots.split(",")]
            except ValueError:
                slot_list = []
            if not slot_list or not all(0 < n <= 65536 for n in slot_list):
                raise HybridError(f"--slots wants positive whole numbers like 8,32, got {slots!r}")
        workload = select_workload(prompts, text, chunk_chars)
        from hybrid_gguf.header.inventory import read_inventory
        from hybrid_gguf.limits import default_ctx

        inv = read_inventory(model)
        ctx = default_ctx(inv, ctx)
        if inv.n_expert <= 0 or inv.n_expert_used <= 0:
            msg = f"{model.name} has no experts ({inv.arch or 'dense'} model): nothing to record"
            if as_json:
                print(json.dumps({"model": str(model), "n_expert": 0, "message": msg}))
            else:
                console.print(msg)
            raise typer.Exit(0)
        from hybrid_gguf.llama.recorder import recorder_status

        ok, reason = recorder_status()
        if not ok:
            raise HybridError(reason)

        run_label = label or workload.label
        t0 = time.monotonic()
        tokens = [0, 0]
        try:
            with Progress(TextColumn("[bold]profiling"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[tok]}"), TimeElapsedColumn(),
                          console=err, transient=as_json) as progress:
                task = progress.add_task("prompts", total=len(workload.prompts), tok="")

                def on_prompt(n: int, n_in: int, n_out: int) -> None:
                    tokens[0] += n_in
                    tokens[1] += n_out
                    progress.update(task, advance=n,
                                    tok=f"{tokens[0]} prompt + {tokens[1]} generated tokens")

                snap = profile_model(inv, workload, n_predict, ctx, threads, on_prompt, temp, seed,
                                     cpu_only, on_load=lambda where: err.print(f"[dim]profiling with {where}[/]"))
        except ProfileInterrupted as stop:
            _store_interrupted(err, inv, stop.snapshot, run_label, store, no_store, decay)
            raise typer.Exit(130)
        elapsed = time.monotonic() - t0

        session = RoutingProfile.from_snapshot(snap, inv.fingerprint, inv.arch, run_label)
        ids = snapshot_ids(inv, snap)
        stored_path, stored_sessions = None, None
        if not no_store:
            from hybrid_gguf.routing.replay import Trace

            st = ProfileStore(store)
            merged = st.merge_session(session, decay=decay)
            stored_path, stored_sessions = st.path_for(inv.fingerprint), merged.sessions
            if ids is not None:  # the newest routing, for `plan --cache auto`
                st.save_trace(inv.fingerprint, Trace(ids, inv.n_expert))
        if out is not None:
            session.save(out)
        summary = routing_stats.summarize(snap.counts, snap.tokens_per_layer,
                                          inv.n_expert_used, slot_list)
        stats = routing_stats.workload_stats(snap.counts, ids)
        if trace_out is not None and ids is not None:
            from hybrid_gguf.routing.replay import Trace, save_trace

            save_trace(trace_out, Trace(ids, inv.n_expert))
        if heatmap is not None:
            heatmap = draw_heatmap(heatmap, snap.counts, f"{model.name}: {run_label}, "
                                               f"{tokens[0] + tokens[1]} tokens")
        if as_json:
            print(json.dumps(profile_json(inv, snap, summary, run_label,
                                          len(workload.prompts), stored_path,
                                          stored_sessions, stats)))
            return
        print_summary(console, inv, summary)
        print_routing_stats(console, stats)
        console.print(f"{len(workload.prompts)} prompts, {tokens[0]} prompt + {tokens[1]} "
                      f"generated tokens in {elapsed:.1f} s")
        if stored_path:
            console.print(f"merged into {stored_path} ({stored_sessions} sessions)", soft_wrap=True, highlight=False)
        if out is not None:
            console.print(f"wrote {out}", soft_wrap=True, highlight=False)
        if heatmap is not None:
            console.print(f"wrote {heatmap}", soft_wrap=True, highlight=False)
        if trace_out is not None and ids is not None:
            console.print(f"wrote {trace_out} (for `plan --replay`)", soft_wrap=True, highlight=False)
