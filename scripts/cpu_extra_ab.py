#!/usr/bin/env python3
"""CPU-only prefill and decode with llama.cpp's extra CPU buffer types on and off.

On a CPU with AMX the "on" run repacks the quantized dense weights into the AMX buffer and
multiplies prompt batches with AMX tiles; "off" (use_extra_bufts = false) keeps every weight
in the plain CPU buffer. Both runs evaluate the same tokens (decode teacher-forced).

  python scripts/cpu_extra_ab.py MODEL.gguf [--pp 512] [--tg 64] [--reps 2] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def measure(path: str, extra: bool, pp: int, tg: int, reps: int, threads: int | None) -> dict:
    import llama_cpp

    from hybrid_gguf.llama.hooks import construct_llama
    from hybrid_gguf.llama.log import capture_llama_log

    def patch(params):
        params.use_extra_bufts = extra

    kwargs = dict(n_ctx=pp + tg + 16, n_batch=pp, n_ubatch=pp, n_gpu_layers=0, verbose=False)
    if threads:
        kwargs.update(n_threads=threads, n_threads_batch=threads)
    with capture_llama_log(forward=False) as cap:
        llm = construct_llama(path, model_patch=patch, **kwargs)
    buffers = [line.strip() for line in cap.lines if "model buffer size" in line]
    tokens = [3 + (i * 7919) % 250 for i in range(pp + tg)]
    pps, tgs = [], []
    for _ in range(reps + 1):  # the first round warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens[:pp])
        llama_cpp.llama_synchronize(llm._ctx.ctx)
        t1 = time.perf_counter()
        for tok in tokens[pp:]:
            llm.eval([tok])
        t2 = time.perf_counter()
        pps.append(pp / (t1 - t0))
        tgs.append(tg / (t2 - t1))
    llm.close()
    return {"use_extra_bufts": extra, "buffers": buffers, "pp_ts": pps[1:], "tg_ts": tgs[1:],
            "pp_median": statistics.median(pps[1:]), "tg_median": statistics.median(tgs[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    out = {"cpu_flags": cpu_flags(), "model": opts.model,
           "runs": [measure(opts.model, extra, opts.pp, opts.tg, opts.reps, opts.threads) for extra in (True, False)]}
    on, off = out["runs"]
    out["pp_on_vs_off"] = on["pp_median"] / off["pp_median"]
    out["tg_on_vs_off"] = on["tg_median"] / off["tg_median"]
    for r in out["runs"]:
        print(f"extra bufts {'on ' if r['use_extra_bufts'] else 'off'}: pp {r['pp_median']:8.1f} t/s  "
              f"tg {r['tg_median']:7.2f} t/s  {'; '.join(r['buffers'])}")
    print(f"on/off: pp {out['pp_on_vs_off']:.3f}x  tg {out['tg_on_vs_off']:.3f}x  (flags: {' '.join(out['cpu_flags'])})")
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
