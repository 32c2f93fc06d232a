"""The placements `hybrid-gguf bench` times, made by the planner as `plan` makes them: the
per-expert plan `plan` writes at the bench's budget and profile, the best whole-layer plan
at the same VRAM (`plan --whole-tensor`), all routed experts on the CPU, and everything on
the GPU where that fits. Also the budgets of `--expert-share` sweeps, turned into total
VRAM once here. runner.py loads and times what these return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import Inventory, read_inventory
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.planning.placement import CacheOptions, cpu_moe


@dataclass
class Config:
    name: str
    placement: object            # TensorPlacement or None (everything on the GPU)
    hot: dict = field(default_factory=dict)          # hot packs llama.cpp builds: layer -> experts
    gpu_experts: dict = field(default_factory=dict)  # layer -> experts in GPU memory (packs + whole layers)
    n_gpu_layers: int = -1
    plan: object = None          # the planner's Plan this placement is, if any
    cold_on_gpu: bool = False    # the packs' GPU reads the cold experts from pinned host memory
    cache: object = None         # placement.CacheOptions of an in-session cache over the packs
    worker: bool = False         # decode hands the cold experts to a CPU worker (plan handoff=worker)
    gpu_cold: dict = field(default_factory=dict)  # cold=both: layer -> cold experts its GPU reads in place
    # environment variables set while this row's model loads (the patch reads them when it
    # allocates buffers), restored afterwards
    load_env: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, name: str, plan, inv: Inventory) -> "Config":
        on_gpu = plan.n_gpu_layers != 0
        hot = {int(l): list(v) for l, v in plan.hot.items() if v}
        return cls(name, plan.placement(), hot, plan.gpu_experts(inv) if on_gpu else {}, plan.n_gpu_layers, plan,
                   bool(hot) and on_gpu and plan.cold_on_gpu,
                   worker=bool(hot) and on_gpu and plan.worker and not plan.cold_on_gpu)

    def gpu_expert_bytes(self, inv: Inventory) -> int:
        return sum(inv.layers[l].per_expert_bytes * len(es) for l, es in self.gpu_experts.items())

    def plan_detail(self, inv: Inventory) -> Optional[dict]:
        """What the report says about the plan: its hot set, rules and predictions."""
        if self.plan is None:
            if not self.hot:
                return None
            return {"backend": "per-expert", "n_gpu_layers": self.n_gpu_layers, "cold": "cpu",
                    "handoff": "worker" if self.worker else "scheduler",
                    "hot": {str(l): list(v) for l, v in sorted(self.hot.items())}, "whole_layers": [],
                    "rules": [{"pattern": r.pattern, "device": r.device} for r in self.placement.rules]}
        pl = self.plan
        both = {"gpu_cold": {str(l): list(v) for l, v in sorted(self.gpu_cold.items())}} if self.gpu_cold else {}
        if self.load_env:
            both["load_env"] = dict(self.load_env)
        if self.cache is not None and self.cache.active:  # the in-session cache the row runs
            both["cache"] = {"policy": self.cache.policy, "quota": int(self.cache.quota),
                             "pinned": float(self.cache.pinned), "background": bool(self.cache.background)}
        return {**both, "backend": pl.backend, "budget_bytes": int(pl.budget_bytes), "n_gpu_layers": pl.n_gpu_layers,
                "hot_device": pl.hot_device, "cold": "gpu" if self.cold_on_gpu else "both" if self.gpu_cold else "cpu",
                "handoff": "worker" if self.worker else "scheduler", "hot": {str(l): list(v) for l, v in sorted(self.hot.items())},
                "whole_layers": pl.whole_layers(inv) if pl.n_gpu_layers != 0 else [],
                "rules": [{"pattern": r.pattern, "device": r.device} for r in pl.rules],
                "predicted_hit_rate": pl.predicted.hit_rate,
                "predicted_decode_tokens_per_s": pl.predicted.decode_tokens_per_s,
                "predicted_gpu_bytes": pl.predicted.gpu_bytes, "notes": list(pl.notes)}


def unpromoted(chosen: Config, inv: Inventory) -> Config:
    """Every layer the planner's per-expert plan touches (packed or placed whole) as a hot pack
    of all its experts (bench only: a plan never does that): every such layer is split with
    nothing cold, which is what the split's own GPU kernels cost. The packs take all of each
    layer's experts even where the plan had left some cold (the H200's plan at a budget of
    every expert's bytes kept one layer's pack at 7 of 128, whose cold work then ran every
    token in this row and in the idle worker's)."""
    layers = set(chosen.hot) | set(chosen.plan.whole_layers(inv))
    hot = {l: list(range(inv.layers[l].n_expert)) for l in sorted(layers)}
    return Config(UNPROMOTED_CONFIG, cpu_moe(), hot, dict(hot), chosen.plan.n_gpu_layers)


