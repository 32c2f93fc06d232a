"""The between-session loop, for `plan` and `run`: gather what the pure planner (planning/)
needs on this machine (devices, stored profile, llama.cpp's compute-buffer size, calibrated
bandwidth, the plan in use), plan, and say what changed. It sits on top of the folders, as
model.py does: it asks llama/ and bench/ for measurements that planning/ must not make.

    res = plan_model("model.gguf", 8 * 2**30, 8192)      # stored profile, cached plan
    res.plan.placement(), res.plan.hybrid_plan_text()     # what llama.cpp gets
    res.diff.summary() if res.diff else "first plan"

Plans that `run` makes itself live in <data dir>/plans/<fingerprint>.yaml (paths.py; one file
per ubatch, flash-attention and KV cache type setting, default_plan_path), so the next run with
the same settings re-plans against them (hysteresis) and reports promotions/demotions.

`session_plan` is the placement of one HybridModel session: chosen by hand (--n-cpu-moe,
--cpu-moe, --hot), a plan file, or plan_model's plan; HybridModel then loads and times it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from hybrid_gguf.errors import STOCK_NOTICE, HybridError
from hybrid_gguf.planning.memory import MemoryOptions, MIB, batch_kwargs, cache_kwargs

PathLike = Union[str, os.PathLike]


@dataclass
class AutoPlan:
    plan: object  # Plan
    diff: Optional[object]  # PlanDiff vs the previous plan, None for a first plan
    inventory: object
    profile: Optional[object]
    previous: Optional[object] = None
    notes: list = field(default_factory=list)  # also prepended to plan.notes


def plans_dir() -> Path:
    from hybrid_gguf import paths

    return paths.plans_dir()


def default_plan_path(fingerprint: str, n_ubatch: Union[int, str] = 512, flash_attn: bool = False,
                      type_k: str = "f16", type_v: str = "f16") -> Path:
    """The plan file a session's automatic plan is kept in, the previous plan of the next
    session asking for the same settings. Keyed by the model and the memory settings the
    request fixes: a plan made for another ubatch, flash attention or KV cache type had
    another compute buffer or KV cache out of its budget (so another hot set), and is never
    the previous plan of this one. The defaults (ubatch 512, no flash attention, an f16
    cache) keep the plain <fingerprint>.yaml; a cache type other than f16 adds -ctk/-ctv."""
    type_k, type_v = type_k.lower(), type_v.lower()
    key = "" if (n_ubatch, bool(flash_attn), type_k, type_v) == (512, False, "f16", "f16") else \
        f"-ub{n_ubatch}" + ("-fa" if flash_attn else "") + ("" if type_k == "f16" else f"-ctk{type_k}") + \
        ("" if type_v == "f16" else f"-ctv{type_v}")
    return plans_dir() / f"{fingerprint[:32]}{key}.yaml"


def cold_read_possible(devices: Sequence) -> bool:
    """Whether the packs' GPU here can compute the cold experts from pinned host memory:
    a CUDA device and a build with hybrid patch version 4 or later."""
    try:
        from hybrid_gguf.llama.hybrid import capability

        version = capability().version
    except Exception:
        return False
    return version >= 4 and any(str(getattr(d, "name", d)).upper().startswith("CUDA") for d in devices)


# the hybrid patch version whose CPU worker the planner may choose: version 6 built it, and
# version 8's launcher thread made it faster than the scheduler's hand-off (docs/benchmarks.md)
WORKER_PLAN_VERSION = 8


def worker_possible(devices: Sequence) -> bool:
    """Whether `auto` may give split layers' cold experts to the CPU worker here: a build with
    WORKER_PLAN_VERSION and packs on one CUDA GPU. Across cards the worker passes the split
    tests (two H200s) but has not been timed, so only `--handoff worker` asks for it there."""
    try:
        from hybrid_gguf.llama.hybrid import capability

        version = capability().version
    except Exception:
        return False
    cards = [d for d in devices if str(getattr(d, "name", d)).upper().startswith("CUDA")]
    return version >= WORKER_PLAN_VERSION and len(cards) == 1 and len(devices) == 1


def detect_devices(budget, all_gpus: bool = False) -> tuple:
    """([DeviceBudget], notes): the first GPU llama.cpp sees (every GPU with `all_gpus`), or
    a stand-in named "GPU", with the budget made usable there (planning/budget.py's rule,
    applied here once). `budget`: None, one total (split over the GPUs by free memory) or a
    list, one per GPU."""
    from hybrid_gguf.planning.budget import budget_total, device_budgets
    from hybrid_gguf.planning.plan import DeviceBudget

    try:
        from hybrid_gguf.llama.devices import gpu_devices

        gpus = gpu_devices()
    except Exception:  # llama_cpp missing or broken: plan for a hypothetical GPU
        gpus = []
    notes = []
    if not gpus:
        if isinstance(budget, list):
            raise HybridError(f"--gpu-budget lists {len(budget)} budgets but no GPU is visible here; plan for "
                              "other GPUs with --assume-devices CUDA0:20GiB,CUDA1:12GiB")
        if budget is None:
            notes.append("no GPU visible here and no budget given: everything on the CPU")
            return [DeviceBudget("GPU", 0)], notes
        notes.append("no GPU visible here: planned for a hypothetical GPU named GPU")
        return [DeviceBudget("GPU", budget)], notes
    if not all_gpus:
        gpus = gpus[:1]
        budget = budget_total(budget)
    return device_budgets(budget, [(g.name, g.free_bytes) for g in gpus])


def measured_compute_bytes(model_path: PathLike, n_ctx: int, n_ubatch: int, flash_attn: bool,
                           gpu_present: bool, notes: list) -> Optional[int]:
    """The GPU compute buffer from a llama.cpp dry run: exact on a GPU machine; on a
    CPU-only machine the CPU graph's buffer + 10% stands in for the GPU's."""
    from hybrid_gguf.llama.dry_run import measure_compute_bytes

    try:
        measured = measure_compute_bytes(model_path, n_ctx, n_ubatch, flash_attn, n_gpu_layers=-1)
    except Exception as exc:  # no llama_cpp, or it cannot read the file
        notes.append(f"compute buffer estimated analytically (dry run failed: {exc})")
        return None
    gpu = {d: n for d, n in measured.items() if d != "CPU"}
    if gpu_present and gpu:
        notes.append("compute buffer measured by a llama.cpp dry run")
        return max(gpu.values())
    if measured.get("CPU"):
        notes.append("no GPU here: compute buffer from a CPU dry run + 10%")
        return int(measured["CPU"] * 1.1)
    return None


def memory_options_here(model_path: PathLike, n_ctx: int, *, n_ubatch: int = 512, flash_attn: bool = False,
                        type_k: str = "f16", type_v: str = "f16", margin_bytes: int = 64 * MIB,
                        measure: bool = True, gpu_present: bool = True,
                        notes: Optional[list] = None) -> MemoryOptions:
    """The MemoryOptions plan_model plans with: with `measure`, the compute buffer from a
    llama.cpp dry run (measured_compute_bytes), else the analytic estimate."""
    notes = [] if notes is None else notes
    compute = measured_compute_bytes(model_path, n_ctx, n_ubatch, flash_attn, gpu_present, notes) \
        if measure else None
    return MemoryOptions(n_ctx, n_ubatch=n_ubatch, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                         compute_bytes=compute, margin_bytes=margin_bytes)


def plan_model(model_path: PathLike, gpu_budget: Union[None, int, list], n_ctx: int, *,
               profile=None, profile_path: Optional[PathLike] = None, store: Optional[PathLike] = None,
               previous=None, previous_path: Optional[PathLike] = None, out: Optional[PathLike] = None,
               devices: Optional[Sequence] = None, per_expert: Optional[bool] = None,
               measure: bool = True, calibrate: bool = True, n_ubatch: Union[int, str] = 512,
               flash_attn: bool = False, type_k: str = "f16", type_v: str = "f16",
               margin_bytes: int = 64 * MIB, hysteresis: float = 0.01, promote_from: Optional[float] = None,
               inventory=None, cold: Optional[str] = None, cache: str = "static",
               cache_quota: Optional[int] = None, handoff: Optional[str] = None, cache_trace=None) -> AutoPlan:
    """Plan `model_path` on this machine.

    profile / profile_path: the routing profile (default: the profile store's entry).
    previous / previous_path: the plan in use (default: `out` if it exists); a plan for
      another model is ignored with a note, never applied.
    gpu_budget: total GPU bytes for the model (or a list, one per GPU), made usable on the
      GPUs found here (planning/budget.py; a total is split over them by free memory); None:
      all that they can give.
    devices: [DeviceBudget], budgets taken as given: GPUs of another machine (plan
      --assume-devices) or chosen by the caller (default: every GPU here, or a stand-in).
    per_expert: None = what this llama.cpp build supports.
    out: write the plan there (YAML).
    cold: who computes the experts left in host memory ("cpu", "gpu", "auto"; None: "auto"
      where this build and a CUDA GPU can let the GPU read them in place, else "cpu").
    handoff: with cold experts on the CPU, "scheduler", "worker" or "auto" (planner.make_plan;
      None: "auto" where worker_possible, else "scheduler").
    cache: the in-session cache the plan's runs use ("static", a policy, or "auto": the
      fastest, replayed on the model's routing trace in the profile store, or on
      `cache_trace` (a replay.Trace) when given: bench's rows, whose profile is not stored).
    promote_from: layers whose hot set covers at least this share of their experts are
      promoted whole when the speed model says the saved hand-off pays (0: any layer;
      default planner.PROMOTE_FROM).
    n_ubatch: the physical batch, or "auto": each of UBATCH_CHOICES that the context holds is
      planned (its compute buffer comes out of the budget) and _best_ubatch keeps one: the
      least predicted time for the profile's mix of prompt and decoded tokens, or without one,
      the fastest prefill within UBATCH_DECODE_LOSS of the best decode (a larger ubatch spreads
      op offload's expert uploads over more tokens).
    """
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.plan import Plan
    from hybrid_gguf.planning.cache_choice import drift_note
    from hybrid_gguf.planning.planner import PROMOTE_FROM, diff_plans, make_plan
    from hybrid_gguf.bench.probe import calibrate_bandwidth
    from hybrid_gguf.planning.calibration import GPU_DECODE_FIELDS, Bandwidth
    from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

    inv = inventory if inventory is not None else read_inventory(model_path)
    notes: list = []
    if devices:
        devs, gpu_present = list(devices), True
    else:
        devs, dev_notes = detect_devices(gpu_budget, all_gpus=True)
        notes += dev_notes
        gpu_present = not any("no GPU visible" in n for n in dev_notes)
    budget = sum(d.budget_bytes for d in devs)

    if profile is None and profile_path is not None:
        profile = RoutingProfile.load(profile_path, expected_fingerprint=inv.fingerprint)
    elif profile is None and inv.is_moe:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            profile = ProfileStore(store).load(inv.fingerprint)
        notes += [str(w.message) for w in caught]

    if per_expert is None:
        try:
            from hybrid_gguf.llama.hybrid import capability

            per_expert = capability().per_expert
        except Exception:
            per_expert = False

    def options(ubatch: int, into: list):
        return memory_options_here(model_path, n_ctx, n_ubatch=ubatch, flash_attn=flash_attn, type_k=type_k,
                                   type_v=type_v, margin_bytes=margin_bytes, measure=measure,
                                   gpu_present=gpu_present, notes=into)

    ubatches = _ubatch_choices(n_ubatch, n_ctx)
    opts = options(ubatches[0], notes)
    bw = calibrate_bandwidth().for_model(inv.fingerprint) if calibrate else Bandwidth()
    guessed = [f for f in GPU_DECODE_FIELDS if f not in bw.measured]
    if calibrate and gpu_present and guessed:
        notes.append(f"predicted tokens/s rest on default figures for {', '.join(guessed)}; "
                     "`hybrid-gguf bench MODEL --expert-share 0.1,0.25,0.5` measures them on this machine")

    prev = previous
    prev_file = previous_path or (out if out is not None and Path(out).exists() else None)
    if prev is None and prev_file is not None:
        try:
            prev = Plan.load(prev_file, inv)
        except HybridError as exc:
            if previous_path is not None and "another model" not in str(exc):
                raise
            notes.append(f"not re-using {prev_file} as the previous plan: {exc}")
    if prev is not None and prev.fingerprint != inv.fingerprint:
        notes.append("the previous plan is for another model; ignored")
        prev = None

    if cold is None:
        cold = "auto" if gpu_present and cold_read_possible(devs) else "cpu"
    if handoff is None:
        handoff = "auto" if gpu_present and worker_possible(devs) else "scheduler"
    elif handoff == "worker" and len(devs) > 1:
        notes.append(f"handoff worker over {len(devs)} cards: the same function as one card (split tests on "
                     f"two H200s), not yet timed there; auto keeps the scheduler across cards")
    # the stored trace: what `cache auto` replays, and how far routing drifts (a plan note)
    if inv.is_moe and cache_trace is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache_trace = ProfileStore(store).load_trace(inv.fingerprint, inv.n_layer, inv.n_expert)
        notes += [str(w.message) for w in caught]
    def plan_with(memory):
        return make_plan(inv, budget, n_ctx, profile, per_expert=per_expert, devices=devs, bandwidth=bw,
                         previous=prev, memory=memory, hysteresis=hysteresis,
                         promote_fraction=PROMOTE_FROM if promote_from is None else promote_from, cold=cold,
                         cache=cache, cache_trace=cache_trace, cache_quota=cache_quota, handoff=handoff)

    plan = plan_with(opts)
    if len(ubatches) > 1:
        plan = _best_ubatch(plan, [plan_with(options(u, [])) for u in ubatches[1:]], notes,
                            prompt_share(profile))
    drift = drift_note(plan, inv, cache_trace)
    plan.notes = notes + plan.notes + ([drift] if drift else [])
    diff = diff_plans(prev, plan, inv, profile) if prev is not None else None
    if out is not None:
        plan.save(out)
    return AutoPlan(plan, diff, inv, profile, prev, notes)


def next_session_plan(plan, inv, profile):
    """The plan the same settings give with an updated routing profile (what the next session
    that re-plans will use), and its diff against `plan` (planner.PlanDiff); (None, None) when
    there is nothing to re-plan from. Pure: `plan`'s own budget, devices, memory options,
    calibration and cache, no llama.cpp."""
    from hybrid_gguf.planning.calibration import Bandwidth
    from hybrid_gguf.planning.planner import diff_plans, make_plan

    if plan is None or profile is None or plan.backend != "per-expert" or not plan.hot:
        return None, None
    bw = plan.predicted.bandwidth if plan.predicted.bandwidth is not None else Bandwidth()
    new = make_plan(inv, plan.budget_bytes, plan.n_ctx, profile, devices=plan.devices or None, bandwidth=bw,
                    previous=plan, memory=plan.memory, cold="gpu" if plan.cold_on_gpu else "cpu",
                    cache=plan.cache.policy, cache_quota=plan.cache.quota,
                    handoff="worker" if plan.worker else "scheduler")
    return new, diff_plans(plan, new, inv, profile)


UBATCH_CHOICES = (512, 1024, 2048, 4096)
UBATCH_DECODE_LOSS = 0.02  # decode given up for a faster prefill, at most


def _ubatch_choices(n_ubatch: Union[int, str], n_ctx: int) -> list:
    if n_ubatch != "auto":
        return [int(n_ubatch)]
    return [u for u in UBATCH_CHOICES if u <= max(n_ctx, UBATCH_CHOICES[0])]


UBATCH_MAX_DECODE_LOSS = 0.10  # decode a prompt-heavy workload may give up, at most


def prompt_share(profile) -> Optional[float]:
    """The share of prompt tokens among the tokens a routing profile saw (None without any)."""
    if profile is None:
        return None
    prompt, total = float(profile.tokens_prompt.sum()), float(profile.tokens_per_layer.sum())
    return prompt / total if total > 0 else None


def _best_ubatch(first, others: list, notes: list, share: Optional[float] = None):
    """The plan of UBATCH_CHOICES to keep. With the workload's prompt share (`share`, from
    the profile): the least predicted seconds per token of that mix, share / prefill +
    (1 - share) / decode, among plans within UBATCH_MAX_DECODE_LOSS of the best decode. The
    mix does not say how long the prompts are, and a prompt shorter than the ubatch gains
    nothing from it; but long prompts are what make a mix prompt-heavy. Without a share: the
    fastest prefill within UBATCH_DECODE_LOSS of the best decode."""
    plans = [first] + list(others)
    best_decode = max(p.predicted.decode_tokens_per_s for p in plans)
    loss = UBATCH_DECODE_LOSS if share is None else UBATCH_MAX_DECODE_LOSS
    fine = [p for p in plans if p.predicted.decode_tokens_per_s >= (1 - loss) * best_decode]
    if share is None:
        chosen = max(fine, key=lambda p: p.predicted.prefill_tokens_per_s)
        why = f"the fastest prefill within {loss:.0%} of the best decode"
    else:
        chosen = min(fine, key=lambda p: share / p.predicted.prefill_tokens_per_s
                     + (1 - share) / p.predicted.decode_tokens_per_s)
        why = (f"the least time for the profile's mix, {share:.0%} prompt tokens, within {loss:.0%} "
               f"of the best decode")
    rows = ", ".join(f"{p.memory.n_ubatch}: {p.predicted.prefill_tokens_per_s:.0f} / "
                     f"{p.predicted.decode_tokens_per_s:.1f}" for p in plans)
    notes.append(f"ubatch {chosen.memory.n_ubatch} (predicted prefill / decode tokens/s per ubatch: {rows}; {why})")
    return chosen


# --- a HybridModel session's placement -----------------------------------------------------


@dataclass
class PlacementSummary:
    mode: str                      # cpu | gpu | whole-tensor | per-expert
    description: str
    n_gpu_layers: int
    hot: dict = field(default_factory=dict)
    gpu_budget_bytes: Optional[int] = None
    notices: list = field(default_factory=list)
    buffers: dict = field(default_factory=dict)   # llama.cpp's reported buffer sizes
    hot_pack_bytes: int = 0
    hot_pack_by_device: dict = field(default_factory=dict)  # {device: bytes}, as llama.cpp logged them
    pack_device: Optional[str] = None
    predicted: dict = field(default_factory=dict)
    gpu_experts: dict = field(default_factory=dict)  # {layer: experts in GPU memory}
    # the context's batch settings as llama.cpp took them (filled in once it is loaded)
    n_ubatch: Optional[int] = None
    n_batch: Optional[int] = None
    flash_attn: Optional[bool] = None
    type_k: Optional[str] = None  # the KV cache types, as memory.CACHE_TYPES names them
    type_v: Optional[str] = None
    # who takes a split layer's cold experts in decode: "scheduler" (the graph is cut there),
    # "worker" (the CPU worker), "gpu" (the packs' GPU reads them); None: no split layers
    handoff: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "description": self.description,
            "n_gpu_layers": self.n_gpu_layers,
            "hot": {str(k): list(v) for k, v in self.hot.items()},
            "hot_experts": sum(len(v) for v in self.hot.values()),
            "gpu_budget_bytes": self.gpu_budget_bytes,
            "hot_pack_bytes": self.hot_pack_bytes,
            "hot_pack_by_device": dict(self.hot_pack_by_device),
            "pack_device": self.pack_device,
            "predicted": self.predicted,
            "gpu_experts": sum(len(v) for v in self.gpu_experts.values()),
            "buffers": self.buffers,
            "n_ubatch": self.n_ubatch,
            "n_batch": self.n_batch,
            "flash_attn": self.flash_attn,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "handoff": self.handoff,
            "notices": list(self.notices),
        }


@dataclass
class SessionPlan:
    """What one session loads (load_llama's two placement parts), the Plan it applies, if
    any, with that plan's llama.cpp settings, and the summary the session reports."""
    placement: Optional[object]  # TensorPlacement; None: llama.cpp's default (all on the GPU)
    hot: Optional[dict]          # {layer: [expert, ...]} packed on summary.pack_device
    summary: PlacementSummary
    plan: Optional[object] = None  # Plan
    llama_kwargs: dict = field(default_factory=dict)  # the plan's, n_ctx left to the caller
    cold_on_gpu: bool = False    # the plan's `cold: gpu`: the packs' GPU reads the cold experts
    cache: Optional[object] = None  # the plan's in-session cache (placement.CacheOptions), if any
    worker: bool = False         # the plan's `handoff: worker`: the CPU worker takes the split layers


def session_plan(model_path: PathLike, inv, gpus: Sequence, n_ctx: int, *,
                 gpu_budget: Union[None, int, str] = None, hot=None, plan=None,
                 pack_device: Optional[str] = None, auto_plan: bool = True,
                 n_cpu_moe: Optional[int] = None, cpu_moe: bool = False,
                 n_ubatch: Union[None, int, str] = None, flash_attn: Optional[bool] = None,
                 type_k: Optional[str] = None, type_v: Optional[str] = None) -> SessionPlan:
    """The placement of a HybridModel session (its arguments of the same names) on the GPUs
    `gpus` (llama.devices.Device; [] places as on a machine without one).

    By hand: `n_cpu_moe`/`cpu_moe` (whole layers' experts on the CPU) or `hot` (a per-expert
    hot set). Else `plan` (a Plan or a plan YAML path) is applied; else, with a GPU, the
    model is planned from its stored routing profile for `gpu_budget` (total VRAM; the budget
    rule of planning/budget.py applied here once) and the plan is kept for the next session
    (`auto_plan=False`: the planner's whole-layer plan, like --n-cpu-moe, instead).

    `n_ubatch` (a number, or "auto": plan_model's pick) and `flash_attn`: the prompt
    micro-batch and flash attention, None: not asked for (a plan's own, else 512 and off).
    The plans made here are made for them (their compute buffer comes out of the budget); a
    plan file fixes its own, and asking for others is an error; the placements that are not
    planned pass them to llama.cpp as given ("auto": 512). `type_k`/`type_v`: the KV cache
    types (memory.CACHE_TYPES, any case), None: not asked for (a plan's own, else f16), the
    same way: planned for (the cache comes out of the budget), fixed by a plan file, passed
    as given otherwise; a quantized V needs flash attention. The result's llama_kwargs always
    hold n_ubatch, n_batch, flash_attn, type_k and type_v."""
    from hybrid_gguf.limits import check_ubatch
    from hybrid_gguf.planning.budget import budget_total, parse_budget
    from hybrid_gguf.planning.memory import cache_type, check_cache_types

    check_ubatch(n_ubatch, None, "n_ubatch")
    if flash_attn is not None and not isinstance(flash_attn, bool):
        raise HybridError(f"flash_attn must be True, False or None, got {flash_attn!r}")
    type_k = None if type_k is None else cache_type(type_k, "type_k")
    type_v = None if type_v is None else cache_type(type_v, "type_v")
    if plan is None:  # a plan file fixes its own (_check_plan_batch)
        check_cache_types(type_k or "f16", type_v or "f16", bool(flash_attn))
    asked = (n_ubatch, flash_attn, type_k, type_v)
    budget = parse_budget(gpu_budget)
    if n_cpu_moe is not None or cpu_moe:
        if n_cpu_moe is not None and cpu_moe:
            raise HybridError("--n-cpu-moe and --cpu-moe both choose the placement; pass one")
        if hot or plan is not None:
            raise HybridError("--n-cpu-moe/--cpu-moe choose a whole-layer placement by hand; "
                              "drop --hot/--plan (or them)")
        if n_cpu_moe is not None and (not isinstance(n_cpu_moe, int) or n_cpu_moe < 0):
            raise HybridError(f"--n-cpu-moe must be a whole number >= 0, got {n_cpu_moe!r}")
        chosen = _manual_placement(inv, gpus, n_cpu_moe, budget_total(budget))
    else:
        chosen = _choose_placement(model_path, inv, gpus, budget, hot, plan, n_ctx, pack_device, auto_plan, asked)
    s = chosen.summary
    if "n_ubatch" not in chosen.llama_kwargs:  # a placement that is not planned: as asked
        ubatch = min(512, n_ctx) if n_ubatch in (None, "auto") else n_ubatch  # llama.cpp's default
        if n_ubatch == "auto":
            s.notices.append(f"--ubatch auto is the planner's pick and this placement is not planned: ubatch {ubatch}")
        chosen.llama_kwargs.update(batch_kwargs(ubatch, bool(flash_attn)))
    if "type_k" not in chosen.llama_kwargs:  # likewise: the cache types asked for, else f16
        chosen.llama_kwargs.update(cache_kwargs(type_k or "f16", type_v or "f16"))
    # without a GPU every branch above leaves n_gpu_layers 0 and packs on the CPU: {}
    s.gpu_experts = _gpu_experts(inv, chosen.placement, chosen.hot or {}, s.n_gpu_layers, s.pack_device)
    return chosen


def _choose_placement(model_path, inv, gpus, budget, hot, plan, n_ctx, pack_device, auto_plan,
                      asked=(None, None, None, None)) -> SessionPlan:
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.planning import placement as pl
    from hybrid_gguf.planning.budget import SPLIT_NOTE, device_budgets, usable_budget
    from hybrid_gguf.sizes import format_size

    notices: list[str] = []
    if inv.n_expert == 0:
        notices.append("model has no routed experts: running it as a dense model")
    chosen = None  # how the budget was chosen when none was given
    devs = []  # [DeviceBudget], one per GPU here
    if gpus:
        # the one budget rule (planning/budget.py), applied here once for every placement below
        requested = budget
        devs, notes = device_budgets(requested, [(g.name, g.free_bytes) for g in gpus])
        budget = sum(d.budget_bytes for d in devs)
        for note in notes:
            if requested is not None:
                if not note.startswith(SPLIT_NOTE):
                    warnings.warn(note)
                notices.append(note)
        chosen = "; ".join(notes) if requested is None and notes else None
    elif budget is not None:
        notices.append("no GPU found: --gpu-budget ignored, everything runs on the CPU")

    if plan is not None:
        return _placement_from_plan(inv, plan, notices, gpus, asked)

    if hot:
        cap = hybrid_backend.capability()
        if not cap.per_expert:
            raise HybridError(STOCK_NOTICE)
        hot = {int(k): [int(e) for e in v] for k, v in hot.items()}
        hybrid_backend.validate_hot(hot, inv.n_layer, lambda l: inv.layers[l].n_expert)
        # several GPUs: each layer's pack on its layer's card where the patch can (version 5)
        default = "auto" if len(gpus) > 1 and cap.version >= 5 else "CUDA0"
        device = pack_device or (default if gpus else "CPU")
        target = next((g for g in gpus if g.name == device), None)
        if target is not None:
            # llama.cpp would only fail the load; say how far off the hot set is
            need = sum(inv.layers[l].per_expert_bytes * len(es) for l, es in hot.items())
            dense = inv.total_bytes - inv.expert_bytes_total
            free, _ = usable_budget(None, target.free_bytes)
            if need + dense > free:
                raise HybridError(
                    f"the hot set needs {format_size(need)} of {device} on top of "
                    f"{format_size(dense)} of dense weights, but {device} has {format_size(free)} "
                    "free (after a reserve): name fewer hot experts, or use --plan")
        if not gpus:
            notices.append("no GPU: hot packs go to a CPU buffer (same results, no speed-up)")
            return SessionPlan(None, hot, _summary("per-expert", f"hot experts packed on {device}", 0, hot,
                                                   budget, notices, device))
        placement = pl.cpu_moe()
        where = "each layer's GPU" if device == "auto" else device
        return SessionPlan(placement, hot, _summary("per-expert", f"hot experts packed on {where}, the rest on CPU",
                                                    placement.n_gpu_layers, hot, budget, notices, device))

    if not gpus:
        return SessionPlan(None, None, _summary("cpu", "all weights on the CPU", 0, {}, None, notices, None))
    if chosen:
        notices.append(chosen)
    if auto_plan and inv.n_expert > 0:
        return _auto_plan(model_path, inv, devs, n_ctx, notices, gpus, asked)
    return _whole_layer_placement(inv, devs, n_ctx, notices, gpus, asked)


def _whole_layer_placement(inv, devs, n_ctx, notices, gpus, asked=(None, None, None, None)) -> SessionPlan:
    """No profile used (auto_plan=False, or a dense model): the planner's plan without a
    profile, whole layers' experts on the GPU, the last layers first (like --n-cpu-moe),
    for the ubatch, flash attention and KV cache types asked for ("auto": _best_ubatch's pick)."""
    from hybrid_gguf.planning.planner import make_plan

    budget = sum(d.budget_bytes for d in devs)
    n_ubatch, flash_attn, type_k, type_v = asked
    plans = [make_plan(inv, budget, n_ctx, devices=devs,
                       memory=MemoryOptions(n_ctx, n_ubatch=u, flash_attn=bool(flash_attn), type_k=type_k or "f16",
                                            type_v=type_v or "f16"))
             for u in _ubatch_choices(512 if n_ubatch is None else n_ubatch, n_ctx)]
    plan = plans[0] if len(plans) == 1 else _best_ubatch(plans[0], plans[1:], notices)
    notices.extend(plan.notes)
    n_moe = sum(1 for l in inv.layers if l.is_moe)
    if plan.n_gpu_layers == 0:
        mode, desc = "cpu", "all weights on the CPU (the rest of the model does not fit the budget)"
    elif not plan.rules:
        mode, desc = "gpu", "everything on the GPU"
    else:
        n_host = n_moe - len(plan.whole_layers(inv))
        mode, desc = "whole-tensor", (f"experts of the first {n_host} of {n_moe} MoE layers on the CPU "
                                      "(like --n-cpu-moe)")
    llama_kwargs = {**batch_kwargs(plan.memory.n_ubatch, plan.memory.flash_attn),
                    **cache_kwargs(plan.memory.type_k, plan.memory.type_v)}
    split = plan.tensor_split_here([g.name for g in gpus])
    if split is not None and plan.n_gpu_layers != 0:
        llama_kwargs["tensor_split"] = split
    return SessionPlan(plan.placement(), None, _summary(mode, desc, plan.n_gpu_layers, {}, budget, notices, None),
                       llama_kwargs=llama_kwargs)


def _manual_placement(inv, gpus, n_cpu, budget) -> SessionPlan:
    """--n-cpu-moe N / --cpu-moe: whole layers' experts on the CPU, chosen by the user."""
    from hybrid_gguf.planning import placement as pl

    flag = "--cpu-moe" if n_cpu is None else f"--n-cpu-moe {n_cpu}"
    notices: list[str] = []
    if budget is not None:
        notices.append(f"{flag} places by hand: --gpu-budget ignored")
    if not gpus:
        notices.append(f"no GPU: {flag} has nothing to place, every weight stays on the CPU")
        return SessionPlan(None, None, _summary("cpu", "all weights on the CPU", 0, {}, None, notices, None))
    if inv.n_expert == 0:
        notices.append(f"model has no routed experts: {flag} moves nothing")
    if n_cpu is None:
        placement = pl.cpu_moe()
        desc = "all routed experts on the CPU, the rest on the GPU (--cpu-moe)"
    else:
        n_cpu = min(n_cpu, inv.n_layer)
        placement = pl.n_cpu_moe(n_cpu)
        desc = ("everything on the GPU (--n-cpu-moe 0)" if n_cpu == 0 else
                f"experts of the first {n_cpu} of {inv.n_layer} layers on the CPU (--n-cpu-moe {n_cpu})")
    mode = "gpu" if n_cpu == 0 else "whole-tensor"
    return SessionPlan(placement, None, _summary(mode, desc, placement.n_gpu_layers, {}, None, notices, None))


def _placement_from_plan(inv, plan, notices, gpus, asked=(None, None, None, None)) -> SessionPlan:
    """A plan's placement and llama.cpp settings; `asked`: the (n_ubatch, flash_attn, type_k,
    type_v) the session asked for, which must be the plan's where given (the plan's memory
    prediction, and so its hot set, rests on them)."""
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.planning.plan import Plan

    if isinstance(plan, (str, Path)):
        source = str(plan)
        if not Path(plan).exists():
            raise HybridError(f"plan file not found: {plan}")
        plan = Plan.load(plan, inv)
    else:
        source = "plan"
    plan.check_model(inv)
    _check_plan_batch(plan, source, *asked)
    hot = {int(k): list(v) for k, v in plan.hot.items() if v}
    if hot and not hybrid_backend.capability().per_expert:
        notices.append(STOCK_NOTICE + "; using the plan's whole-tensor part only")
        hot = {}
    llama_kwargs = {k: v for k, v in plan.llama_kwargs().items() if k != "n_ctx"}
    if not gpus:
        llama_kwargs["n_gpu_layers"] = 0
    elif plan.n_gpu_layers != 0:
        plan.check_devices([(g.name, g.total_bytes) for g in gpus])
        # the layers go where the plan put them, also on a machine with more GPUs than it uses
        split = plan.tensor_split_here([g.name for g in gpus])
        if split is not None:
            llama_kwargs["tensor_split"] = split
    n_gpu_layers = llama_kwargs.get("n_gpu_layers", plan.n_gpu_layers)
    mode = "per-expert" if hot else ("gpu" if not plan.rules else "whole-tensor")
    n_hot = sum(len(v) for v in hot.values())
    pack_device = None
    if hot:
        named = plan.hot_device if plan.hot_device and plan.hot_device.upper() != "GPU" else None
        # as llama.cpp spells it (the patch matches names exactly; plan --assume-devices may not)
        named = next((g.name for g in gpus if named and g.name.upper() == named.upper()), named)
        pack_device = (named or "CUDA0") if gpus else "CPU"
    if hot and not gpus:
        # the packs are built in a CPU buffer: nothing is on a GPU (same results, no speed-up)
        desc = f"{source}: {n_hot} hot experts packed on the CPU (no GPU here)"
        notices.append("no GPU: the plan's hot packs go to a CPU buffer (same results, no speed-up)")
    else:
        where = "each layer's GPU" if pack_device == "auto" else pack_device
        desc = f"{source}: {n_hot} hot experts" + (f" on {where}" if hot else "")
    desc += f", {len(plan.rules)} whole-tensor rules" + ("" if gpus else " (ignored: no GPU)")
    summary = _summary(mode, desc, n_gpu_layers, hot, plan.budget_bytes, notices + list(plan.notes), pack_device)
    summary.predicted = plan.predicted.to_dict() if hasattr(plan.predicted, "to_dict") else {}
    cold_on_gpu = bool(hot) and bool(gpus) and plan.cold_on_gpu
    if cold_on_gpu:
        summary.description += "; cold experts read by the GPU from pinned host memory"
    worker = bool(hot) and plan.worker and not cold_on_gpu
    if worker and not gpus:
        # the whole graph is then the CPU's, and the worker thread's second thread team beside
        # the decoding thread's made decode far slower on a 2-core machine (docs/backend-patch.md)
        summary.notices.append("no GPU: the plan's `handoff: worker` is not used (`--handoff worker` forces it)")
        worker = False
    if worker and hybrid_backend.capability().version < 6:
        summary.notices.append("this build has no CPU worker (hybrid patch version 6+): the plan's "
                               "`handoff: worker` falls back to the scheduler's hand-off")
        worker = False
    if worker:
        summary.description += "; split layers handed to the CPU worker"
    return SessionPlan(plan.placement(), hot, summary, plan, llama_kwargs, cold_on_gpu,
                       plan.cache if hot and plan.cache.active else None, worker)


def _check_plan_batch(plan, source: str, n_ubatch, flash_attn, type_k=None, type_v=None) -> None:
    m = plan.memory
    if (n_ubatch is None or n_ubatch == m.n_ubatch) and (flash_attn is None or bool(flash_attn) == m.flash_attn) \
            and (type_k is None or type_k.lower() == m.type_k.lower()) \
            and (type_v is None or type_v.lower() == m.type_v.lower()):
        return
    asked = " and ".join(part for part in (
        None if n_ubatch is None else f"--ubatch {n_ubatch}",
        None if flash_attn is None else f"flash attention {'on' if flash_attn else 'off'}",
        None if type_k is None else f"--cache-type-k {type_k}",
        None if type_v is None else f"--cache-type-v {type_v}") if part)
    raise HybridError(f"{source} fixes ubatch {m.n_ubatch} and flash attention {'on' if m.flash_attn else 'off'} "
                      f"(KV cache K {m.type_k.lower()}, V {m.type_v.lower()}), not {asked}: drop "
                      "--ubatch/--flash-attn/--cache-type-k/--cache-type-v, or re-plan with `hybrid-gguf plan ... "
                      "--ubatch N [--flash-attn] [-ctk TYPE] [-ctv TYPE]`")


def _auto_plan(model_path, inv, devs, n_ctx, notices, gpus, asked=(None, None, None, None)) -> SessionPlan:
    """Plan from the stored routing profile for the ubatch, flash attention and KV cache
    types asked for, keep it for the next session with the same settings, say what changed."""
    n_ubatch = 512 if asked[0] is None else asked[0]
    flash_attn = bool(asked[1])
    type_k, type_v = asked[2] or "f16", asked[3] or "f16"
    out = default_plan_path(inv.fingerprint, n_ubatch, flash_attn, type_k, type_v)
    budget = sum(d.budget_bytes for d in devs)  # already usable on each GPU
    auto = plan_model(model_path, budget, n_ctx, out=out, inventory=inv, devices=devs, n_ubatch=n_ubatch,
                      flash_attn=flash_attn, type_k=type_k, type_v=type_v)
    if auto.diff is not None:
        notices.append(auto.diff.summary())
    chosen = _placement_from_plan(inv, auto.plan, notices, gpus)
    chosen.summary.description = f"auto plan ({out.name}): " + chosen.summary.description.split(": ", 1)[-1]
    return chosen


def _summary(mode, description, n_gpu_layers, hot, budget, notices, pack_device) -> PlacementSummary:
    return PlacementSummary(mode, description, n_gpu_layers, dict(hot), budget, list(notices),
                            pack_device=pack_device)


def _gpu_experts(inv, placement, hot, n_gpu_layers: int, pack_device: Optional[str]) -> dict:
    """{layer: experts in GPU memory} of a placement on a machine with a GPU: hot packs on a
    GPU device plus layers whose expert tensors no rule keeps on the host."""
    from hybrid_gguf.planning.memory import is_host

    on_gpu_pack = pack_device is not None and not is_host(pack_device)
    out = {int(l): [int(e) for e in es] for l, es in hot.items() if es and on_gpu_pack}
    if n_gpu_layers == 0:
        return out
    for layer in inv.layers:
        if not layer.is_moe:
            continue
        targets = [None if placement is None else placement.target_for(n) for n in layer.expert_tensors]
        if all(t is None or not is_host(t) for t in targets):
            out[layer.index] = list(range(layer.n_expert))
    return out
