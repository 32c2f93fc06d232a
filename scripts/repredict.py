#!/usr/bin/env python3
"""Predict the rows of saved bench JSON again with today's default hand-off costs: each row's
model terms (saved by `bench`) under the calibration that run had before it fitted anything,
with `handoff_s`, `handoff_idle_s`, `worker_handoff_s` and `worker_handoff_idle_s` taken from
`Bandwidth()`'s defaults. Prints measured decode, the prediction made then, and the new one.
Cache rows are left out (their price adds uploads, which the terms do not hold).

With `--gpu-from BENCH.json` (a bench of the same model with an `all-gpu` row, e.g. `allhot`'s)
it also prints each row's decode roofline at the GPU rate that row fits on its host, beside the
roofline the row was saved with: a run without an all-GPU row or a GPU probe priced its GPU at
the default rate, which a slower host does not reach.

  python scripts/repredict.py docs/results/h200-2026-11-30k/*.slim.json
  python scripts/repredict.py --gpu-from docs/results/h200-2026-12-01b/allhot_optimistic_call5.slim.json \\
      docs/results/h200-2026-12-01b/workerab_*.slim.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Optional

from hybrid_gguf.planning.calibration import Bandwidth, RunTerms, fit_bandwidth_terms

HANDOFF_FIELDS = ("handoff_s", "handoff_idle_s", "worker_handoff_s", "worker_handoff_idle_s")


def _is_worker(bench: dict, name: str) -> bool:
    return any(r.get("name") == name and r.get("worker") for r in bench.get("results", []))


def repredict(bench: dict, defaults: Bandwidth) -> list[tuple[str, float, float, float]]:
    """(row, measured, predicted then, predicted with the defaults' hand-off costs) per row."""
    pred = bench.get("prediction") or {}
    if "calibration_before" not in pred:
        return []
    then = Bandwidth.from_dict(pred["calibration_before"])
    bw = replace(then, **{k: getattr(defaults, k) for k in HANDOFF_FIELDS})
    rows = []
    for name, cfg in pred.get("configs", {}).items():
        if "cache" in name or "terms" not in cfg:
            continue
        b = bw.with_worker_handoffs() if _is_worker(bench, name) else bw
        rows.append((name, cfg["measured_decode_ts"], cfg["predicted_decode_ts"],
                     1.0 / RunTerms.from_dict(cfg["terms"]).decode_seconds(b)))
    return rows


def host_gpu_rate(all_gpu_bench: dict) -> float:
    """The GPU rate (bytes/s) the bench's all-gpu row fits, with that run's other constants."""
    pred = all_gpu_bench.get("prediction") or {}
    row = (pred.get("configs") or {}).get("all-gpu")
    if row is None or "terms" not in row:
        raise SystemExit("--gpu-from: that bench has no all-gpu row with model terms")
    fp = all_gpu_bench.get("fingerprint")
    base = Bandwidth.from_dict(pred["calibration_before"])
    return fit_bandwidth_terms([RunTerms.from_dict(row["terms"])], base, fp).for_model(fp).gpu_bytes_per_s


def rooflines(bench: dict, gpu_bytes_per_s: float) -> list[tuple[str, float, float, float]]:
    """(row, measured, roofline saved, roofline at `gpu_bytes_per_s`) per row: the run's fitted
    calibration without hand-off costs, as `bench` computes its roofline."""
    pred = bench.get("prediction") or {}
    if "calibration_fitted" not in pred:
        return []
    roof = replace(Bandwidth.from_dict(pred["calibration_fitted"]), gpu_bytes_per_s=gpu_bytes_per_s,
                   **{k: 0.0 for k in HANDOFF_FIELDS})
    return [(name, cfg["measured_decode_ts"], cfg["roofline_decode_ts"],
             1.0 / RunTerms.from_dict(cfg["terms"]).decode_seconds(roof))
            for name, cfg in pred.get("configs", {}).items()
            if "cache" not in name and "terms" in cfg and "roofline_decode_ts" in cfg]


def _print_bench(label: str, bench: dict, defaults: Bandwidth, rate: Optional[float], fingerprint) -> None:
    for name, measured, then, now in repredict(bench, defaults):
        print(f"{label:48s} {name:22s} measured {measured:7.2f}  "
              f"then {then:7.2f} ({then / measured - 1:+6.1%})  now {now:7.2f} ({now / measured - 1:+6.1%})")
    if rate is not None:
        if bench.get("fingerprint") != fingerprint:
            print(f"{label:48s} another model than --gpu-from's: no roofline")
            return
        for name, measured, saved, host in rooflines(bench, rate):
            print(f"{label:48s} {name:22s} roofline saved {saved:7.2f} ({measured / saved:.3f}x)  "
                  f"at the host's GPU rate {host:7.2f} ({measured / host:.3f}x)")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="*", help="bench --json-detail files (.slim.json)")
    ap.add_argument("--gpu-from", metavar="BENCH.json", help="a bench of the same model with an all-gpu row")
    args = ap.parse_args(argv)
    if not args.benches:
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        return 2
    defaults = Bandwidth()
    print("hand-off defaults: " + ", ".join(f"{k} {getattr(defaults, k) * 1e6:.0f} us" for k in HANDOFF_FIELDS))
    rate = fingerprint = None
    if args.gpu_from:
        with open(args.gpu_from) as f:
            source = json.load(f)
        rate, fingerprint = host_gpu_rate(source), source.get("fingerprint")
        print(f"GPU rate fitted to {args.gpu_from.rsplit('/', 1)[-1]}'s all-gpu row: {rate / 1e12:.3f} TB/s")
    for path in args.benches:
        with open(path) as f:
            doc = json.load(f)
        label = path.rsplit('/', 1)[-1][:48]
        # a bench of several budgets saves a list of runs (or a dict with "budgets")
        for bench in doc if isinstance(doc, list) else doc.get("budgets", [doc]):
            _print_bench(label, bench, defaults, rate, fingerprint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