def idle_worker(packed: Config, profile, every: int = 1) -> Config:
    """`per-expert-idle-worker`: the unpromoted packs less each layer's least selected expert
    (by the profile), which stays on the CPU behind the CPU worker's hand-off. Every layer then
    posts and collects each token, and almost every hand-off is idle: beside
    `per-expert-unpromoted`, what an idle hand-off costs (issue 20 asks at most 10 us a layer).
    `every=2` (`per-expert-idle-worker-half`) does that to every second packed layer only and
    keeps the rest whole packs, which post nothing: two rows whose hand-off counts differ by
    half part a per-layer cost from a per-token one."""
    import numpy as np

    counts = profile.counts_decode if profile.counts_decode.sum() > 0 else profile.counts
    hot = {}
    for i, (l, experts) in enumerate(sorted(packed.hot.items())):
        row = np.asarray(counts[int(l)], dtype=float)
        if len(experts) < 2:
            continue  # a split needs a hot expert beside the cold one
        if i % every:
            hot[l] = list(experts)
            continue
        rarest = min(experts, key=lambda e: (row[e], -e))
        hot[l] = [e for e in experts if e != rarest]
    if not any(len(v) < len(packed.hot[l]) for l, v in hot.items()):
        hot = {}  # nothing would be handed off
    cfg = Config(IDLE_WORKER_CONFIG if every == 1 else IDLE_WORKER_HALF_CONFIG, cpu_moe(), hot, dict(hot),
                 packed.n_gpu_layers)
    cfg.worker = True
    return cfg


def both_readers(name: str, plan, inv: Inventory, profile) -> Config:
    """`per-expert-both[-SHARE]`: the plan with its cold experts on the CPU worker, except a share
    of each split layer's (by the profile's selections) that its GPU reads in place, cold=both
    (patch version 10). SHARE defaults to what the stored calibration's two rates balance."""
    from hybrid_gguf.planning.calibration import Bandwidth, load_calibration
    from hybrid_gguf.planning.cold_split import gpu_read_share, split_cold

    tail = name[len(BOTH_CONFIG):].lstrip("-")
    if tail:
        try:
            share = float(tail)
        except ValueError:
            raise HybridError(f"{name!r}: the GPU's share after {BOTH_CONFIG}- must be a number, e.g. "
                              f"{BOTH_CONFIG}-0.3") from None
    else:
        bw = load_calibration() or Bandwidth()
        share = gpu_read_share(bw.host_read_bytes_per_s, bw.cpu_bytes_per_s)
    cfg = Config.from_plan(name, plan, inv)
    cfg.worker = True
    counts = profile.counts_decode if profile.counts_decode.sum() > 0 else profile.counts
    cfg.gpu_cold = split_cold(cfg.hot, counts, share)
    return cfg


