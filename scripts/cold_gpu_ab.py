"""GPU machine: the same per-expert hot set with its cold experts computed by the CPU (today's
hand-off per split layer) and by the GPU reading pinned host memory (patch v4, cold=gpu),
beside whole layers at the same expert bytes, all in one run.

    python scripts/cold_gpu_ab.py MODEL --share 0.25 --routing realistic [--reps 2] [--out ab.json]

LLAMA_HYBRID_SCHED_TIMERS=1000000 prints the scheduler's per-split breakdown of each timed
decode window on stderr (it synchronizes at every split boundary, so time the speeds in a run
without it). --offload-decode: llama.cpp's op offload from one token up
(GGML_OP_OFFLOAD_MIN_BATCH=1) with the host-side weights in pinned memory, so each decode step
uploads the cold experts it uses to the GPU (no cache), for every placement of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_gguf.bench import runner  # noqa: E402
from hybrid_gguf.header.inventory import read_inventory  # noqa: E402
from hybrid_gguf.llama import loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--share", type=float, default=0.25, help="share of expert bytes on the GPU")
    ap.add_argument("--routing", default=None)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", default="whole-layer,per-expert,per-expert-cold-gpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--offload-decode", action="store_true")
    args = ap.parse_args()
    if args.offload_decode:
        # read when the CUDA backend registers and when graphs are built: before any load
        os.environ["GGML_OP_OFFLOAD_MIN_BATCH"] = "1"
        from hybrid_gguf.llama import loader

        plain_load = loader.load_llama

        def no_repack(params):
            params.use_extra_bufts = False  # host-side weights in CUDA_Host (pinned), not CPU_REPACK

        def load_pinned(*a, **kw):
            first = kw.pop("model_patch", None)
            kw["model_patch"] = no_repack if first is None else (lambda p: (first(p), no_repack(p)))
            return plain_load(*a, **kw)

        loader.load_llama = load_pinned

    inv = read_inventory(args.model)
    budget = int(args.share * inv.expert_bytes_total)
    prompts, eval_tokens = runner.stdlib_workloads(args.model, args.pp, 4096, n_gen=args.tg)
    wanted = args.configs.split(",")
    common = dict(budget_bytes=budget, profile_prompts=prompts, eval_prompt=eval_tokens, n_prompt=args.pp,
                  n_gen=args.tg, reps=args.reps, n_threads=args.threads, save_calibration=False,
                  routing=args.routing)
    first = runner.run_bench(args.model, configs=[c for c in wanted if c != "per-expert-cold-gpu"], **common)
    rows = first["results"]
    if "per-expert-cold-gpu" in wanted:
        plain = loader.load_llama
        loader.load_llama = lambda *args, **kwargs: plain(*args, **{**kwargs, "cold_on_gpu": True})
        try:
            second = runner.run_bench(args.model, configs=["per-expert"], counts=first["_counts"],
                                      eval_counts=first["_eval_counts"], eval_trace=first["_eval_trace"], **common)
        finally:
            loader.load_llama = plain
        for r in second["results"]:
            r["name"] = "per-expert-cold-gpu"
            rows.append(r)
    base = {r["name"]: r for r in rows}
    wl = base.get("whole-layer", {}).get("tg_median_ts")
    print(f"{args.model.name} routing={first['routing']} share={args.share} budget={budget / 2**30:.2f} GiB")
    for r in rows:
        ratio = f"{r['tg_median_ts'] / wl:5.2f}x whole-layer" if wl else ""
        print(f"  {r['name']:22s} pp {r['pp_median_ts']:8.1f}  tg {r['tg_median_ts']:7.2f}  "
              f"hit {r['hit_rate'] if r['hit_rate'] is not None else float('nan'):.3f}  {ratio}")
    if args.out:
        keep = {k: v for k, v in first.items() if not k.startswith("_")}
        keep["results"] = rows
        args.out.write_text(json.dumps(keep, indent=1, default=float))


if __name__ == "__main__":
    main()
