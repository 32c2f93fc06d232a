"""The between-session loop, for `plan` and `run`: gather what the pure planner (planning/)
needs on this machine (devices, stored profile, llama.cpp's compute-buffer size, calibrated
bandwidth, the plan in use), plan, and say what changed. It sits on top of the folders, as
model.py does: it asks llama/ and bench/ for measurements that planning/ must not make.

    res = plan_model("model.gguf", 8 * 2**30, 8192)      # stored profile, cached plan
    res.plan.placement(), res.plan.hybrid_plan_text()     # what llama.cpp gets
    res.diff.summary() if res.diff else "first plan"

Plans that `run` makes itself live in <data dir>/plans/<fingerprint>.yaml (paths.py), so the
next run re-plans against them (hysteresis) and reports promotions/demotions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.memory import MemoryOptions, MIB

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


def default_plan_path(fingerprint: str) -> Path:
    return plans_dir() / f"{fingerprint[:32]}.yaml"


def detect_devices(budget: Optional[int]) -> tuple:
    """([DeviceBudget], notes): the first GPU llama.cpp sees, or a stand-in named "GPU",
    with the budget made usable there (planning/budget.py's rule, applied here once)."""
    from hybrid_gguf.planning.budget import usable_budget
    from hybrid_gguf.planning.plan import DeviceBudget

    try:
        from hybrid_gguf.llama.devices import gpu_devices

        gpus = gpu_devices()
    except Exception:  # llama_cpp missing or broken: plan for a hypothetical GPU
        gpus = []
    notes = []
    if not gpus:
        if budget is None:
            notes.append("no GPU visible here and no budget given: everything on the CPU")
            return [DeviceBudget("GPU", 0)], notes
        notes.append("no GPU visible here: planned for a hypothetical GPU named GPU")
        return [DeviceBudget("GPU", budget)], notes
    g = gpus[0]
    budget, note = usable_budget(budget, g.free_bytes, g.name)
    if note:
        notes.append(note)
    return [DeviceBudget(g.name, budget, free_bytes=g.free_bytes)], notes


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


def plan_model(model_path: PathLike, gpu_budget: Optional[int], n_ctx: int, *,
               profile=None, profile_path: Optional[PathLike] = None, store: Optional[PathLike] = None,
               previous=None, previous_path: Optional[PathLike] = None, out: Optional[PathLike] = None,
               devices: Optional[Sequence] = None, per_expert: Optional[bool] = None,
               measure: bool = True, calibrate: bool = True, n_ubatch: int = 512,
               flash_attn: bool = False, type_k: str = "f16", type_v: str = "f16",
               margin_bytes: int = 64 * MIB, hysteresis: float = 0.01, promote_from: Optional[float] = None,
               inventory=None) -> AutoPlan:
    """Plan `model_path` on this machine.

    profile / profile_path: the routing profile (default: the profile store's entry).
    previous / previous_path: the plan in use (default: `out` if it exists); a plan for
      another model is ignored with a note, never applied.
    gpu_budget: total GPU bytes for the model, made usable on the GPU found here
      (planning/budget.py); None: all that the GPU can give.
    devices: [DeviceBudget] for several GPUs, budgets taken as given (default: the first
      GPU, or a stand-in).
    per_expert: None = what this llama.cpp build supports.
    out: write the plan there (YAML).
    promote_from: layers whose hot set covers at least this share of their experts are
      promoted whole when the speed model says the saved hand-off pays (0: any layer;
      default planner.PROMOTE_FROM).
    """
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.plan import Plan
    from hybrid_gguf.planning.planner import PROMOTE_FROM, diff_plans, make_plan
    from hybrid_gguf.bench.probe import calibrate_bandwidth
    from hybrid_gguf.planning.calibration import GPU_DECODE_FIELDS, Bandwidth
    from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

    inv = inventory if inventory is not None else read_inventory(model_path)
    notes: list = []
    if devices:
        devs, gpu_present = list(devices), True
    else:
        devs, dev_notes = detect_devices(gpu_budget)
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

    opts = memory_options_here(model_path, n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                               type_v=type_v, margin_bytes=margin_bytes, measure=measure,
                               gpu_present=gpu_present, notes=notes)
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

    plan = make_plan(inv, budget, n_ctx, profile, per_expert=per_expert, devices=devs, bandwidth=bw,
                     previous=prev, memory=opts, hysteresis=hysteresis,
                     promote_fraction=PROMOTE_FROM if promote_from is None else promote_from)
    plan.notes = notes + plan.notes
    diff = diff_plans(prev, plan, inv, profile) if prev is not None else None
    if out is not None:
        plan.save(out)
    return AutoPlan(plan, diff, inv, profile, prev, notes)