def plan_configs(model_path: Path, inv: Inventory, profile, devices: list, n_ctx: int, n_ubatch: int,
                 wanted: Optional[Sequence[str]] = None, gpu_present: bool = False,
                 flash_attn: bool = False, profile_trace=None) -> list[Config]:
    """The placements to time, made by the planner as `plan` makes them (autoplan.plan_model,
    same inputs): per-expert = the plan at `devices`' budget with `profile`, whole-layer =
    the planner with per-expert placement off at the same budget, all-gpu = the plan at all
    the VRAM the budget rule allows, when it holds every expert. `profile_trace` (a
    replay.Trace of the routing the profile saw): what `plan --cache auto` replays for the
    per-expert-cache-auto rows."""
    from hybrid_gguf.autoplan import cold_read_possible, detect_devices, plan_model

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    def make(devs, per_expert, cold=None, handoff=None):
        return plan_model(model_path, None, n_ctx, profile=profile, devices=devs, per_expert=per_expert,
                          n_ubatch=n_ubatch, flash_attn=flash_attn, inventory=inv, cold=cold, handoff=handoff).plan

    configs = [Config("cpu-experts", cpu_moe())] if want("cpu-experts") else []
    if want("whole-layer"):
        configs.append(Config.from_plan("whole-layer", make(devices, False), inv))
    alternatives = ("per-expert-cold-cpu", "per-expert-cold-gpu", WORKER_CONFIG, SCHEDULER_CONFIG, UNPROMOTED_CONFIG,
                    IDLE_WORKER_CONFIG, *WORKER_VARIANTS)
    # the plan's packs as an in-session cache: only when asked for by name (--configs)
    caches = [name for name in wanted or () if name.startswith(CACHE_PREFIX)]
    boths = [name for name in wanted or () if name == BOTH_CONFIG or name.startswith(BOTH_CONFIG + "-")]
    for name in caches:
        if not is_auto_cache(name):
            cache_config(name)  # a malformed name fails before anything loads
    if (want("per-expert") or any(want(a) for a in alternatives) or caches or boths) and \
            hybrid_backend.capability().per_expert:
        chosen = Config.from_plan("per-expert", make(devices, None), inv)
        if want("per-expert"):
            configs.append(chosen)
        # the same budget with the other choice of who computes the cold experts, where this
        # machine can do both: what the planner's choice is worth
        other = "cpu" if chosen.cold_on_gpu else "gpu"
        if chosen.hot and gpu_present and cold_read_possible(devices) and want(f"per-expert-cold-{other}"):
            configs.append(Config.from_plan(f"per-expert-cold-{other}", make(devices, None, other), inv))
        version = hybrid_backend.capability().version
        # the plan with its cold experts on the CPU, handed to the CPU worker: planned once for
        # the worker row and the cold=both rows, which all start from it
        wants_worker = WORKER_CONFIG in (wanted or ()) and version >= 6
        variants = [name for name, (_, since) in WORKER_VARIANTS.items() if name in (wanted or ()) and version >= since]
        worker_plan = make(devices, None, "cpu", "worker") if chosen.hot and (wants_worker or variants or boths) \
            else None
        if worker_plan is not None and wants_worker:
            worker = Config.from_plan(WORKER_CONFIG, worker_plan, inv)
            worker.worker = True
            configs.append(worker)
        for name in variants if worker_plan is not None else ():
            # the worker row loaded with one of the patch's variables set
            variant = Config.from_plan(name, worker_plan, inv)
            variant.worker = True
            variant.load_env = {WORKER_VARIANTS[name][0]: "1"}
            configs.append(variant)
        for name in boths:
            if worker_plan is not None and version >= 10:
                configs.append(both_readers(name, worker_plan, inv, profile))
        wants_idle = IDLE_WORKER_CONFIG in (wanted or ()) and version >= 6
        wants_half = IDLE_WORKER_HALF_CONFIG in (wanted or ()) and version >= 6
        if (UNPROMOTED_CONFIG in (wanted or ()) or wants_idle or wants_half) and chosen.plan.n_gpu_layers != 0:
            packed = unpromoted(chosen, inv)
            if packed.hot and UNPROMOTED_CONFIG in (wanted or ()):  # else nothing would be packed: all experts on the CPU
                configs.append(packed)
            for wanted_idle, every in ((wants_idle, 1), (wants_half, 2)):
                idle = idle_worker(packed, profile, every) if packed.hot and wanted_idle else None
                if idle is not None and idle.hot:
                    configs.append(idle)
        if chosen.hot and SCHEDULER_CONFIG in (wanted or ()):
            # (asked for by name) the same with the scheduler's hand-off, whatever the planner chose
            configs.append(Config.from_plan(SCHEDULER_CONFIG, make(devices, None, "cpu", "scheduler"), inv))
        for name in caches:
            if chosen.hot and hybrid_backend.capability().version >= 5:
                if is_auto_cache(name):
                    # what `plan --cache auto` would run: its policy and quota, or static
                    auto = plan_model(model_path, None, n_ctx, profile=profile, devices=devices, n_ubatch=n_ubatch,
                                      flash_attn=flash_attn, inventory=inv, cache="auto", cache_trace=profile_trace,
                                      cold="cpu" if name.endswith(WORKER_SUFFIX) else None,
                                      handoff="worker" if name.endswith(WORKER_SUFFIX) else None).plan
                    cached = Config.from_plan(name, auto, inv)
                    cached.cache = auto.cache
                else:
                    cached = Config.from_plan(name, chosen.plan, inv)
                    cached.cache = cache_config(name)
                cached.worker = name.endswith(WORKER_SUFFIX)
                if cached.worker and (cached.cold_on_gpu or hybrid_backend.capability().version < 6):
                    continue  # the worker computes cold experts on the CPU only
                configs.append(cached)
    if want("all-gpu") and gpu_present:
        every = make(detect_devices(None)[0], None)
        if every.n_gpu_layers != 0 and not every.rules and not every.hot:
            configs.append(Config.from_plan("all-gpu", every, inv))
    return configs


