#!/usr/bin/env python3
"""Refit the decode side of the bandwidth model from saved results, without the models.

Reads the JSON of `scripts/bench_placement.py` (budgets whose "prediction" holds the planner's
decode tokens/s of each placement under two calibrations and the roofline) and, optionally,
planned runs (`hybrid-gguf plan --json` with its decode breakdown, `hybrid-gguf run --json`).
From those it recovers each run's model terms (GPU bytes, CPU expert bytes and hand-offs
per token), fits gpu_bytes_per_s on the all-GPU run and (cpu_bytes_per_s, handoff_s) by
least squares on the runs of the budgets named by --fit, and prints every run's prediction
with the refit calibration next to the measurement: the runs outside --fit are out of sample.

  python scripts/refit_calibration.py docs/results/h200-2026-11-28/bench_q30b.json --fit 0.25 \\
      --plans docs/results/h200-2026-11-28/plan_6GiB.json:docs/results/h200-2026-11-28/run_6GiB.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def bench_terms(budget: dict, totals: dict) -> list:
    """(name, G, C, H, measured tok/s) per placement, recovered from the predictions of the
    same run under two calibrations and the roofline. When both calibrations share the GPU
    rate, G and C follow from totals: a decode step reads D bytes of dense weights and KV
    and E bytes of selected experts, split between GPU and CPU (from a budget with a
    cpu-experts run; the bench's prompts are the same at every budget)."""
    pred = budget["prediction"]
    before, fitted = pred["calibration_before"], pred["calibration_fitted"]
    hf, hb = fitted["handoff_s"], before["handoff_s"]
    gf, gb, u = fitted["gpu_bytes_per_s"], before["gpu_bytes_per_s"], fitted["cpu_bytes_per_s"]
    if before["cpu_bytes_per_s"] != u:
        raise SystemExit("the two calibrations differ in cpu_bytes_per_s: terms not recoverable")
    out = []
    for name, row in pred["configs"].items():
        t_roof = 1.0 / row["roofline_decode_ts"]       # G/gf + C/u
        t_fit = 1.0 / row["fitted_decode_ts"]          # + H*hf
        t_before = 1.0 / row["predicted_decode_ts"]    # G/gb + C/u + H*hb
        H = (t_fit - t_roof) / hf if hf > 0 else 0.0
        if gf != gb:
            G = (t_before - H * hb - t_roof) / (1.0 / gb - 1.0 / gf)
            C = max(0.0, (t_roof - G / gf) * u)
        elif totals:
            D, E = totals["D"], totals["E"]
            C = max(0.0, (t_roof - (D + E) / gf) / (1.0 / u - 1.0 / gf))
            G = D + E - C
        else:
            raise SystemExit("a budget without a second GPU rate needs a cpu-experts run first")
        out.append((name, G, C, round(H), row["measured_decode_ts"]))
    for name, G, C, H, _ in out:
        if name == "cpu-experts":
            totals.update(D=G, E=C)
    return out


def plan_terms(plan: dict, run: dict) -> tuple:
    bw = plan["predicted"]["bandwidth"]
    ms = bw["decode_ms"]
    G = (ms["dense"] + ms["kv"] + ms["experts_gpu"]) / 1e3 * bw["gpu_bytes_per_s"]
    C = ms["experts_cpu"] / 1e3 * bw["cpu_bytes_per_s"]
    H = round(ms["handoff"] / 1e3 / bw["handoff_s"]) if bw["handoff_s"] > 0 else 0
    return (f"plan {plan['budget_bytes'] / 2**30:.0f} GiB", G, C, H, run["gen_tokens_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json")
    ap.add_argument("--fit", type=float, nargs="+", default=[0.25], help="budget shares whose runs are fitted")
    ap.add_argument("--plans", nargs="*", default=[], help="PLAN.json:RUN.json pairs (validation)")
    opts = ap.parse_args()

    budgets = json.load(open(opts.bench_json))
    rows = []  # (label, G, C, H, measured, in_fit)
    totals: dict = {}
    for b in budgets:
        share = b["budget_share_of_experts"]
        fit = any(abs(share - f) < 1e-6 for f in opts.fit)
        for name, G, C, H, meas in bench_terms(b, totals):
            rows.append((f"{name} @ {100 * share:.0f}%", G, C, H, meas, fit))
    for pair in opts.plans:
        plan_path, run_path = pair.split(":")
        rows.append((*plan_terms(json.load(open(plan_path)), json.load(open(run_path))), False))

    gpu_only = [r for r in rows if r[5] and r[2] == 0 and r[3] == 0]
    if not gpu_only:
        raise SystemExit("the fitted budgets need an all-GPU run")
    g = sum(r[1] ** 2 for r in gpu_only) / sum(r[1] / r[4] for r in gpu_only)
    host = [r for r in rows if r[5] and r[3] > 0]
    A = np.array([[r[2], r[3]] for r in host])
    y = np.array([1.0 / r[4] - r[1] / g for r in host])
    (inv_u, h), *_ = np.linalg.lstsq(A, y, rcond=None)
    u = 1.0 / inv_u
    print(f"fit on budgets {opts.fit}: gpu_bytes_per_s {g / 1e9:.0f} GB/s, cpu_bytes_per_s {u / 1e9:.1f} GB/s, "
          f"handoff_s {1e6 * h:.0f} us")
    print(f"{'run':<26} {'in fit':>6} {'measured':>9} {'predicted':>10} {'error':>7}")
    for label, G, C, H, meas, fit in rows:
        pred = 1.0 / (G / g + C / u + H * h)
        print(f"{label:<26} {'yes' if fit else 'no':>6} {meas:>9.1f} {pred:>10.1f} {100 * (pred / meas - 1):>+6.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
