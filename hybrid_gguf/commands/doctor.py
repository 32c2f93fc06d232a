"""`hybrid-gguf doctor`: backend, CPU, recorder, data paths, devices, and what to fix."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from hybrid_gguf.sizes import format_size


def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    no_recorder: bool = typer.Option(False, "--no-recorder", help="skip compiling the routing recorder"),
) -> None:
    """Check this installation: backend (patched or stock, CUDA or CPU), CPU features, the
    routing recorder, data paths and sizes, free GPU memory; one line per problem with the
    command that fixes it. Exit status 1 when there is a problem."""
    from hybrid_gguf.doctor import diagnose

    report = diagnose(build_recorder=not no_recorder)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        _render(report, Console(highlight=False, soft_wrap=True))
    if report.problems:
        raise typer.Exit(1)


def _render(report, con: Console) -> None:
    b = report.backend
    con.print(f"[bold]hybrid-gguf[/] {report.hybrid_gguf}   python {report.python}")
    if not b.get("installed"):
        con.print(f"[bold]backend[/]   [red]not importable[/]: {b.get('error', '')}")
    else:
        kind = "hybrid-patched" if b.get("patched") else "stock"
        patch = f", patch API {b['patch_version']}" if b.get("patched") else ""
        archs = f", GPU archs {b['gpu_archs']}" if b.get("gpu_archs") else ""
        con.print(f"[bold]backend[/]   llama-cpp-python {b.get('version')} ({kind}{patch}), "
                  f"{b.get('kind')}{archs}")
        con.print(f"          {b.get('location')}")
    cpu = report.cpu
    con.print(f"[bold]cpu[/]       {cpu.get('model', '')}")
    con.print(f"          flags: {' '.join(cpu.get('flags', [])) or '-'}")
    feats = [k if v in ("1", "") else f"{k}={v}" for k, v in cpu.get("backend_features", {}).items()]
    if feats:
        con.print(f"          CPU backend built with: {' '.join(feats)}")
    bufts = cpu.get("extra_buffer_types", [])
    con.print(f"          extra buffer types: {', '.join(bufts) if bufts else 'none'}")
    wait = cpu.get("openmp_wait") or {}
    if wait:
        given = [f"{k}={wait[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if wait.get(k) is not None]
        who = " (set by hybrid-gguf; OMP_WAIT_POLICY=passive to let idle threads sleep at once)" \
            if wait.get("set_by_hybrid_gguf") else ""
        con.print(f"          OpenMP wait: {' '.join(given) or 'libgomp defaults'}{who}")
        cleared = wait.get("binding_cleared") or []
        if cleared:
            con.print(f"          OpenMP binding: off, {' '.join(cleared)} disarmed by hybrid-gguf "
                      "(HYBRID_GGUF_OMP_BIND=keep keeps it)")
    rec = report.recorder
    if rec:
        state = "[green]builds[/]" if rec.get("builds") else f"[red]does not build[/]: {rec.get('error')}"
        con.print(f"[bold]recorder[/]  {state}")
    table = Table("path", "location", "size", box=None, pad_edge=False, show_header=True)
    for p in report.paths:
        size = format_size(p["bytes"]) if p["exists"] else "(absent)"
        table.add_row(p["name"], p["path"], size)
    con.print(table)
    if report.devices:
        dt = Table("device", "type", "free", "total", "description", box=None, pad_edge=False)
        for d in report.devices:
            dt.add_row(d["name"], d["type"], format_size(d["free_bytes"]), format_size(d["total_bytes"]),
                       d["description"])
        con.print(dt)
        if not any(d["type"] in ("gpu", "igpu") for d in report.devices):
            con.print("          no GPU visible to llama.cpp: experts run on the CPU")
    if report.problems:
        con.print(f"[bold red]{len(report.problems)} problem(s)[/]")
        for p in report.problems:
            con.print(f"  [red]x[/] {p.problem}\n    fix: [bold]{p.fix}[/]")
    else:
        con.print("[green]no problems found[/]")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
