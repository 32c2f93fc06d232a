"""The in-session cache's hit rate on a routing trace, ordered against background uploads.

Per trace: the first half profiles (the static packs are each layer's most selected experts,
SHARE of them), the second half is replayed one step per token with the patch's rules
(hybrid_gguf/routing/cache_sim.py) for each policy and upload quota, once with uploads that
serve the next step (CacheOptions' default: stream-ordered on a GPU, copies on the CPU) and
once with background uploads, which serve the step after it. Prints hit rate / uploads per
token. Traces: .npz files (hybrid_gguf/routing/replay.py's format) or a routing preset name
generated for the Q30B shape (48 layers, 128 experts, top-8).

    python scripts/cache_replay.py tests/data/routing/gpt-oss-20b_mixed10.npz realistic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hybrid_gguf.routing import process
from hybrid_gguf.routing.cache_sim import simulate_cache
from hybrid_gguf.routing.replay import load_trace


def trace_ids(source: str) -> tuple:
    if Path(source).suffix == ".npz":
        t = load_trace(source)
        return np.asarray(t.ids), t.n_expert
    s, r = process.fit(source, 128, 8)
    prof = process.generate(1024, 48, 128, 8, s, r, seed=0, stream=process.STREAM_PROFILE)
    meas = process.generate(1024, 48, 128, 8, s, r, seed=0, stream=process.STREAM_MEASURED)
    return np.concatenate([prof, meas]), 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", help=".npz trace files or routing preset names")
    ap.add_argument("--share", type=float, default=0.25, help="share of each layer's experts in the packs")
    ap.add_argument("--quotas", default="4,16,64", help="uploads per step to try")
    args = ap.parse_args()
    quotas = [int(q) for q in args.quotas.split(",")]
    for source in args.traces:
        ids, n_expert = trace_ids(source)
        half = ids.shape[0] // 2
        counts = process.counts_of(ids[:half], n_expert)
        n_hot = max(1, round(args.share * n_expert))
        hot = {l: [int(e) for e in np.argsort(-counts[l], kind="stable")[:n_hot]] for l in range(ids.shape[1])}
        steps = [{l: ids[t, l] for l in range(ids.shape[1])} for t in range(half, ids.shape[0])]
        static = simulate_cache(steps, hot, n_expert, "lru", quota=0)
        print(f"{source}: {ids.shape[0] - half} tokens replayed, {n_hot} of {n_expert} experts per layer "
              f"in the packs; static hit rate {static.hit_rate:.3f}")
        print(f"  {'policy':<8} {'quota':>5}  {'next step (ordered)':>22}  {'step after (background)':>24}")
        for policy, sim_policy, pinned in (("lru", "lru", 0.0), ("lfu", "lfu", 0.0), ("seeded", "lfu", 0.5)):
            for q in quotas:
                cells = []
                for background in (False, True):
                    res = simulate_cache(steps, hot, n_expert, sim_policy, quota=q, pinned=pinned,
                                         asynchronous=background)
                    cells.append(f"{res.hit_rate:.3f} / {res.uploads / res.steps:5.1f}")
                print(f"  {policy:<8} {q:>5}  {cells[0]:>22}  {cells[1]:>24}")


if __name__ == "__main__":
    main()
