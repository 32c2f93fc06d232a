#!/usr/bin/env python3
"""Time expert placements of one model at one or more VRAM budgets (see hybrid_gguf/bench/runner.py).

Profiles routing on Python stdlib sources of some packages and times on others, then prints
prompt/decode tokens/s, hit rate and VRAM per placement, and the per-expert / whole-layer ratio.
Timed decodes are teacher-forced on the held-out text, so every placement decodes the same
tokens. With a GPU and several budgets, one decode fit over every budget's
placements is stored as the calibration `plan` uses (per-expert runs at different budgets
tell busy hand-offs from idle ones).

  python scripts/bench_placement.py MODEL --budget-share 0.10 0.25 0.50 --pp 512 --tg 128 --reps 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (load libllama before numpy-heavy imports; see the notes)

from hybrid_gguf.bench.runner import run_budgets, share_budgets, stdlib_workloads
from hybrid_gguf.sizes import parse_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--budget-share", type=float, nargs="*", default=[0.25],
                    help="budgets as shares of the routed-expert bytes that fit next to the rest of the model "
                         "(`hybrid-gguf bench --expert-share`)")
    ap.add_argument("--gpu-budget", nargs="*", default=[], help="budgets as sizes (total VRAM, as `plan` means it)")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--pack-device", default="CUDA0")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--routing", default=None,
                    help="routing preset replayed instead of the model's own: realistic, gpt-oss-like, "
                         "flat, optimistic (docs/routing.md); default: the model's")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="do not store the fitted bandwidth model as this machine's calibration")
    opts = ap.parse_args()

    profile_prompts, eval_prompt = stdlib_workloads(opts.model, opts.pp, opts.profile_tokens, n_gen=opts.tg)
    n_ctx = max(2048, opts.pp + opts.tg + 64)
    budgets = share_budgets(opts.model, opts.budget_share, n_ctx, opts.pp)
    budgets += [parse_size(b) for b in opts.gpu_budget]

    runs = run_budgets(opts.model, budgets, profile_prompts=profile_prompts, eval_prompt=eval_prompt,
                       n_prompt=opts.pp, n_gen=opts.tg, reps=opts.reps, n_ctx=n_ctx, configs=opts.configs,
                       pack_device=opts.pack_device, n_threads=opts.threads,
                       save_calibration=not opts.no_calibrate, routing=opts.routing,
                       log=lambda s: print(s, flush=True))
    for out in runs:
        for key in ("per_expert_vs_whole_layer_tg", "per_expert_vs_whole_layer_pp"):
            if key in out:
                print(f"{out['routing']} {out['budget_share_of_experts']:.0%} {key}: {out[key]:.3f}")
    if opts.json:
        opts.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
