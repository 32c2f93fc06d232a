#!/usr/bin/env python3
"""Predict the rows of saved bench JSON again with today's default hand-off costs: each row's
model terms (saved by `bench`) under the calibration that run had before it fitted anything,
with `handoff_s`, `handoff_idle_s`, `worker_handoff_s` and `worker_handoff_idle_s` taken from
`Bandwidth()`'s defaults. Prints measured decode, the prediction made then, and the new one.
Cache rows are left out (their price adds uploads, which the terms do not hold).

  python scripts/repredict.py docs/results/h200-2026-11-30k/*.slim.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from hybrid_gguf.planning.calibration import Bandwidth, RunTerms

HANDOFF_FIELDS = ("handoff_s", "handoff_idle_s", "worker_handoff_s", "worker_handoff_idle_s")


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
        worker = any(r.get("name") == name and r.get("worker") for r in bench.get("results", []))
        b = bw.with_worker_handoffs() if worker else bw
        rows.append((name, cfg["measured_decode_ts"], cfg["predicted_decode_ts"],
                     1.0 / RunTerms.from_dict(cfg["terms"]).decode_seconds(b)))
    return rows


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    defaults = Bandwidth()
    print("hand-off defaults: " + ", ".join(f"{k} {getattr(defaults, k) * 1e6:.0f} us" for k in HANDOFF_FIELDS))
    for path in paths:
        with open(path) as f:
            bench = json.load(f)
        for name, measured, then, now in repredict(bench, defaults):
            print(f"{path.rsplit('/', 1)[-1][:48]:48s} {name:22s} measured {measured:7.2f}  "
                  f"then {then:7.2f} ({then / measured - 1:+6.1%})  now {now:7.2f} ({now / measured - 1:+6.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
