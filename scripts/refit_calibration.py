#!/usr/bin/env python3
"""Refit the decode side of the bandwidth model from saved results, without the models.

Reads bench JSON (a list of budgets, as under docs/results/) and, optionally, planned runs
(`hybrid-gguf plan --json` with its decode breakdown, `hybrid-gguf run --json`). Each run's model terms
(GPU bytes, CPU expert bytes, busy and idle hand-offs per token) are saved in newer bench
JSON; for older JSON (one kind of hand-off) they are recovered from the predictions of the
same run under two calibrations and the roofline. The decode side is fitted as `bench`
fits it (`calibration.fit_decode`) on the runs of the budgets named by --fit, and every run's
prediction with that fit is printed next to its measurement: runs outside --fit are out of
sample.

  python scripts/refit_calibration.py docs/results/h200-2026-11-28/bench_q30b.json --fit 0.25 \\
      --plans docs/results/h200-2026-11-28/plan_6GiB.json:docs/results/h200-2026-11-28/run_6GiB.json

GPU probe JSON (`hybrid-gguf bench --probe-only --json`) fits the GPU's bandwidth and fixed
times; --gpu-layer-us / --gpu-step-us then hold those while a bench of one model is fitted,
as `bench` does after the probe.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from hybrid_gguf.planning.calibration import Bandwidth, RunTerms, fit_decode


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
    if "decode_handoffs" in bw:
        Hb, Hi = bw["decode_handoffs"]["busy"], bw["decode_handoffs"]["idle"]
    else:  # plans from before the busy/idle split
        Hb, Hi = (round(ms["handoff"] / 1e3 / bw["handoff_s"]) if bw["handoff_s"] > 0 else 0), 0.0
    n_gpu = plan["placement"].get("n_gpu_layers", -1)
    layers = plan["model"]["n_layer"] if n_gpu < 0 else min(n_gpu, plan["model"]["n_layer"])
    return f"plan {plan['budget_bytes'] / 2**30:.0f} GiB", terms(G, C, Hb, Hi, run["gen_tokens_per_s"], layers)


def terms(G, C, Hb, Hi, decode_ts, gpu_layers) -> RunTerms:
    return RunTerms(G, C, Hb, Hi, 0.0, 0.0, 0.0, decode_ts, 1.0, 1, gpu_layers, 1.0 if gpu_layers else 0.0)


def bench_rows(budget: dict, totals: dict) -> list:
    """(label, RunTerms) per placement of one budget: saved terms (busy hand-offs from the
    routing trace when present), or for older JSON the terms recovered algebraically."""
    share = budget["budget_share_of_experts"]
    configs = budget["prediction"]["configs"]
    if all("terms" in row for row in configs.values()):
        out = []
        for name, row in configs.items():
            # terms saved before the fixed GPU times: every bench placement runs its
            # layers on the GPU
            t = RunTerms.from_dict({"gpu_layers": budget["n_layer"], "gpu_steps": 1.0, **row["terms"]})
            traced = row.get("busy_handoffs_traced")
            if traced is not None:
                t = replace(t, handoffs_busy=traced, handoffs_idle=t.handoffs - traced)
            out.append((f"{name} @ {100 * share:.0f}%", t))
        return out
    return [(f"{name} @ {100 * share:.0f}%", terms(G, C, H, 0.0, meas, budget["n_layer"]))
            for name, G, C, H, meas in bench_terms(budget, totals)]


def file_rows(arg: str, fit_shares, totals: dict) -> list:
    """(label, RunTerms, in_fit) of a bench JSON (a list of budgets, or one; runs in the fit when
    their budget share is in fit_shares) or a GPU probe JSON (all in the fit, or those
    named: PATH:deep,wide)."""
    path, _, names = arg.partition(":")
    doc = json.load(open(path))
    if isinstance(doc, dict) and "results" in doc:
        doc = [doc]  # one budget's --json-detail
    if isinstance(doc, list):
        rows = []
        for b in doc:
            fit = fit_shares is None or any(abs(b["budget_share_of_experts"] - f) < 1e-6 for f in fit_shares)
            rows += [(f"{b['arch']} {label}", t, fit) for label, t in bench_rows(b, totals)]
        return rows
    # probe terms saved before the per-step time: every probe step runs on the GPU
    return [(f"probe {name}", RunTerms.from_dict({"gpu_steps": 1.0, **t}), True)
            for name, t in doc.get("probes", doc).items() if not names or name in names.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench JSON files (several models fit together) or GPU probe "
                    "JSON (`bench --probe-only --json`, or {name: terms}); model shapes that differ separate "
                    "the GPU's bandwidth from its fixed times")
    ap.add_argument("--fit", type=float, nargs="+", default=[0.25], help="budget shares whose runs are fitted")
    ap.add_argument("--check", nargs="*", default=[],
                    help="bench or probe JSON whose runs are only predicted (out of sample)")
    ap.add_argument("--plans", nargs="*", default=[],
                    help="PLAN.json:RUN.json pairs, or gpu_eval's planned_B.json (validation)")
    ap.add_argument("--gpu-layer-us", type=float, default=0.0,
                    help="GPU time per layer held fixed when the runs cannot fit it (one model's runs)")
    ap.add_argument("--gpu-step-us", type=float, default=0.0,
                    help="GPU time per decode step held fixed when the runs cannot fit it")
    ap.add_argument("--out-calibration", help="write the fitted calibration here (gpu_eval.sh CALIBRATION=)")
    opts = ap.parse_args()

    rows = []  # (label, RunTerms, in_fit)
    totals: dict = {}
    for path in opts.results:
        rows += file_rows(path, opts.fit, totals)
    for path in opts.check:
        rows += [(label, t, False) for label, t, _ in file_rows(path, None, {})]
    for item in opts.plans:
        if ":" in item:
            plan_path, run_path = item.split(":")
            plan, runs = json.load(open(plan_path)), [json.load(open(run_path))]
        else:  # {"plan": ..., "runs": [...]}: every run of the plan, one row each
            doc = json.load(open(item))
            plan, runs = doc["plan"], doc["runs"]
        for i, run in enumerate(runs):
            label, t = plan_terms(plan, run)
            rows.append((label + (f" #{i + 1}" if len(runs) > 1 else ""), t, False))

    base = replace(Bandwidth(), gpu_layer_s=opts.gpu_layer_us * 1e-6, gpu_step_s=opts.gpu_step_us * 1e-6)
    updates = fit_decode([t for _, t, fit in rows if fit], base)
    fitted = replace(base, **updates)
    print(f"fit on budgets {opts.fit}: gpu_bytes_per_s {fitted.gpu_bytes_per_s / 1e9:.0f} GB/s, "
          f"gpu_layer_s {1e6 * fitted.gpu_layer_s:.1f} us, gpu_step_s {1e6 * fitted.gpu_step_s:.0f} us, "
          f"cpu_bytes_per_s {fitted.cpu_bytes_per_s / 1e9:.1f} GB/s, handoff_s {1e6 * fitted.handoff_s:.0f} us, "
          f"handoff_idle_s {1e6 * fitted.handoff_idle_s:.0f} us")
    print(f"{'run':<30} {'in fit':>6} {'measured':>9} {'predicted':>10} {'error':>7}")
    for label, t, fit in rows:
        meas = t.decode_tokens_per_s
        pred = 1.0 / t.decode_seconds(fitted)
        print(f"{label:<30} {'yes' if fit else 'no':>6} {meas:>9.1f} {pred:>10.1f} {100 * (pred / meas - 1):>+6.1f}%")
    if opts.out_calibration:
        # the decode fields fitted here; the rest (prefill, machine id) from the first
        # bench's stored calibration
        benches = [d for d in (json.load(open(p.partition(":")[0])) for p in opts.results) if isinstance(d, list)]
        before = benches[0][0]["prediction"]["calibration_fitted"] if benches else {}
        cal = {**before, "gpu_layer_s": fitted.gpu_layer_s, "gpu_step_s": fitted.gpu_step_s, **updates}
        cal["measured"] = sorted(set(before.get("measured", [])) | set(updates))
        with open(opts.out_calibration, "w") as fh:
            json.dump(cal, fh, indent=1)
        print("wrote", opts.out_calibration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
