"""The one GPU budget rule.

A budget is the total GPU memory one model may use on a device: weights, hot packs, KV
cache, compute buffers and the planner's safety margin (planning/memory.py). Where the
device's free memory is known, at most that free memory less VRAM_RESERVE is usable: the
reserve is for what llama.cpp allocates outside the model's buffers (cuBLAS workspaces,
CUDA graphs, fragmentation). No budget given means all of that; a larger request is
lowered to it. Where free memory is not known (no GPU here, planning for another machine),
a request stands as given and no request means no GPU memory.

Each entry point (a command, HybridModel, autoplan.plan_model, the bench) applies the rule
once and passes the result on; nothing further down clamps again. Every `--gpu-budget`
means this total; a share of the routed-expert bytes (`bench --expert-share`) is converted
into it once, by expert_share_budget.

With several GPUs a budget is one total, split over them in proportion to their free memory,
or one value per device ("20GiB,12GiB", device order); device_budgets applies the rule to
each device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from hybrid_gguf.errors import HybridError
from hybrid_gguf.sizes import format_size, parse_size

# one total for every GPU, or one budget per GPU in device order
BudgetSpec = Union[None, int, list]
SPLIT_NOTE = "GPU budget split by free memory"  # how device_budgets says how it split a total

VRAM_RESERVE = 512 * 1024 * 1024


def usable_budget(requested: Optional[int], free_bytes: Optional[int],
                  device: str = "the GPU") -> tuple[int, Optional[str]]:
    """(budget bytes, a note saying how it was chosen or lowered; None when taken as given)."""
    if requested is not None and requested < 0:
        raise HybridError(f"GPU budget must not be negative, got {requested}")
    if free_bytes is None:
        return (0, None) if requested is None else (int(requested), None)
    usable = max(0, int(free_bytes) - VRAM_RESERVE)
    if requested is None:
        return usable, (f"no budget given: {format_size(usable)} ({device}'s free memory "
                        f"{format_size(free_bytes)} less a {format_size(VRAM_RESERVE)} reserve)")
    if requested > usable:
        return usable, (f"GPU budget {format_size(requested)} exceeds what {device} can give "
                        f"({format_size(free_bytes)} free less a {format_size(VRAM_RESERVE)} reserve); "
                        f"using {format_size(usable)}")
    return int(requested), None


def parse_budget(spec: Union[None, int, str, Sequence]) -> BudgetSpec:
    """A budget as given: None, one total ("8GiB", bytes) or one per device ("20GiB,12GiB",
    or a list); a list of one is that one total."""
    if spec is None or isinstance(spec, int):
        return None if spec is None else parse_size(spec)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or any(isinstance(x, str) and not x.strip() for x in items):
        raise HybridError(f"GPU budget {spec!r}: expected a size (8GiB) or one per device (20GiB,12GiB)")
    sizes = [parse_size(x.strip() if isinstance(x, str) else x) for x in items]
    return sizes[0] if len(sizes) == 1 else sizes


def budget_total(spec: BudgetSpec) -> Optional[int]:
    return sum(spec) if isinstance(spec, list) else spec


def device_budgets(requested: BudgetSpec, devices: Sequence[tuple], stated: bool = False) -> tuple:
    """([DeviceBudget], notes) for `devices` [(name, free bytes or None)], in that order.

    One device: usable_budget. Several: a list gives each its own (each made usable there);
    one total is split in proportion to their free memory (evenly where it is not known),
    no device getting more than it can give; None gives each all it can give.
    stated: the sizes are what the model may use on each device (plan --assume-devices), so
    no reserve comes off them."""
    from hybrid_gguf.planning.plan import DeviceBudget

    if not devices:
        raise HybridError("no devices to give a GPU budget to")
    names = [str(n) for n, _ in devices]
    if isinstance(requested, list) and len(requested) != len(devices):
        raise HybridError(f"--gpu-budget lists {len(requested)} budgets for {len(devices)} devices "
                          f"({', '.join(names)}); give one total or one per device")

    def usable(free) -> Optional[int]:
        if free is None:
            return None
        return int(free) if stated else max(0, int(free) - VRAM_RESERVE)

    def one(req, free, name) -> tuple:
        if not stated or free is None:
            return usable_budget(req, free, name)
        if req is None or req <= free:
            return int(free if req is None else req), None
        return int(free), (f"GPU budget {format_size(req)} exceeds {name}'s stated {format_size(free)}; "
                           f"using {format_size(free)}")

    notes: list = []
    if len(devices) == 1 or not isinstance(requested, int):
        reqs = requested if isinstance(requested, list) else [requested] * len(devices)
        out = []
        for req, (name, free) in zip(reqs, devices):
            budget, note = one(req, free, name)
            if note:
                notes.append(note)
            out.append(DeviceBudget(name, budget, free_bytes=None if free is None else int(free)))
        return out, notes

    # one total over several devices, by free memory
    room = [usable(f) for _, f in devices]
    weights = [1.0] * len(devices) if None in room or sum(room) <= 0 else [float(r) for r in room]
    shares = [int(requested * w / sum(weights)) for w in weights]
    shares[0] += int(requested) - sum(shares)  # whole bytes that add up to the total
    budgets = [s if r is None else min(s, r) for s, r in zip(shares, room)]
    if sum(budgets) < requested:
        notes.append(f"GPU budget {format_size(requested)} exceeds what {', '.join(names)} can give "
                     f"({format_size(sum(budgets))}); using that")
    out = [DeviceBudget(name, b, free_bytes=None if f is None else int(f))
           for (name, f), b in zip(devices, budgets)]
    notes.append(f"{SPLIT_NOTE}: " + ", ".join(f"{d.name} {format_size(d.budget_bytes)}"
                                                                 for d in out))
    return out, notes


# --- budgets as a share of the routed-expert bytes (bench sweeps, plan --replay) ---------------


def expert_base_bytes(inv, memory) -> int:
    """GPU bytes of the model with every routed expert in host memory (dense weights, KV
    cache, compute buffers, op-offload scratch, margin): what a budget holds before experts."""
    from hybrid_gguf.planning.placement import EXPERT_TENSOR_RE, PlacementRule, TensorPlacement
    from hybrid_gguf.planning.memory import CPU, predict_memory

    host_experts = TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, CPU),))
    return predict_memory(inv, host_experts, memory, gpus=["GPU"]).gpu_bytes


def expert_share_budget(inv, share: float, memory) -> int:
    """The total VRAM budget that leaves room for `share` of the routed-expert bytes."""
    return expert_base_bytes(inv, memory) + int(round(share * inv.expert_bytes_total))


def expert_share(inv, budget_bytes: int, memory) -> float:
    """The share of the routed-expert bytes a total VRAM budget leaves room for."""
    return (int(budget_bytes) - expert_base_bytes(inv, memory)) / max(inv.expert_bytes_total, 1)
