#!/usr/bin/env python3
"""Compact summary of bench JSON files (`hybrid-gguf bench --json-detail`), small enough to
keep in git: per routing and budget, each placement's median prefill/decode, hit rate, VRAM
and decode roofline (marked where it took the default GPU rate), and per-expert / whole-layer
ratios. Prints a Markdown table too.

  python scripts/bench_summary.py OUT.json BENCH.json [BENCH.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(doc) -> list[dict]:
    runs = doc if isinstance(doc, list) else doc.get("budgets", [doc])
    out = []
    for run in runs:
        prediction = run.get("prediction", {})
        configs = prediction.get("configs", {})
        for r in run["results"]:
            pred = configs.get(r["name"], {})
            out.append({
                "model": Path(run["model"]).name,
                "routing": run.get("routing", "optimistic"),
                "budget_share": round(run["budget_share_of_experts"], 3),
                "placement": r["name"],
                "pp_median_ts": round(r.get("pp_median_ts", 0.0), 2),
                "tg_median_ts": round(r.get("tg_median_ts", 0.0), 2),
                "tg_min_ts": round(r.get("tg_min_ts", 0.0), 2),
                "tg_max_ts": round(r.get("tg_max_ts", 0.0), 2),
                "hit_rate": None if r.get("hit_rate") is None else round(r["hit_rate"], 4),
                "vram_model_bytes": r.get("vram_model_bytes"),
                "roofline_tg_ts": pred.get("roofline_decode_ts"),
                # False: the roofline took the default GPU rate (no probe, no all-gpu row), too fast
                "roofline_gpu_rate_measured": prediction.get("gpu_rate_measured"),
                "error": r.get("error"),
            })
    return out


def main(argv) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rows = []
    for path in argv[2:]:
        rows += rows_of(json.loads(Path(path).read_text()))
    key = lambda r: (r["model"], r["routing"], r["budget_share"])  # noqa: E731
    ratios = {}
    for r in rows:
        ratios.setdefault(key(r), {})[r["placement"]] = r
    table = []
    for k, by in ratios.items():
        pe, wl = by.get("per-expert"), by.get("whole-layer")
        if pe and wl and wl["tg_median_ts"] and wl["pp_median_ts"]:
            table.append({"model": k[0], "routing": k[1], "budget_share": k[2],
                          "tg_per_expert_vs_whole_layer": round(pe["tg_median_ts"] / wl["tg_median_ts"], 3),
                          "pp_per_expert_vs_whole_layer": round(pe["pp_median_ts"] / wl["pp_median_ts"], 3)})
    Path(argv[1]).write_text(json.dumps({"rows": rows, "ratios": table}, indent=1))
    print("| model | routing | budget | placement | hit rate | pp t/s | tg t/s | tg roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=key):
        roof = "" if r["roofline_tg_ts"] is None else f"{r['roofline_tg_ts']:.1f}"
        roof += " (default GPU rate)" if roof and r["roofline_gpu_rate_measured"] is False else ""
        hit = "" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        print(f"| {r['model']} | {r['routing']} | {r['budget_share']:.0%} | {r['placement']} | {hit} | "
              f"{r['pp_median_ts']:.1f} | {r['tg_median_ts']:.1f} | {roof} |")
    for t in table:
        print(f"{t['model']} {t['routing']} {t['budget_share']:.0%}: per-expert/whole-layer "
              f"tg {t['tg_per_expert_vs_whole_layer']:.2f}x pp {t['pp_per_expert_vs_whole_layer']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
