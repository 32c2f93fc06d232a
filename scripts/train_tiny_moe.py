#!/usr/bin/env python3
"""Train the bundled tiny MoE (qwen3moe semantics) on the Python stdlib and export it to GGUF.

    .venv-train/bin/python scripts/train_tiny_moe.py            # full run (about 20 min, 1 core)
    .venv-train/bin/python scripts/train_tiny_moe.py --bench 20 # time 20 steps, write nothing

The forward pass here is llama.cpp's qwen3moe graph written in torch: pre-RMSNorm blocks,
per-head RMSNorm on Q and K, NeoX RoPE, GQA attention, softmax router over all experts,
top-k with the k weights renormalized to sum to 1, SwiGLU experts, no shared expert.
A Switch/GShard load-balancing loss keeps experts in use, so the routing skew that
remains is learned rather than designed.

Needs torch (CPU is enough); the product venv does not. Reproducible: fixed seed,
deterministic torch algorithms, one thread by default, data order from a seeded numpy
generator. The corpus is this Python's stdlib, so rerunning on another Python version
trains on different text (the digest in the sidecar says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scripts.tiny_moe import corpus  # noqa: E402
from scripts.tiny_moe.export import TinyMoeConfig, tensor_shapes, write_gguf  # noqa: E402

# Held-out workloads: never seen in training. Chosen to span kinds of text: async network
# code, parsers, SQL glue, prose (pydoc_data is the help topics' English text), a CLI
# library and algorithmic modules.
HELD_OUT = [
    "argparse", "asyncio", "difflib", "email", "json", "pydoc_data",
    "sqlite3", "statistics", "tomllib", "xml", "zoneinfo",
]

DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hybrid_gguf", "data"))


# ---------------------------------------------------------------- model

def init_weights(cfg: TinyMoeConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Parameters keyed by GGUF tensor name, in gguf-py numpy layout (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    # Residual-branch outputs start smaller so the stream is not dominated early (GPT-2 style).
    resid_std = std / math.sqrt(2 * cfg.n_layer)
    params = {}
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape)
        elif name.endswith(("attn_output.weight", "ffn_down_exps.weight")):
            t = torch.randn(shape, generator=gen) * resid_std
        else:
            t = torch.randn(shape, generator=gen) * std
        params[name] = t.requires_grad_(True)
    return params


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(cfg: TinyMoeConfig, n_pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / cfg.head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd). NeoX pairs element i with i + hd/2 (ggml GGML_ROPE_TYPE_NEOX)."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


def moe_ffn(x: torch.Tensor, p: Dict[str, torch.Tensor], b: str, cfg: TinyMoeConfig):
    """x: (N, D). Returns (out, aux_loss, top-k expert ids (N, k))."""
    k, n_exp = cfg.n_expert_used, cfg.n_expert
    logits = x @ p[b + "ffn_gate_inp.weight"].T
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = probs.topk(k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)  # qwen3moe: norm_w = true

    # Group token-slots by expert so each expert does one dense matmul.
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // k
    counts = torch.bincount(flat_e, minlength=n_exp)
    xs = x[tok]
    gate, up, down = (p[b + "ffn_gate_exps.weight"], p[b + "ffn_up_exps.weight"],
                      p[b + "ffn_down_exps.weight"])
    outs = []
    for e, chunk in enumerate(xs.split(counts.tolist())):
        if chunk.shape[0]:
            h = F.silu(chunk @ gate[e].T) * (chunk @ up[e].T)
            outs.append(h @ down[e].T)
    ys = torch.cat(outs) * top_w.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add_(0, tok, ys)

    # Switch-Transformer balance loss: n_expert * sum_e (slot share_e * mean prob_e).
    share = counts.to(x.dtype) / flat_e.numel()
    aux = n_exp * (share * probs.mean(0)).sum()
    return out, aux, top_i


def forward(p: Dict[str, torch.Tensor], tokens: torch.Tensor, cfg: TinyMoeConfig, rope=None):
    """tokens: (B, T) -> logits (B, T, V), mean aux loss, per-layer top-k ids [(B*T, k)]."""
    bsz, n_tok = tokens.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    cos, sin = rope if rope is not None else rope_tables(cfg, n_tok)
    cos, sin = cos[:n_tok], sin[:n_tok]
    x = p["token_embd.weight"][tokens]
    aux_total = x.new_zeros(())
    topk = []
    for il in range(cfg.n_layer):
        b = f"blk.{il}."
        h = rms_norm(x, p[b + "attn_norm.weight"], cfg.rms_eps)
        q = (h @ p[b + "attn_q.weight"].T).view(bsz, n_tok, nh, hd)
        k = (h @ p[b + "attn_k.weight"].T).view(bsz, n_tok, nkv, hd)
        v = (h @ p[b + "attn_v.weight"].T).view(bsz, n_tok, nkv, hd)
        q = rms_norm(q, p[b + "attn_q_norm.weight"], cfg.rms_eps).transpose(1, 2)
        k = rms_norm(k, p[b + "attn_k_norm.weight"], cfg.rms_eps).transpose(1, 2)
        q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)
        v = v.transpose(1, 2)
        if nkv != nh:  # query head h reads kv head h // (nh / nkv), as ggml broadcasts
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        a = a.transpose(1, 2).reshape(bsz, n_tok, nh * hd)
        x = x + a @ p[b + "attn_output.weight"].T
        h = rms_norm(x, p[b + "ffn_norm.weight"], cfg.rms_eps).reshape(bsz * n_tok, -1)
        m, aux, top_i = moe_ffn(h, p, b, cfg)
        x = x + m.view(bsz, n_tok, -1)
        aux_total = aux_total + aux
        topk.append(top_i)
    x = rms_norm(x, p["output_norm.weight"], cfg.rms_eps)
    out_w = p["token_embd.weight"] if cfg.tied_output else p["output.weight"]
    return x @ out_w.T, aux_total / cfg.n_layer, topk


# ---------------------------------------------------------------- data

def load_splits(held_out: List[str]):
    units = corpus.list_units()
    missing = [u for u in held_out if u not in units]
    if missing:
        raise SystemExit(f"held-out units missing from this stdlib: {missing}")
    train_units = [u for name, u in units.items() if name not in held_out]
    held_units = [units[name] for name in held_out]
    return units, train_units, held_units


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, seq: int):
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    idx = starts[:, None] + np.arange(seq + 1)[None, :]
    chunk = torch.from_numpy(stream[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def is_byte_target(y: np.ndarray) -> np.ndarray:
    """Targets that are text bytes (BOS/EOS are not): bits/byte counts only these."""
    return y >= corpus.BYTE_OFFSET


def unigram_bits_per_byte(train_stream: np.ndarray, eval_targets: np.ndarray) -> float:
    """Cross-entropy of a byte unigram fitted on the training text (add-one smoothed)."""
    counts = np.bincount(train_stream[is_byte_target(train_stream)], minlength=corpus.N_VOCAB)
    counts = counts[corpus.BYTE_OFFSET:].astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    tgt = eval_targets[is_byte_target(eval_targets)] - corpus.BYTE_OFFSET
    return float(-logp[tgt].mean())


def eval_windows(stream: np.ndarray, seq: int, max_windows: int) -> np.ndarray:
    """Non-overlapping windows of seq+1 tokens, evenly spread over the stream."""
    n_avail = (len(stream) - 1) // seq
    picks = np.linspace(0, n_avail - 1, num=min(max_windows, n_avail)).astype(np.int64)
    return np.stack([stream[i * seq: i * seq + seq + 1] for i in picks])


@torch.no_grad()
def eval_bits_per_byte(p, cfg, windows: np.ndarray, rope, batch: int = 16) -> Tuple[float, int]:
    """Model cross-entropy in bits per text byte over all positions of the windows."""
    total_bits, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i:i + batch].astype(np.int64))
        logits, _, _ = forward(p, w[:, :-1], cfg, rope)
        nll = F.cross_entropy(logits.reshape(-1, cfg.n_vocab), w[:, 1:].reshape(-1), reduction="none")
        mask = torch.from_numpy(is_byte_target(w[:, 1:].numpy()).reshape(-1))
        total_bits += float(nll[mask].sum()) / math.log(2)
        n += int(mask.sum())
    return total_bits / n, n


# ---------------------------------------------------------------- export checks

def check_against_reference(gguf_path: str, p_trained, cfg: TinyMoeConfig, seqs: np.ndarray) -> dict:
    """Numpy reference forward on the GGUF vs this torch forward on the same (F16-rounded) weights."""
    from scripts.tiny_moe import reference as ref

    model = ref.load(gguf_path)
    p = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in model.weights.items()}
    worst, topk_mismatch, total = 0.0, 0, 0
    with torch.no_grad():
        logits_t, _, topk_t = forward(p, torch.from_numpy(seqs.astype(np.int64)), cfg)
    for b, s in enumerate(seqs):
        out = ref.forward(model, s)
        worst = max(worst, float(np.abs(out.logits - logits_t[b].numpy()).max()))
        for il in range(cfg.n_layer):
            t_sets = np.sort(topk_t[il].view(len(seqs), len(s), -1)[b].numpy(), axis=-1)
            r_sets = np.sort(out.topk[il], axis=-1)
            topk_mismatch += int((t_sets != r_sets).any(-1).sum())
            total += len(s)
    # The exported F16 weights differ from the trained F32 ones; report that effect too.
    with torch.no_grad():
        logits_f32, _, _ = forward(p_trained, torch.from_numpy(seqs.astype(np.int64)), cfg)
    f16_effect = float((logits_f32 - logits_t).abs().max())
    return {"max_abs_logit_diff_numpy_vs_torch": worst, "topk_mismatches": topk_mismatch,
            "topk_rows": total, "max_abs_logit_diff_f16_vs_f32_weights": f16_effect}


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=96, help="per held-out unit")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--out", default=os.path.join(DATA_DIR, "tiny-moe-stdlib.gguf"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    cfg = TinyMoeConfig()
    seq = cfg.n_ctx

    t0 = time.time()
    units, train_units, held_units = load_splits(HELD_OUT)
    train_stream = corpus.stream(train_units)
    print(f"corpus: {len(units)} units, train {len(train_units)} units {len(train_stream)} tokens, "
          f"held-out {len(held_units)} units; loaded in {time.time() - t0:.1f}s", flush=True)

    p = init_weights(cfg, args.seed)
    n_params = sum(t.numel() for t in p.values())
    n_active = n_params - cfg.n_layer * 3 * cfg.n_ff_exp * cfg.n_embd * (cfg.n_expert - cfg.n_expert_used)
    print(f"params: {n_params} total, {n_active} active per token", flush=True)
    decay = [t for n, t in p.items() if t.dim() >= 2 and n != "token_embd.weight"]
    no_decay = [t for n, t in p.items() if not (t.dim() >= 2 and n != "token_embd.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(args.seed)
    rope = rope_tables(cfg, seq)
    steps = args.bench or args.steps

    curve = []
    ema = None
    t_train = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        x, y = sample_batch(train_stream, rng, args.batch, seq)
        logits, aux, _ = forward(p, x, cfg, rope)
        ce = F.cross_entropy(logits.reshape(-1, cfg.n_vocab), y.reshape(-1))
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        ce_v = ce.item()
        ema = ce_v if ema is None else 0.95 * ema + 0.05 * ce_v
        if step % args.log_every == 0 or step == steps - 1:
            el = time.time() - t_train
            curve.append({"step": step, "ce": round(ce_v, 4), "ce_ema": round(ema, 4),
                          "aux": round(aux.item(), 4), "seconds": round(el, 1)})
            print(f"step {step:5d}  ce {ce_v:.4f}  ema {ema:.4f}  bits/tok {ema / math.log(2):.3f}  "
                  f"aux {aux.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{el:.0f}s ({(step + 1) * args.batch * seq / el:.0f} tok/s)", flush=True)
    train_seconds = time.time() - t_train
    if args.bench:
        print(f"bench: {train_seconds / steps:.3f} s/step")
        return

    # Held-out and training-text evaluation, on fixed windows.
    t_eval = time.time()
    per_unit = {}
    all_bits, all_n, all_targets = 0.0, 0, []
    for u in held_units:
        windows = eval_windows(corpus.unit_tokens(u), seq, args.eval_windows)
        bpb, n = eval_bits_per_byte(p, cfg, windows, rope)
        uni = unigram_bits_per_byte(train_stream, windows[:, 1:].reshape(-1))
        per_unit[u.name] = {"bits_per_byte": round(bpb, 4), "unigram_bits_per_byte": round(uni, 4), "bytes": n}
        all_bits += bpb * n
        all_n += n
        all_targets.append(windows[:, 1:].reshape(-1))
        print(f"held-out {u.name:12s} {bpb:.3f} bits/byte (unigram {uni:.3f}) over {n} bytes", flush=True)
    held_bpb = all_bits / all_n
    held_uni = unigram_bits_per_byte(train_stream, np.concatenate(all_targets))
    train_windows = eval_windows(train_stream, seq, args.eval_windows * 4)
    train_bpb, _ = eval_bits_per_byte(p, cfg, train_windows, rope)
    print(f"held-out: {held_bpb:.3f} bits/byte vs unigram {held_uni:.3f}; "
          f"train text: {train_bpb:.3f} bits/byte; eval took {time.time() - t_eval:.0f}s", flush=True)

    weights = {n: t.detach().numpy().copy() for n, t in p.items()}
    train_info = {
        "corpus": "python-stdlib-source",
        "python_version": platform.python_version(),
        "corpus_sha256": corpus.corpus_digest(train_stream),
        "train_tokens_available": int(len(train_stream)),
        "train_packages": [u.name for u in train_units],
        "heldout_packages": [u.name for u in held_units],
        "steps": steps,
        "batch": args.batch,
        "seq": seq,
        "tokens_seen": steps * args.batch * seq,
        "lr": args.lr,
        "warmup": args.warmup,
        "aux_coef": args.aux_coef,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "final_ce_ema": round(ema, 4),
        "heldout_bits_per_byte": round(held_bpb, 4),
        "heldout_unigram_bits_per_byte": round(held_uni, 4),
        "train_text_bits_per_byte": round(train_bpb, 4),
        "command": " ".join(["scripts/train_tiny_moe.py"] + sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_gguf(args.out, cfg, weights, train_info)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)", flush=True)

    # The numpy reference (what CI compares llama.cpp against) must agree with torch.
    check_rng = np.random.default_rng(args.seed + 1)
    check_seqs = sample_batch(corpus.stream(held_units), check_rng, 4, seq)[0].numpy()
    check = check_against_reference(args.out, p, cfg, check_seqs)
    print(f"numpy reference vs torch: {check}", flush=True)
    if check["max_abs_logit_diff_numpy_vs_torch"] > 1e-3:
        raise SystemExit("numpy reference disagrees with the torch forward")

    sidecar = {
        "model": os.path.basename(args.out),
        "architecture": "qwen3moe",
        "config": asdict(cfg),
        "train": train_info,
        "heldout_per_package": per_unit,
        "loss_curve": curve,
        "reference_check": check,
        "workloads": {name: {"files": len(u.files), "bytes": u.n_bytes,
                             "split": "heldout" if name in HELD_OUT else "train"}
                      for name, u in units.items()},
    }
    side_path = os.path.splitext(args.out)[0] + ".json"
    with open(side_path, "w") as f:
        json.dump(sidecar, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {side_path}", flush=True)


if __name__ == "__main__":
    main()
