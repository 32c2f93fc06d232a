#!/usr/bin/env python3
"""Compare a plan's predictions with a planned run: VRAM within the budget, decode speed.

  python scripts/check_plan_run.py PLAN.json RUN.json

PLAN.json is `hybrid-gguf plan ... --json`, RUN.json is `hybrid-gguf run --plan ... --json`.
"""

from __future__ import annotations

import json
import sys


def gpu_bytes(buffers: dict, device: str = "") -> int:
    # llama.cpp's reported buffers ("model CUDA0", "kv CUDA0", "compute CUDA0", ...) in VRAM:
    # not CUDA_Host or CUDA0_ZeroCopy (pinned host memory)
    total = 0
    for key, size in buffers.items():
        name = key.split()[-1]
        if name.startswith("CUDA") and "_" not in name and (not device or name == device):
            total += size
    return total


def per_device(plan: dict, placement: dict) -> bool:
    """Each GPU of a plan for several: reported VRAM (buffers + hot packs) within its budget."""
    ok = True
    packs = placement.get("hot_pack_by_device") or {}
    for d in plan["per_device"]:
        used = gpu_bytes(placement["buffers"], d["name"]) + packs.get(d["name"], 0)
        fits = used <= d["budget_bytes"]
        ok &= fits
        print(f"  {d['name']}: budget {d['budget_bytes'] / 2**30:.2f} GiB, reported {used / 2**30:.2f} GiB "
              f"({'within' if fits else 'OVER'}), predicted {d['bytes'] / 2**30:.2f} GiB; layers "
              f"{d['layers'][0] if d['layers'] else '-'}-{d['layers'][-1] if d['layers'] else '-'}, "
              f"{d['hot_experts']} hot experts")
    return ok


def main() -> int:
    plan = json.load(open(sys.argv[1]))
    run = json.load(open(sys.argv[2]))
    placement = run["placement"]
    used = gpu_bytes(placement["buffers"]) + placement.get("hot_pack_bytes", 0)
    budget = plan.get("budget_bytes") or placement.get("gpu_budget_bytes") or 0
    pred_dec = plan.get("predicted_decode_tokens_per_s") or 0.0
    meas_dec = run["gen_tokens_per_s"]
    err = (pred_dec - meas_dec) / meas_dec if meas_dec else float("nan")
    print(f"budget {budget / 2**30:.2f} GiB, reported VRAM {used / 2**30:.2f} GiB "
          f"({'within' if used <= budget else 'OVER'} budget), predicted {plan.get('gpu_bytes', 0) / 2**30:.2f} GiB")
    print(f"decode: predicted {pred_dec:.1f} tok/s, measured {meas_dec:.1f} tok/s, error {100 * err:+.1f}% "
          f"({'within' if abs(err) <= 0.15 else 'outside'} 15%); predicted hit rate "
          f"{plan.get('predicted_hit_rate', float('nan')):.3f}")
    routing = run.get("routing") or {}
    if routing.get("prompt_hit_rate") is not None:
        decode = routing.get("decode_hit_rate")
        print(f"hit rate seen by the recorder: prompt {routing['prompt_hit_rate']:.3f}"
              + ("" if decode is None else f", sampled decode steps {decode:.3f}"))
    cards_ok = per_device(plan, placement) if len(plan.get("per_device") or []) > 1 else True
    return 0 if used <= budget and cards_ok else 1


if __name__ == "__main__":
    sys.exit(main())
