#!/usr/bin/env python3
"""Cost of the native routing recorder: prefill and decode with it off and on.

One model, one llama_context per mode (only cb_eval differs), so the weights are loaded
once.  Interleaved: prefills alternate mode order rep by rep, decode steps alternate
between the contexts token by token.  Timed by llama.cpp itself (llama_perf_context:
t_p_eval_ms over n_p_eval prompt tokens, t_eval_ms over n_eval decoded tokens); medians
over reps.  Tokens are fixed pseudo-random ids, as llama-bench does.

  python scripts/bench_recorder.py --model M.gguf --n-gpu-layers 99 --pp 512 --tg 128 --reps 5
  python scripts/bench_recorder.py --synth small --json out.json

Modes: off (no cb_eval), on (counts only: one sync per MoE layer), full (counts +
trace + co-activation + top-k weight mass: two syncs per MoE layer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402  (load libllama before numpy: docs/backend-patch.md)
import llama_cpp.llama_cpp as L  # noqa: E402

from hybrid_gguf.model import RUN_DECODE_STRIDE  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="GGUF model")
    src.add_argument("--synth", help="synthetic preset from hybrid_gguf.synth (built if missing)")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    p.add_argument("--pp", type=int, default=512, help="prompt tokens per prefill rep")
    p.add_argument("--tg", type=int, default=128, help="decoded tokens per rep")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="off,on", help="comma list of off, on, full, sampled "
                   "(sampled: one decoded token in --decode-stride, as `run` records)")
    p.add_argument("--decode-stride", type=int, default=RUN_DECODE_STRIDE)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", dest="json_out", default=None,
                   help="write results as JSON to this file ('-' for stdout)")
    return p.parse_args(argv)


def model_dims(llm) -> tuple:
    meta = llm.metadata
    arch = meta.get("general.architecture", "")
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    n_used = int(meta.get(f"{arch}.expert_used_count", 0) or 0)
    return arch, L.llama_model_n_layer(llm.model), n_expert, n_used


def new_context(llm, recorder=None):
    """A second context on llm's model with llm's settings, plus cb_eval if recording."""
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    if recorder is not None:
        recorder.attach()(params)
    ctx = L.llama_init_from_model(llm.model, params)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    return ctx, params  # params keeps the callback object alive


def fill_batch(batch, tokens, pos0: int) -> None:
    batch.n_tokens = len(tokens)
    for i, tok in enumerate(tokens):
        batch.token[i] = tok
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1


def decode_one(ctx, batch, tokens, pos0: int, sampler=None) -> None:
    if sampler is not None:
        sampler.before_decode(len(tokens))
    fill_batch(batch, tokens, pos0)
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    L.llama_synchronize(ctx)  # llama.cpp books perf stats at a sync (as reading logits does)


def one_rep(ctxs: list, batch, prompt, gen, n_batch: int, samplers=None) -> list:
    """Prefill then decode in every context; decode steps alternate between the contexts
    token by token, so load from other processes hits all modes alike."""
    samplers = samplers or [None] * len(ctxs)
    for ctx in ctxs:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        L.llama_perf_context_reset(ctx)
    for ctx, sampler in zip(ctxs, samplers):
        for start in range(0, len(prompt), n_batch):
            decode_one(ctx, batch, prompt[start:start + n_batch], start, sampler)
    # per-token times from llama.cpp's own cumulative t_eval_ms (robust medians)
    steps = [[] for _ in ctxs]
    for i, tok in enumerate(gen):
        order = range(len(ctxs)) if i % 2 == 0 else reversed(range(len(ctxs)))
        for j in order:
            before = L.llama_perf_context(ctxs[j]).t_eval_ms
            decode_one(ctxs[j], batch, [tok], len(prompt) + i, samplers[j])
            steps[j].append(L.llama_perf_context(ctxs[j]).t_eval_ms - before)
    out = []
    for j, ctx in enumerate(ctxs):
        perf = L.llama_perf_context(ctx)
        out.append({
            "decode_token_ms": steps[j],
            "prefill_ms_per_token": perf.t_p_eval_ms / max(1, perf.n_p_eval),
            "decode_ms_per_token": perf.t_eval_ms / max(1, perf.n_eval),
            "n_p_eval": perf.n_p_eval,
            "n_eval": perf.n_eval,
        })
    return out


def machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip().splitlines()
    except Exception:  # no nvidia-smi: a CPU machine
        pass
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from hybrid_gguf.llama.recorder import RoutingRecorder, recorder_status

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - {"off", "on", "full", "sampled"}
    if bad or not modes:
        raise SystemExit(f"unknown modes {sorted(bad)}; use off, on, full, sampled")
    if args.synth:
        from hybrid_gguf import synth

        t0 = time.monotonic()
        model_path = synth.ensure_synthetic(synth.preset(args.synth))
        print(f"synthetic model {model_path} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    else:
        model_path = args.model
    ok, why = recorder_status()
    if not ok and set(modes) - {"off"}:
        raise SystemExit(why)

    n_ctx = args.pp + args.tg + 16
    n_batch = min(max(args.pp, 1), 2048)
    kw = {"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_gpu_layers=args.n_gpu_layers,
                          n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512),
                          verbose=False, **kw)
    arch, n_layer, n_expert, n_used = model_dims(llm)
    if n_expert <= 0:
        raise SystemExit(f"{model_path} has no experts: nothing to measure")

    rng = np.random.default_rng(args.seed)
    n_vocab = llm.n_vocab()
    lo = 3  # skip the usual <unk>/<s>/</s> ids
    prompt = rng.integers(lo, n_vocab, size=args.pp).tolist()
    gen = rng.integers(lo, n_vocab, size=args.tg).tolist()
    batch = L.llama_batch_init(max(n_batch, 1), 0, 1)

    contexts, recorders, samplers = {}, {}, {}
    for mode in modes:
        if mode == "off":
            contexts[mode] = new_context(llm)
        else:
            full = mode == "full"
            rec = RoutingRecorder(n_layer, n_expert, n_used,
                                  trace_capacity=1 << 16 if full else 0,
                                  coactivation=full, weight_mass=full)
            recorders[mode] = rec
            contexts[mode] = new_context(llm, rec)
            if mode == "sampled":  # as `run` samples
                samplers[mode] = rec.decode_sampler(contexts[mode][0], args.decode_stride)

    # warm-up (allocations, first-touch pages, kernels)
    one_rep([contexts[m][0] for m in modes], batch, prompt[: min(32, len(prompt))], gen[:4],
            n_batch, [samplers.get(m) for m in modes])
    for rec in recorders.values():
        rec.reset()

    results = {m: [] for m in modes}
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else modes[::-1]
        for mode, r in zip(order, one_rep([contexts[m][0] for m in order], batch, prompt,
                                          gen, n_batch, [samplers.get(m) for m in order])):
            results[mode].append(r)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{m} pp {results[m][-1]['prefill_ms_per_token']:.3f} "
            f"tg {results[m][-1]['decode_ms_per_token']:.3f} ms/tok" for m in modes),
            file=sys.stderr)

    summary = {}
    for mode in modes:
        pp = statistics.median(r["prefill_ms_per_token"] for r in results[mode])
        tg = statistics.median(r["decode_ms_per_token"] for r in results[mode])
        tg_tok = statistics.median(t for r in results[mode] for t in r["decode_token_ms"])
        summary[mode] = {"prefill_ms_per_token": pp, "decode_ms_per_token": tg,
                         "decode_token_median_ms": tg_tok,
                         "prefill_tok_s": 1000 / pp if pp else None,
                         "decode_tok_s": 1000 / tg if tg else None}
    if "off" in summary:
        base = summary["off"]
        for mode in modes:
            s = summary[mode]
            s["prefill_ratio"] = s["prefill_ms_per_token"] / base["prefill_ms_per_token"]
            s["decode_ratio"] = s["decode_ms_per_token"] / base["decode_ms_per_token"]
            s["decode_token_median_ratio"] = (s["decode_token_median_ms"]
                                              / base["decode_token_median_ms"])

    checks = {}
    for mode, rec in recorders.items():
        snap = rec.snapshot(trace=False)
        sums_ok = bool(np.all(snap.counts.sum(1) == snap.tokens_per_layer * n_used))
        checks[mode] = {"selections": int(snap.counts.sum()), "sum_check": sums_ok,
                        "anomalies": snap.stats["anomalies"], "bad_ids": snap.stats["bad_ids"],
                        # > 0 when ids were copied from GPU memory (ggml_backend_tensor_get)
                        "device_reads": snap.stats["device_reads"]}

    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": str(model_path),
        "arch": arch, "n_layer": n_layer, "n_expert": n_expert, "n_expert_used": n_used,
        "n_gpu_layers": args.n_gpu_layers, "pp": args.pp, "tg": args.tg, "reps": args.reps,
        "threads": args.threads,
        "decode_stride": args.decode_stride,
        "sampled_switches_callback": samplers["sampled"].switches_callback if "sampled" in samplers else None,
        "summary": summary, "recorder_checks": checks, "reps_raw": results,
    }

    print(f"\n{Path(model_path).name}: {n_layer} layers, {n_expert} experts top-{n_used}, "
          f"ngl {args.n_gpu_layers}, pp {args.pp}, tg {args.tg}, {args.reps} reps (medians)")
    print("medians over reps of ms/token; 'per-token' is the median over every decoded token")
    print(f"{'mode':<6} {'prefill':>9} {'ratio':>7} {'decode':>9} {'ratio':>7} "
          f"{'per-token':>10} {'ratio':>7}")
    for mode in modes:
        s = summary[mode]
        print(f"{mode:<6} {s['prefill_ms_per_token']:>9.4f} {s.get('prefill_ratio', 0):>7.3f} "
              f"{s['decode_ms_per_token']:>9.4f} {s.get('decode_ratio', 0):>7.3f} "
              f"{s['decode_token_median_ms']:>10.4f} "
              f"{s.get('decode_token_median_ratio', 0):>7.3f}")
    for mode, c in checks.items():
        print(f"{mode}: recorded {c['selections']} selections, "
              f"sum check {'ok' if c['sum_check'] else 'FAILED'}, "
              f"{c['device_reads']} device reads, {c['anomalies']} anomalies")
    if args.json_out == "-":
        print(json.dumps(report, indent=1))
    elif args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")

    L.llama_batch_free(batch)
    for ctx, _params in contexts.values():
        L.llama_free(ctx)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
