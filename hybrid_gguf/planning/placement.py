"""A placement as plain values: what the planner chooses and llama/loader.py applies.

Whole-tensor placement is an ordered list of (regex, target) rules. llama.cpp runs
`std::regex_search(rule, tensor_name)` for every tensor and the first match wins;
unmatched tensors follow `n_gpu_layers` (all layers on the GPU here). A target is a
device name ("CPU", "CUDA0", or "GPU" for the first GPU) or a buffer-type name
("CPU_REPACK", "CUDA_Host").

Per-expert placement is a hot set ({layer: [expert, ...]}) that the hybrid patch copies
into hot packs; `plan_text` writes it in the patch's plan text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

from hybrid_gguf.errors import HybridError

# The routed-expert tensors as llama.cpp's --cpu-moe / --n-cpu-moe select them; no end
# anchor, so gpt-oss's `ffn_*_exps.bias` move with their weights.
EXPERT_TENSOR_RE = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class PlacementRule(NamedTuple):
    pattern: str
    device: str


@dataclass(frozen=True)
class TensorPlacement:
    rules: tuple[PlacementRule, ...] = ()
    description: str = "all layers on the GPU"
    # Layers llama.cpp offloads; -1 = all. Expert overrides only make sense with all.
    n_gpu_layers: int = -1
    # Set by n_cpu_moe()/cpu_moe() for reporting: layers whose experts stay on the CPU.
    n_cpu_moe: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(PlacementRule(*r) for r in self.rules))
        validate_rules(self.rules)

    def target_for(self, tensor_name: str) -> Optional[str]:
        """The rule target llama.cpp will apply to a tensor, or None (default placement)."""
        for rule in self.rules:
            if re.search(rule.pattern, tensor_name):
                return rule.device
        return None

    def to_dict(self) -> dict:
        return {
            "description": self.description,
            "n_gpu_layers": self.n_gpu_layers,
            "n_cpu_moe": self.n_cpu_moe,
            "rules": [{"pattern": r.pattern, "device": r.device} for r in self.rules],
        }


# --- constructors ---------------------------------------------------------------------


def all_on_gpu() -> TensorPlacement:
    return TensorPlacement((), "all layers on the GPU", n_cpu_moe=0)


def cpu_moe() -> TensorPlacement:
    """--cpu-moe: every routed expert tensor in host memory, everything else on the GPU."""
    return TensorPlacement(
        (PlacementRule(EXPERT_TENSOR_RE, "CPU"),), "all routed experts on the CPU", n_cpu_moe=None
    )


def n_cpu_moe(n: int) -> TensorPlacement:
    """--n-cpu-moe N: experts of layers 0..n-1 on the CPU, in one alternation pattern
    (llama.cpp rebuilds each regex per tensor, so one pattern beats n patterns)."""
    if n < 0:
        raise HybridError(f"n_cpu_moe must be >= 0, got {n}")
    if n == 0:
        return all_on_gpu()
    layers = "|".join(str(i) for i in range(n))
    pattern = rf"^blk\.({layers})\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    desc = f"experts of layers 0-{n - 1} on the CPU" if n > 1 else "experts of layer 0 on the CPU"
    return TensorPlacement((PlacementRule(pattern, "CPU"),), desc, n_cpu_moe=n)


# --- validation -------------------------------------------------------------------------

# Python-only regex syntax that std::regex (ECMAScript) rejects or reads differently.
_NON_ECMA = re.compile(r"(?<!\\)\(\?[^:=!]|\\[AZz]")


def validate_rules(rules) -> None:
    """Raise HybridError for patterns llama.cpp would fail on (it aborts the load)."""
    for rule in rules:
        pattern, device = rule
        if not isinstance(pattern, str) or not pattern:
            raise HybridError(f"placement pattern must be a non-empty string, got {pattern!r}")
        if not pattern.isascii() or "\0" in pattern:
            raise HybridError(f"placement pattern {pattern!r} must be printable ASCII")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise HybridError(f"malformed placement pattern {pattern!r}: {exc}") from None
        if _NON_ECMA.search(pattern):
            raise HybridError(
                f"placement pattern {pattern!r} uses Python-only regex syntax; "
                "llama.cpp uses ECMAScript std::regex (only (?: (?= (?! groups)"
            )
        if not isinstance(device, str) or not device.strip():
            raise HybridError(f"placement target for {pattern!r} must be a device name")


# --- the hot set as the patch reads it -------------------------------------------------------

COLD_ON_GPU = "cold=gpu"  # the plan-text item that asks for cold experts on the GPU
COLD_BOTH = "cold=both"  # cold experts read by the GPU (its listed share) and the CPU worker (patch v10)
HANDOFF_WORKER = "handoff=worker"  # the plan-text item that gives cold chains to a CPU worker
# A pack device meaning "the GPU that holds the layer" (its router's device), so a layer's
# hot chain runs on the card of the rest of that layer: the patch's `buft=auto` (version 5).
PACK_AUTO = "auto"


CACHE_POLICIES = ("static", "lru", "lfu", "seeded")


@dataclass(frozen=True)
class CacheOptions:
    """The in-session expert cache (patch version 5): the hot packs' slots adapt between
    ubatches. `policy`: static (the plan's hot set all session), lru, lfu (selection counts
    with a 128-step half-life; an upload must beat the resident it evicts) or seeded (lfu with
    `pinned` of each layer's slots, the profile's most used experts first in the plan, never
    evicted). `quota`: at most that many expert uploads per ubatch. `background`: on a GPU,
    copy on a stream of its own so that no ubatch waits, the expert serving a step later;
    else (the default) the copies are queued ahead of the next ubatch, which serves from them."""
    policy: str = "static"
    quota: int = 16
    pinned: float = 0.5
    background: bool = False

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise HybridError(f"cache policy must be one of {', '.join(CACHE_POLICIES)}, got {self.policy!r}")
        if not 0 <= int(self.quota) <= 4096:
            raise HybridError(f"cache quota must be 0..4096 uploads per ubatch, got {self.quota}")
        if not 0.0 <= float(self.pinned) <= 1.0:
            raise HybridError(f"cache pinned share must be within 0..1, got {self.pinned}")

    @property
    def active(self) -> bool:
        return self.policy != "static"

    def plan_tokens(self) -> list:
        """The patch's plan-text items (none for static)."""
        if not self.active:
            return []
        policy = "lfu" if self.policy == "seeded" else self.policy
        pinned = self.pinned if self.policy == "seeded" else 0.0
        return [f"cache={policy}", f"quota={int(self.quota)}", f"pinned={float(pinned):g}"] + (
            ["uploads=background"] if self.background else [])


