"""`hybrid-gguf status` (or `ps`): per model, the plan, its hot experts per device, the
profile's sessions, the last session's hit rate and the predicted decode speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def status_command(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    store: Optional[Path] = typer.Option(None, "--store", help="profile store directory"),
    plans: Optional[Path] = typer.Option(None, "--plans", help="plans directory"),
) -> None:
    """Per model: the current plan, hot experts per device, sessions, last hit rate, predicted decode."""
    from hybrid_gguf.status import collect
    from hybrid_gguf.tables import fmt_rate, new_table

    skipped: list = []
    rows = collect(store, plans, skipped)
    err = Console(stderr=True)
    for path, why in skipped:
        # a plan's own errors start with its path
        err.print(f"skipped plan {why}" if why.startswith(str(path)) else f"skipped plan {path}: {why}",
                  highlight=False, soft_wrap=True, markup=False)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = Console()
    if not rows:
        from hybrid_gguf.paths import plans_dir, profiles_dir

        console.print(f"no models yet: no profiles in {store or profiles_dir()} and no plans in "
                      f"{plans or plans_dir()}; `hybrid-gguf run` or `profile` starts one", soft_wrap=True)
        return
    table = new_table(console)
    table.add_column("model", no_wrap=True, overflow="ellipsis")
    # the numbers keep their width; a long model name is cut short (its path is printed below)
    table.add_column("hot experts", no_wrap=True, min_width=11)
    table.add_column("sessions", justify="right", no_wrap=True, min_width=8)
    table.add_column("last hit", justify="right", no_wrap=True, min_width=8)
    table.add_column("pred. t/s", justify="right", no_wrap=True, min_width=9)
    for r in rows:
        hot = ", ".join(f"{d} {n}" for d, n in r["hot_experts"].items()) or ("-" if r["plan"] else "no plan")
        last = r["last_session"] or {}
        rate = last.get("decode_hit_rate")
        rate = last.get("prompt_hit_rate") if rate is None else rate
        name = r["name"][:-5] if r["name"].endswith(".gguf") else r["name"]
        table.add_row(name, hot, str(r["profile_sessions"]),
                      "-" if rate is None else f"{100 * rate:.1f}%",
                      "-" if r["predicted_decode_tokens_per_s"] is None else
                      fmt_rate(r["predicted_decode_tokens_per_s"]))
    console.print(table)
    console.print("last hit: share of the last session's expert selections served from GPU memory "
                  "(decode steps sampled; else the prompt's)")
    for r in rows:
        console.print(f"{r['name']}: fingerprint {r['fingerprint'][:16]}", highlight=False, soft_wrap=True)
        for key, label in (("model", "model"), ("plan", "plan"), ("profile", "profile")):
            if r[key]:
                console.print(f"  {label} {r[key]}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
    app.command("ps", hidden=True)(status_command)
