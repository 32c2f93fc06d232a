"""`hybrid-gguf inspect MODEL`: what the GGUF header says, and what devices there are."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from hybrid_gguf.sizes import format_size
from hybrid_gguf.tables import new_table
from hybrid_gguf.commands.common import model_argument, model_option, resolve


def _devices_payload() -> dict:
    from hybrid_gguf.llama.cpu_features import cpu_report
    from hybrid_gguf.llama.devices import cpu_ram, has_cuda, list_devices

    ram = cpu_ram()
    return {
        "cpu": cpu_report(),
        "devices": [
            {"index": d.index, "name": d.name, "description": d.description, "type": d.type,
             "free_bytes": d.free_bytes, "total_bytes": d.total_bytes}
            for d in list_devices()
        ],
        "cpu_ram": {"total_bytes": ram.total_bytes, "available_bytes": ram.available_bytes},
        "cuda": has_cuda(),
    }


def inspect_command(
    model: Optional[str] = model_argument(),
    model_opt: Optional[str] = model_option(),
    devices: bool = typer.Option(False, "--devices", help="list ggml devices and memory instead"),
    tensors: bool = typer.Option(False, "--tensors", help="also list every tensor"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show a model's MoE layout (layers, experts, bytes per expert) from its GGUF header."""
    console = Console()
    if devices:
        payload = _devices_payload()
        if as_json:
            print(json.dumps(payload, indent=2))
            return
        table = new_table(console, "ggml devices")
        for col in ("#", "name", "type", "description", "free", "total"):
            table.add_column(col, no_wrap=col != "description", justify="right" if col in ("free", "total") else "left")
        for d in payload["devices"]:
            table.add_row(str(d["index"]), d["name"], d["type"], d["description"],
                          format_size(d["free_bytes"]), format_size(d["total_bytes"]))
        console.print(table)
        ram = payload["cpu_ram"]
        console.print(f"host RAM: {format_size(ram['available_bytes'])} available of "
                      f"{format_size(ram['total_bytes'])}; CUDA: {'yes' if payload['cuda'] else 'no'}")
        cpu = payload["cpu"]
        console.print(f"CPU features: {' '.join(cpu['flags']) or 'unknown'}")
        console.print("CPU backend's extra buffer types: "
                      + (", ".join(cpu["extra_buffer_types"]) or cpu.get("error", "none")))
        return

    from hybrid_gguf.header.inventory import read_inventory
    inv = read_inventory(resolve(model, model_opt).path)
    if as_json:
        print(json.dumps(inv.to_dict(with_tensors=tensors), indent=2))
        return
    console.print(f"[bold]{inv.path}[/]", soft_wrap=True, highlight=False)  # a path is never broken
    console.print(
        f"arch [cyan]{inv.arch}[/], {inv.n_layer} layers, n_embd {inv.n_embd}, "
        f"{inv.n_expert} experts (top-{inv.n_expert_used})"
        + (f", {inv.n_expert_shared} shared" if inv.n_expert_shared else "")
        + (f", {inv.n_leading_dense} leading dense" if inv.n_leading_dense else "")
    )
    console.print(f"total {format_size(inv.total_bytes)}, routed experts {format_size(inv.expert_bytes_total)} "
                  f"({100 * inv.expert_bytes_total / max(inv.total_bytes, 1):.1f}%), "
                  f"KV cache {format_size(inv.kv_bytes_per_token)}/token, fingerprint {inv.fingerprint[:16]}")
    if inv.n_expert == 0:
        console.print("[yellow]no routed experts: a dense model, nothing to place per expert[/]")
    table = new_table(console, "layers")
    for col in ("layer", "experts", "used", "expert bytes", "per expert", "layer bytes"):
        table.add_column(col, justify="right", no_wrap=True)
    for layer in inv.layers:
        table.add_row(str(layer.index), str(layer.n_expert), str(layer.n_expert_used),
                      format_size(layer.expert_bytes), format_size(layer.per_expert_bytes),
                      format_size(layer.n_bytes))
    console.print(table)
    if tensors:
        tt = new_table(console, "tensors")
        for col in ("name", "kind", "type", "shape (ne)", "bytes"):
            # tensor names whole; the kind may be cut short at 80 columns
            tt.add_column(col, no_wrap=True, overflow="ellipsis" if col == "kind" else "fold",
                          justify="right" if col == "bytes" else "left")
        for t in inv.tensors:
            tt.add_row(t.name, t.kind, t.ggml_type, "x".join(str(x) for x in t.shape), format_size(t.n_bytes))
        console.print(tt)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
