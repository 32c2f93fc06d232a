#!/usr/bin/env python3
"""Plans of a bench model computed offline, without the model's weights: what the planner
would choose and predict at several budgets and planner settings.

The model's header comes from a zero-data (sparse) copy of the bench preset, the routing
profile from a bench JSON's profile counts, and the speed model from a saved calibration.
Nothing is measured: the output is the planner's prediction, to decide what a GPU call
should measure.

  python scripts/plan_whatif.py docs/results/h200-2026-11-28c/call4-probe-bench/bench_q30b.slim.json \\
      --calibration docs/results/h200-2026-11-28c/calibration_h200.json --budgets 6GiB 10GiB --promote-from 0.9 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from hybrid_gguf.bench.model_maker import bench_spec
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.memory import MemoryOptions
from hybrid_gguf.planning.plan import DeviceBudget
from hybrid_gguf.planning.planner import make_plan
from hybrid_gguf.planning.calibration import Bandwidth
from hybrid_gguf.routing.profile import RoutingProfile
from hybrid_gguf.sizes import format_size, parse_size
from hybrid_gguf.synth import write_synthetic_moe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", help="bench JSON whose first budget holds the profile")
    ap.add_argument("--preset", default="qwen3-30b-a3b-like", help="bench preset of the benched model")
    ap.add_argument("--calibration", required=True, help="calibration JSON (a Bandwidth's fields)")
    ap.add_argument("--budgets", nargs="+", default=["6GiB", "10GiB"])
    ap.add_argument("--promote-from", type=float, nargs="+", default=[0.9, 0.0])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--compute", default="300MiB", help="compute buffer to assume (llama.cpp's dry run on the GPU)")
    opts = ap.parse_args()

    bw = Bandwidth.from_dict(json.load(open(opts.calibration)))
    bench = json.load(open(opts.bench_json))[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        write_synthetic_moe(path, bench_spec(opts.preset, "Q4_K"), zero_data=True)
        inv = read_inventory(path)
    L, E, k = inv.n_layer, inv.n_expert, inv.n_expert_used
    if "profile" in bench:  # the profile the bench's plans were made from
        profile = RoutingProfile.from_dict({**bench["profile"], "fingerprint": inv.fingerprint})
    else:  # bench JSON from before: prompt counts only; the decode view falls back to them
        counts = np.array(bench["prediction"]["profile_counts"], dtype=float)
        profile = RoutingProfile(inv.fingerprint, inv.arch, L, E, k, counts, np.zeros((L, E)),
                                 counts.sum(axis=1) / k, np.zeros(L), sessions=1)
    memory = MemoryOptions(opts.ctx, compute_bytes=parse_size(opts.compute))
    print(f"{'budget':>8} {'promote from':>12} {'decode tok/s':>12} {'hit rate':>9} {'GPU':>10}  whole layers")
    for budget in opts.budgets:
        b = parse_size(budget)
        for frac in opts.promote_from:
            plan = make_plan(inv, b, opts.ctx, profile, per_expert=True, devices=[DeviceBudget("CUDA0", b)],
                             bandwidth=bw, memory=memory, promote_fraction=frac)
            pr = plan.predicted
            print(f"{budget:>8} {frac:>12.2f} {pr.decode_tokens_per_s:>12.1f} {pr.hit_rate:>9.4f} "
                  f"{format_size(pr.gpu_bytes):>10}  {plan.whole_layers(inv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
