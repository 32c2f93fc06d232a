#!/usr/bin/env python3
"""Compare a plan's predictions with a planned run: VRAM within the budget, decode speed.

  python scripts/check_plan_run.py PLAN.json RUN.json

PLAN.json is `hybrid-gguf plan ... --json`, RUN.json is `hybrid-gguf run --plan ... --json`.
"""

from __future__ import annotations

import json
import sys


def gpu_bytes(buffers: dict) -> int:
    # llama.cpp's reported buffers ("model CUDA0", "kv CUDA0", "compute CUDA0", ...) on a GPU
    return sum(v for k, v in buffers.items() if "CUDA" in k.split()[-1] and "Host" not in k)


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
    return 0 if used <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
