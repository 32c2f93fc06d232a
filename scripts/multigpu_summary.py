#!/usr/bin/env python3
"""Summarize `scripts/gpu_eval.sh multigpu`: the two-card plan at 2 x B against the one-card
plans at 2 x B and at B, as a markdown table with the issue's three verdicts.

  python scripts/multigpu_summary.py DIR B

DIR holds mg_plan_{two,one2b,one1b}.json (`plan --json`), mg_run_{name}_{rep}.json
(`run --plan --json`) and mg_smi_{name}_{rep}.csv (nvidia-smi "index, MiB used" samples
taken during each run). Exit status 1 when a verdict fails.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_plan_run import gpu_bytes  # noqa: E402

CONFIGS = (("two", "2 x B over two cards"), ("one2b", "2 x B on one card"), ("one1b", "B on one card"))
GIB = 2**30


def smi_rise(path: str) -> dict:
    """{gpu index: MiB used at the peak less MiB used in the first sample} of one run."""
    first, peak = {}, {}
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            continue
        gpu, mib = int(parts[0]), int(parts[1])
        first.setdefault(gpu, mib)
        peak[gpu] = max(peak.get(gpu, 0), mib)
    return {g: peak[g] - first[g] for g in peak}


def main() -> int:
    root, budget = sys.argv[1], sys.argv[2]
    rows, speed = [], {}
    ok = True
    for name, label in CONFIGS:
        plan = json.load(open(os.path.join(root, f"mg_plan_{name}.json")))
        runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(root, f"mg_run_{name}_*.json")))]
        if not runs:
            print(f"no runs of {name}")
            return 1
        tg = [r["gen_tokens_per_s"] for r in runs]
        speed[name] = sum(tg) / len(tg)
        cards = []
        for d in plan["per_device"]:
            packs = [r["placement"].get("hot_pack_by_device", {}).get(d["name"], 0) for r in runs]
            if len(plan["per_device"]) == 1 and not any(packs):
                packs = [r["placement"].get("hot_pack_bytes", 0) for r in runs]
            used = max(gpu_bytes(r["placement"]["buffers"], d["name"]) + p for r, p in zip(runs, packs))
            within = used <= d["budget_bytes"]
            ok &= within
            cards.append(f"{d['name']}: {used / GIB:.2f} of {d['budget_bytes'] / GIB:.2f} GiB"
                         f"{'' if within else ' OVER'} (predicted {d['bytes'] / GIB:.2f}; {len(d['layers'])} layers, "
                         f"{d['hot_experts']} hot, {len(d.get('whole_layers', []))} whole)")
        rises = {}
        for f in sorted(glob.glob(os.path.join(root, f"mg_smi_{name}_*.csv"))):
            for g, mib in smi_rise(f).items():
                rises[g] = max(rises.get(g, 0), mib)
        hits = [r.get("routing", {}).get("prompt_hit_rate") for r in runs]
        rows.append(f"| {label} | {plan['predicted_decode_tokens_per_s']:.1f} | "
                    f"{' / '.join(f'{x:.1f}' for x in tg)} (mean {speed[name]:.1f}) | "
                    f"{plan['predicted_hit_rate']:.3f} / {hits[0] if hits[0] is None else round(hits[0], 3)} | "
                    f"{'; '.join(cards)} | {', '.join(f'GPU{g} +{m} MiB' for g, m in sorted(rises.items()))} |")
    print(f"B = {budget}; decode tokens/s of `run --plan` (-n 128, sampled), reported VRAM = llama.cpp's "
          "buffers + hot packs per card, nvidia-smi = peak rise per GPU during the run (with the CUDA context)\n")
    print("| plan | predicted tok/s | measured tok/s | hit rate predicted / prompt seen | VRAM per card | nvidia-smi |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    verdicts = [(speed["two"] >= speed["one2b"], f"two cards at 2 x B ({speed['two']:.1f}) >= one card at 2 x B "
                                                 f"({speed['one2b']:.1f})"),
                (speed["two"] > speed["one1b"], f"two cards at 2 x B ({speed['two']:.1f}) > one card at B "
                                                f"({speed['one1b']:.1f})"),
                (ok, "VRAM per card within its budget")]
    print()
    for good, text in verdicts:
        print(f"- {'PASS' if good else 'FAIL'}: {text}")
    return 0 if all(g for g, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
