"""What hybrid-gguf knows per model (`hybrid-gguf status`): the current plan and its hot
experts per device, the routing profile's sessions, the last session's hit rate, and the
plan's predicted decode speed. Read from the profile store and the plans directory only:
no model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from hybrid_gguf.errors import HybridError


def _plans(plans_dir: Path, skipped: list) -> dict:
    """{fingerprint: (path, Plan)} of readable plans, the newest file per fingerprint; the
    others are appended to `skipped` as (path, why)."""
    from hybrid_gguf.planning.plan import Plan

    out: dict = {}
    if not plans_dir.is_dir():
        return out
    files = sorted(plans_dir.glob("*.yaml"), key=lambda p: p.stat().st_mtime)
    for path in files:
        try:
            plan = Plan.load(path)
        except (HybridError, OSError) as exc:
            skipped.append((path, str(exc)))
            continue
        out[plan.fingerprint] = (path, plan)
    return out


def _hot_per_device(plan) -> dict:
    """{device: experts in its memory}: the hot packs, plus layers kept whole (these need the
    model's header; without the file only the packs are counted)."""
    from hybrid_gguf.header.inventory import read_inventory

    out: dict = {}
    for layer, dev in plan.pack_devices().items():
        out[dev] = out.get(dev, 0) + len(plan.hot[layer])
    if plan.n_gpu_layers != 0 and plan.model_path and Path(plan.model_path).is_file():
        try:
            inv = read_inventory(plan.model_path)
            if inv.fingerprint == plan.fingerprint:
                for dev in plan.per_device(inv):
                    n = sum(inv.layers[l].n_expert for l in dev["whole_layers"])
                    if n:
                        out[dev["name"]] = out.get(dev["name"], 0) + n
        except (HybridError, OSError, IndexError):
            pass
    return out


def collect(store_root: Optional[Path] = None, plans_dir: Optional[Path] = None,
            skipped: Optional[list] = None) -> list:
    """One dict per model fingerprint found in the store or the plans directory; plan files
    that cannot be read are appended to `skipped` as (path, why)."""
    from hybrid_gguf.paths import plans_dir as default_plans_dir
    from hybrid_gguf.routing.profile import ProfileStore

    store = ProfileStore(store_root)
    plans = _plans(plans_dir if plans_dir is not None else default_plans_dir(),
                   skipped if skipped is not None else [])
    profiles = {p.fingerprint: p for p in store.profiles()}
    rows = []
    for fp in sorted(set(plans) | set(profiles)):
        prof = profiles.get(fp)
        path_plan = plans.get(fp)
        plan = path_plan[1] if path_plan else None
        last = store.load_last_session(fp)
        model = (last or {}).get("model") or (plan.model_path if plan else None)
        rows.append({
            "fingerprint": fp,
            "model": model,
            "name": Path(model).name if model else (plan.model_name if plan else fp[:16]),
            "arch": prof.arch if prof else (plan.arch if plan else None),
            "plan": str(path_plan[0]) if path_plan else None,
            "plan_budget_bytes": plan.budget_bytes if plan else None,
            "plan_backend": plan.backend if plan else None,
            "hot_experts": _hot_per_device(plan) if plan else {},
            "predicted_hit_rate": plan.predicted.hit_rate if plan else None,
            "predicted_decode_tokens_per_s": plan.predicted.decode_tokens_per_s if plan else None,
            "profile": str(store.path_for(fp)) if prof else None,
            "profile_sessions": prof.sessions if prof else 0,
            "profile_tokens": int(prof.tokens_per_layer.max()) if prof is not None and prof.n_layer else 0,
            "profile_updated": prof.updated if prof else None,
            "last_session": last,
        })
    return rows
