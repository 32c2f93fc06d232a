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
"""

from __future__ import annotations

from typing import Optional

from hybrid_gguf.errors import HybridError
from hybrid_gguf.sizes import format_size

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