CACHE_PREFIX = "per-expert-cache-"
WORKER_CONFIG = "per-expert-worker"
SCHEDULER_CONFIG = "per-expert-scheduler"
UNPROMOTED_CONFIG = "per-expert-unpromoted"
IDLE_WORKER_CONFIG = "per-expert-idle-worker"
IDLE_WORKER_HALF_CONFIG = "per-expert-idle-worker-half"
BOTH_CONFIG = "per-expert-both"  # cold=both; "-0.3" gives the GPU's share of the cold selections
WORKER_SUFFIX = "-worker"
HUGEPAGES_CONFIG = "per-expert-worker-hugepages"
PREFETCH_CONFIG = "per-expert-worker-prefetch"
# the worker row loaded with one of the patch's variables set to 1: name -> (variable, patch version)
WORKER_VARIANTS = {
    # CUDA's pinned host buffers (the cold experts) on transparent huge pages; no effect without CUDA
    HUGEPAGES_CONFIG: ("LLAMA_HYBRID_HOST_HUGEPAGES", 13),
    # between posts the worker reads the experts the next split layer's previous busy post named
    # (timed on the H200: no gain, docs/backend-patch.md; kept to measure other hosts)
    PREFETCH_CONFIG: ("LLAMA_HYBRID_WORKER_PREFETCH", 17),
}


AUTO_CACHE = "auto"  # per-expert-cache-auto[-worker]: the policy `plan --cache auto` picks


def is_auto_cache(name: str) -> bool:
    rest = name[len(CACHE_PREFIX):] if name.startswith(CACHE_PREFIX) else ""
    return (rest[:-len(WORKER_SUFFIX)] if rest.endswith(WORKER_SUFFIX) else rest) == AUTO_CACHE


def cache_config(name: str) -> CacheOptions:
    """The cache of a bench row named `per-expert-cache-POLICY[-qN][-bg][-worker]`: N uploads
    per step (else CacheOptions' default), -bg for background uploads (-worker: the row also
    hands its cold experts to the CPU worker)."""
    rest = name[len(CACHE_PREFIX):] if name.startswith(CACHE_PREFIX) else ""
    rest = rest[:-len(WORKER_SUFFIX)] if rest.endswith(WORKER_SUFFIX) else rest
    background = rest.endswith("-bg")
    policy, _, quota = rest[:-3 if background else None].partition("-q")
    if not policy or (quota and not quota.isdigit()):
        raise HybridError(f"bench config {name!r}: expected {CACHE_PREFIX}POLICY[-qN][-bg][{WORKER_SUFFIX}]")
    return CacheOptions(policy=policy, quota=int(quota) if quota else CacheOptions.quota, background=background)


def bench_n_batch(n_prompt: int) -> int:
    """n_batch of the timed loads: the whole prompt goes to llama.cpp in one call."""
    return max(512, int(n_prompt))


def bench_batch(n_prompt: int, n_ubatch: Optional[int] = None) -> int:
    """n_ubatch of the timed loads, and the ubatch the plans are made for: `n_ubatch` (bench
    --ubatch) or the whole prompt (at least 512)."""
    return bench_n_batch(n_prompt) if not n_ubatch else min(int(n_ubatch), bench_n_batch(n_prompt))


def bench_memory(model_path: Path, n_ctx: int, n_prompt: int, n_ubatch: Optional[int] = None,
                 flash_attn: bool = False):
    """The MemoryOptions `plan` would use for the bench's context and batch (a dry run)."""
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.autoplan import memory_options_here

    return memory_options_here(model_path, n_ctx, n_ubatch=bench_batch(n_prompt, n_ubatch), flash_attn=flash_attn,
                               gpu_present=bool(gpu_devices()))


def share_budgets(model_path: Path, shares: Sequence[float], n_ctx: int, n_prompt: int,
                  n_ubatch: Optional[int] = None, flash_attn: bool = False) -> list[int]:
    """Total VRAM budgets that leave room for each share of the routed-expert bytes on top
    of the rest of the model (planning/budget.expert_share_budget); converted once, here."""
    from hybrid_gguf.planning.budget import expert_share_budget

    inv = read_inventory(model_path)
    memory = bench_memory(model_path, n_ctx, n_prompt, n_ubatch, flash_attn)
    return [expert_share_budget(inv, s, memory) for s in shares]
