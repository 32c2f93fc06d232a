#!/usr/bin/env python3
"""The in-session cache on a real routing trace, replayed offline: where a bench's timed window
sits, and what `plan --cache auto` would choose.

`windows`: a bench JSON's static packs (one row's plan) and each cache policy replayed with the
patch's rules (routing/cache_sim.py) on windows of the trace's timed half, as `bench` runs them:
the prompt of --pp tokens as one ubatch, then --tg decode steps, the hit rate counted over the
decode steps only. `auto`: the planner's cache choice for the same model shape and budget, its
profile taken from the trace's first half and its speed model from a calibration (default: the
bench JSON's calibration before the run), once per PCIe rate given.

  python scripts/cache_windows.py windows docs/results/h200-2026-12-01c/realtrace_0.25_call4.slim.json \\
      --pp 256 512 768 1024 --tg 64 --also 32:1024
  python scripts/cache_windows.py auto docs/results/h200-2026-12-01c/realtrace_0.25_call4.slim.json --pcie 25e9 46e9
  python scripts/cache_windows.py auto docs/results/h200-2026-12-01c/cacheab_realistic_0.25_call5.slim.json \
      --preset qwen3-30b-a3b-like --routing realistic --pcie 25e9 46e9

`reuse`: what patch v17's worker prefetch can find. Over the decode rows of a window, each split
layer's busy one-token post (a cold expert chosen) against that layer's previous busy post,
whose ids the slot still holds: the share of its cold experts the previous one named too.

  python scripts/cache_windows.py reuse docs/results/h200-2026-12-01d/realtrace_long_0.25_call3.slim.json --window 32:1024
  python scripts/cache_windows.py reuse docs/results/h200-2026-12-01d/workerab_realistic_v16_call7.slim.json \
      --routing realistic --window 256:1024
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

TRACE = "tests/data/routing/gpt-oss-20b_mixed10.npz"
POLICIES = (("static", "lru", 0, 0.0), ("lfu q16", "lfu", 16, 0.0), ("seeded q16", "lfu", 16, 0.5),
            ("lru q16", "lru", 16, 0.0), ("seeded q4", "lfu", 4, 0.5), ("lru q4", "lru", 4, 0.0))


def _trace(path: str):
    from hybrid_gguf.routing.replay import load_trace

    return np.asarray(load_trace(path).ids, dtype=np.int32)


def _hot(bench: dict, row: str) -> dict:
    for r in bench["results"]:
        if r["name"] == row and (r.get("plan") or {}).get("hot"):
            return {int(l): [int(e) for e in es] for l, es in r["plan"]["hot"].items()}
    raise SystemExit(f"no row {row!r} with hot packs in the bench JSON")


def windows(opts) -> int:
    from hybrid_gguf.routing.cache_sim import simulate_cache, steps_from_trace
    from hybrid_gguf.routing.replay import Trace

    bench = json.load(open(opts.bench_json))
    hot = _hot(bench, opts.row)
    ids = _trace(opts.trace)
    timed = ids[ids.shape[0] // 2:]
    n_expert = int(bench["n_expert"])
    spans = [(pp, opts.tg) for pp in opts.pp] + [tuple(int(v) for v in s.split(":")) for s in opts.also]
    print(f"{'decode rows':>14} " + " ".join(f"{name:>10}" for name, *_ in POLICIES))
    for pp, tg in spans:
        rows = timed[np.arange(pp + tg) % timed.shape[0]]
        steps = steps_from_trace(Trace(np.ascontiguousarray(rows), n_expert), prompt_tokens=pp, n_ubatch=512)
        n_prefill = len(steps) - tg
        cells = []
        for _, policy, quota, pinned in POLICIES:
            before = simulate_cache(steps[:n_prefill], hot, n_expert, policy, quota, pinned, asynchronous=True)
            after = simulate_cache(steps, hot, n_expert, policy, quota, pinned, asynchronous=True)
            hits, seen = after.hits - before.hits, after.hits + after.misses - before.hits - before.misses
            cells.append(hits / seen if seen else float("nan"))
        print(f"{f'{pp}..{pp + tg}':>14} " + " ".join(f"{c:>10.3f}" for c in cells))
    return 0


def auto(opts) -> int:
    from hybrid_gguf.bench.model_maker import bench_spec
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.calibration import Bandwidth
    from hybrid_gguf.planning.planner import make_plan
    from hybrid_gguf.routing.profile import RoutingProfile
    from hybrid_gguf.routing.replay import Trace
    from hybrid_gguf.synth import write_synthetic_moe

    bench = json.load(open(opts.bench_json))
    if opts.calibration:
        bw = Bandwidth.from_dict(json.load(open(opts.calibration)))
    else:
        cal = bench["prediction"]["calibration_before"]
        bw = Bandwidth.from_dict({k: v for k, v in cal.items() if k in {f.name for f in fields(Bandwidth)}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        write_synthetic_moe(path, bench_spec(opts.preset, "Q4_K"), zero_data=True)
        inv = read_inventory(path)
    if opts.routing:  # a preset's profile stream, as a bench of that preset profiles
        from hybrid_gguf.routing import process

        ids = process.trace_for(opts.routing, opts.rows, inv.n_layer, inv.n_expert, int(inv.n_expert_used),
                                stream=process.STREAM_PROFILE)
        half = ids.shape[0]
    else:
        ids = _trace(opts.trace)
        half = ids.shape[0] // 2
    trace = Trace(np.ascontiguousarray(ids[:half], dtype=np.int32), inv.n_expert)
    counts, tokens = trace.counts()
    z = np.zeros((inv.n_layer, inv.n_expert))
    profile = RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, ids.shape[2], z, counts,
                             np.zeros(inv.n_layer), tokens, sessions=1)
    for pcie in opts.pcie:
        plan = make_plan(inv, int(bench["budget_bytes"]), opts.ctx, profile, bandwidth=replace(bw, pcie_bytes_per_s=pcie),
                         cache="auto", cache_trace=trace, handoff="worker")
        print(f"PCIe {pcie / 1e9:.0f} GB/s: {plan.cache.policy}" + (f" q{plan.cache.quota}" if plan.cache.active else ""))
        for name, r in ((plan.predicted.speed_terms or {}).get("cache_replay") or {}).items():
            print(f"  {name:>11}  hit {r['hit_rate']:.3f}  uploads/token {r['uploads_per_token']:6.2f}  "
                  f"predicted {r['predicted_decode_tokens_per_s'] or float('nan'):7.2f} tok/s")
    return 0


def reuse(opts) -> int:
    bench = json.load(open(opts.bench_json))
    hot = _hot(bench, opts.row)
    n_expert, n_layer = int(bench["n_expert"]), int(bench["n_layer"])
    pp, tg = (int(v) for v in opts.window.split(":"))
    if opts.routing:  # the preset's measured stream, as the bench's timed decode replays it
        from hybrid_gguf.routing import process

        rows = process.trace_for(opts.routing, pp + tg, n_layer, n_expert, int(bench["n_expert_used"]))[pp:]
    else:
        timed = _trace(opts.trace)
        timed = timed[timed.shape[0] // 2:]
        rows = timed[np.arange(pp, pp + tg) % timed.shape[0]]
    split = {l: set(es) for l, es in hot.items() if 0 < len(es) < n_expert}
    posts = cold_total = reused = 0
    for layer, hot_set in sorted(split.items()):
        previous = None
        for row in rows[:, layer]:
            cold = {int(e) for e in row if int(e) not in hot_set}
            if not cold:
                continue  # an idle post leaves the slot's ids as they were
            if previous is not None:
                posts += 1
                cold_total += len(cold)
                reused += len(cold & previous)
            previous = cold
    print(f"{len(split)} split layers, {posts} busy posts after a first: {cold_total / max(posts, 1):.2f} cold "
          f"experts each, {reused / max(cold_total, 1):.3f} of them named by the layer's previous busy post")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows", help="hit rates of the static packs and caches on windows of the timed half")
    w.add_argument("bench_json")
    w.add_argument("--row", default="per-expert-worker", help="the row whose plan's packs are replayed")
    w.add_argument("--pp", type=int, nargs="+", default=[256])
    w.add_argument("--tg", type=int, default=64)
    w.add_argument("--also", nargs="*", default=[], help="more windows as PP:TG")
    a = sub.add_parser("auto", help="what plan --cache auto chooses for the bench's model and budget")
    a.add_argument("bench_json")
    a.add_argument("--preset", default="gpt-oss-20b-shaped")
    a.add_argument("--calibration", help="calibration JSON (default: the bench's, before its run)")
    a.add_argument("--pcie", type=float, nargs="+", default=[25e9])
    a.add_argument("--ctx", type=int, default=4096)
    a.add_argument("--routing", help="a routing preset's profile stream instead of the trace (e.g. realistic)")
    a.add_argument("--rows", type=int, default=1024, help="tokens of the preset's stream")
    r = sub.add_parser("reuse", help="how often a busy split layer's cold experts are its previous busy post's")
    r.add_argument("bench_json")
    r.add_argument("--row", default="per-expert-worker", help="the row whose plan's packs are replayed")
    r.add_argument("--window", default="32:1024", help="PP:TG, the decode rows after a PP-token prompt")
    r.add_argument("--routing", help="a routing preset's measured stream instead of the trace (e.g. realistic)")
    for p in (w, a, r):
        p.add_argument("--trace", default=TRACE)
    opts = ap.parse_args()
    return {"windows": windows, "auto": auto, "reuse": reuse}[opts.cmd](opts)


if __name__ == "__main__":
    raise SystemExit(main())
