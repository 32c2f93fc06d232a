#!/usr/bin/env python3
"""Write a large synthetic MoE GGUF for speed benchmarks (see hybrid_gguf/bench/model_maker.py).

Routed experts are random Q4_K / Q8_0 blocks written directly (no float weights,
no quantizer); everything else, the designed routing skew included, is synth.py's.

Examples:
  python scripts/make_bench_model.py --out /tmp/q30b-q4k.gguf
  python scripts/make_bench_model.py --weight-type Q8_0 --n-layer 8 --zipf 1.2 --out small.gguf
  python scripts/make_bench_model.py --routing realistic --out /tmp/q30b-realistic.gguf

--routing names how the model routes (docs/routing.md):
  realistic     Qwen3-30B-A3B-like: top 25 % of experts take ~52 %, LRU at 25 % hits ~78 %
  gpt-oss-like  gpt-oss-20b-like: top 25 % take ~55 %, LRU at 25 % ~59 % (a real trace)
  flat          near-uniform, weak reuse
  optimistic    the random weights' own, very concentrated routing (the default)
A preset other than optimistic is replayed by the hybrid patch (version 3) in place of the
router's choice; the router's probabilities still weight the chosen experts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_gguf.bench.model_maker import (  # noqa: E402
    EXPERT_TYPES, bench_spec, preset_names, write_bench_model,
)
from hybrid_gguf.errors import HybridError  # noqa: E402
from hybrid_gguf.routing.process import PRESETS as ROUTING_PRESETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    ap.add_argument("--preset", default="qwen3-30b-a3b-like", choices=preset_names(),
                    help="model shape (default qwen3-30b-a3b-like)")
    ap.add_argument("--weight-type", default="Q4_K", choices=EXPERT_TYPES,
                    help="routed-expert weight type (default Q4_K)")
    ap.add_argument("--n-layer", type=int, help="override the number of layers")
    ap.add_argument("--n-expert", type=int, help="override the number of experts")
    ap.add_argument("--zipf", type=float, help="routing skew exponent (0 = uniform)")
    ap.add_argument("--seed", type=int, help="random seed")
    ap.add_argument("--routing", default="optimistic", choices=list(ROUTING_PRESETS),
                    help="routing preset (default optimistic: the weights' own routing)")
    ap.add_argument("--workers", type=int, help="generator processes (default: one per CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


class _Progress:
    """Prints a line every ~10% of the data."""

    def __init__(self):
        self.start = time.perf_counter()
        self.next = 0.1

    def __call__(self, done: int, total: int) -> None:
        if done >= self.next * total:
            dt = time.perf_counter() - self.start
            print(f"  {done / total:4.0%}  {done / 2**30:6.2f} GiB  {dt:6.1f} s  "
                  f"{done / 1e6 / max(dt, 1e-9):7.0f} MB/s", file=sys.stderr, flush=True)
            while self.next * total <= done:
                self.next += 0.1


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {} if args.n_expert is None else {"n_expert": args.n_expert}
    if args.routing != "optimistic":
        overrides["routing"] = args.routing
    try:
        spec = bench_spec(args.preset, args.weight_type, n_layer=args.n_layer, zipf=args.zipf,
                          seed=args.seed, **overrides)
        res = write_bench_model(args.out, spec, workers=args.workers,
                                progress=None if args.quiet else _Progress())
    except HybridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {res.path} ({res.file_bytes / 1e9:.2f} GB, experts {res.expert_bytes / 1e9:.2f} GB) "
          f"in {res.seconds:.1f} s = {res.mb_per_s:.0f} MB/s with {res.workers} worker(s): "
          f"{spec.arch}, {spec.n_layer} layers, {spec.n_expert} experts top-{spec.n_expert_used}, "
          f"experts {spec.weight_type}, zipf {spec.zipf}, seed {spec.seed}, routing {args.routing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
