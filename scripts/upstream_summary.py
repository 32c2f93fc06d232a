#!/usr/bin/env python3
"""Summary of the `upstream` step of scripts/gpu_eval.sh: upstream llama.cpp's
llama-batched-bench runs (its GPU expert cache, --moe-cache-mib, and its --n-cpu-moe), one
row per run, with the decode speed of the first timed window (the cache starts empty) and of
the later ones (warm), the cache's own hit rates and the GPU's peak memory. Writes JSON and
prints a Markdown table.

  python scripts/upstream_summary.py OUT.json RUNS.tsv

RUNS.tsv: one run a line, tab-separated: name, kind, share, moe_cache_mib, n_cpu_moe, and the
prefix of its files (PREFIX.out: the tool's JSON lines, PREFIX.err: its log, PREFIX.csv:
nvidia-smi's memory.used samples in MiB).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

HITS = re.compile(r"llama_moe_cache: (ubatch [<>=]+ \d+): hits = (\d+), misses = (\d+), "
                  r"hit rate = ([\d.]+)%, uploaded = ([\d.]+) MiB")
SLOTS = re.compile(r"MoE cache size = +([\d.]+) MiB for ([\d.]+) MiB of host experts")
WARNINGS = ("MoE cache is disabled", "they are not cached", "error:")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def run_row(name: str, kind: str, share: str, mib: str, ncmoe: str, prefix: str) -> dict:
    windows = [json.loads(line) for line in _read(Path(prefix + ".out")).splitlines() if line.startswith("{")]
    log = _read(Path(prefix + ".err"))
    smi = [int(x) for x in re.findall(r"^\s*(\d+)\s*$", _read(Path(prefix + ".csv")), re.M)]
    tg = [w["speed_tg"] for w in windows]
    row = {
        "name": name, "kind": kind, "share": float(share),
        "moe_cache_mib": int(mib) if mib != "-" else None,
        "n_cpu_moe": int(ncmoe) if ncmoe != "-" else None,
        "pp_median_ts": round(statistics.median(w["speed_pp"] for w in windows), 2) if windows else None,
        "tg_first_ts": round(tg[0], 2) if tg else None,
        "tg_warm_median_ts": round(statistics.median(tg[1:]), 2) if len(tg) > 1 else None,
        "tg_windows_ts": [round(x, 2) for x in tg],
        "tg_tokens": windows[0]["tg"] if windows else None,
        "gpu_peak_mib": max(smi) if smi else None,
        "cache": {m[0]: {"hits": int(m[1]), "misses": int(m[2]), "hit_rate": round(float(m[3]) / 100, 4),
                         "uploaded_mib": float(m[4])} for m in HITS.findall(log)},
        "warnings": sorted({line.strip() for line in log.splitlines() if any(w in line for w in WARNINGS)}),
    }
    size = SLOTS.search(log)
    if size:
        row["cache_mib"], row["host_expert_mib"] = float(size[1]), float(size[2])
    return row


def main(argv: list) -> int:
    out, runs = Path(argv[1]), Path(argv[2])
    rows = [run_row(*line.split("\t")) for line in runs.read_text().splitlines() if line.strip()]
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps({"tool": "llama-batched-bench (llama.cpp b11549)",
                               "routing": "the model's own router (optimistic on the synthetic models)",
                               "runs": rows}, indent=1))
    tmp.replace(out)
    print("| run | share | cache MiB | n-cpu-moe | prefill t/s | decode first t/s | decode warm t/s "
          "| hit rate (decode) | uploaded MiB | GPU peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        small = r["cache"].get("ubatch <= 8", {})
        print(f"| {r['name']} | {r['share']} | {r['moe_cache_mib'] or '-'} | {r['n_cpu_moe'] or '-'} "
              f"| {r['pp_median_ts']} | {r['tg_first_ts']} | {r['tg_warm_median_ts']} "
              f"| {small.get('hit_rate', '-')} | {small.get('uploaded_mib', '-')} | {r['gpu_peak_mib']} |")
        for w in r["warnings"]:
            print(f"  {r['name']}: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