def plan_text(hot: Mapping[int, Sequence[int]], buffer_type: Optional[str] = None,
              cold_on_gpu: bool = False, layer_buffer_types: Optional[Mapping[int, str]] = None,
              cache: Optional[CacheOptions] = None, worker: bool = False,
              gpu_cold: Optional[Mapping[int, Sequence[int]]] = None) -> str:
    """Serialize {layer: [expert, ...]} as the patch's plan text (slot order = list order).

    buffer_type: where the packs go (a device or buffer-type name; None or "GPU": the first
    GPU; PACK_AUTO: each layer's own GPU). layer_buffer_types: {layer: name} for layers whose
    pack goes elsewhere ("3@CUDA1:..."; patch version 5, as is PACK_AUTO).
    cold_on_gpu (patch version 4; hybrid.pending_plan checks the build): the expert tensors
    that would live in host memory go to pinned, device-mapped memory that the pack's GPU
    reads in place, so the GPU computes the cold experts too and a split layer needs no CPU
    hand-off (docs/backend-patch.md).
    cache (patch version 5): the in-session cache's items, CacheOptions.plan_tokens.
    worker (patch version 6): decode steps hand each split layer's cold experts to a CPU worker
    thread through mapped memory instead of cutting the graph there (docs/backend-patch.md).
    gpu_cold (patch version 10, {layer: [expert, ...]}): both read the cold experts ("cold=both",
    with the worker): each listed layer's GPU reads those cold experts in place, the worker
    computes the others; they live in pinned, device-mapped memory as with cold_on_gpu."""
    # "GPU" means the first GPU, which is also the patch's default
    named = buffer_type and buffer_type.upper() != "GPU"
    parts = [f"buft={buffer_type}"] if named else []
    if cold_on_gpu and gpu_cold:
        raise HybridError("cold experts read by the GPU alone (cold=gpu) or by both (GPU-read lists): pick one")
    if gpu_cold and cache is not None:
        raise HybridError("cold experts read by both the GPU and the CPU do not work with an in-session cache yet")
    if cold_on_gpu:
        parts.append(COLD_ON_GPU)
    if gpu_cold:
        parts.append(COLD_BOTH)
    if cache is not None:
        parts += cache.plan_tokens()
    if worker or gpu_cold:
        parts.append(HANDOFF_WORKER)
    own = {int(l): str(d) for l, d in (layer_buffer_types or {}).items()}
    for name in own.values():
        if not name.strip() or any(c in name for c in ";@,") or name.upper() == "GPU":
            raise HybridError(f"pack device {name!r}: give a device or buffer-type name such as CUDA1 or CPU")
    for layer in sorted(hot):
        experts = list(hot[layer])
        if experts:
            where = f"@{own[int(layer)]}" if int(layer) in own else ""
            parts.append(f"{int(layer)}{where}:{','.join(str(int(e)) for e in experts)}")
    for layer in sorted(gpu_cold or {}):
        listed = [int(e) for e in gpu_cold[layer]]
        if not listed:
            continue
        if not list(hot.get(layer, ())):
            raise HybridError(f"layer {layer} lists cold experts for its GPU but has no hot pack")
        if set(listed) & {int(e) for e in hot[layer]}:
            raise HybridError(f"layer {layer} lists hot experts among those its GPU reads cold")
        if len(set(listed)) != len(listed):
            raise HybridError(f"layer {layer} lists a GPU-read cold expert twice")
        parts.append(f"{int(layer)}g:{','.join(map(str, listed))}")
    return ";".join(parts)


def per_layer_pack_text(text: str) -> bool:
    """Whether a plan text needs patch version 5 (a pack device per layer, or `buft=auto`)."""
    items = [i.strip() for i in text.split(";")]
    return f"buft={PACK_AUTO}" in items or any("@" in i.partition(":")[0] for i in items if ":" in i)

