"""A numpy forward pass of a qwen3moe GGUF, written from llama.cpp's graph (no torch needed).

It is the reference that CI compares llama.cpp against (tests/test_tiny_moe.py) and the
training script compares its torch forward against at export time. It reads the weights
with gguf-py, so it checks the file as llama.cpp sees it, and it returns every layer's
router probabilities and top-k selections for routing analysis.

Only what qwen3moe uses is implemented: no biases, no shared experts, no expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from scripts.tiny_moe.export import ARCH, TinyMoeConfig


@dataclass
class TinyMoeModel:
    cfg: TinyMoeConfig
    weights: Dict[str, np.ndarray]  # float32, gguf-py numpy layout


@dataclass
class ForwardResult:
    logits: np.ndarray  # (T, n_vocab)
    probs: List[np.ndarray] = field(default_factory=list)  # per layer (T, n_expert) router softmax
    topk: List[np.ndarray] = field(default_factory=list)  # per layer (T, k) expert ids, best first


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def load(path: str) -> TinyMoeModel:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path}: architecture {arch!r}, expected {ARCH!r}")

    def key(name, default=None):
        v = _field(reader, f"{ARCH}.{name}")
        return default if v is None else v

    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    weights = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(
            tuple(int(n) for n in reversed(t.shape)))
    cfg = TinyMoeConfig(
        n_vocab=len(tokens),
        n_ctx=int(key("context_length")),
        n_embd=n_embd,
        n_layer=int(key("block_count")),
        n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv", n_head)),
        head_dim=int(key("attention.key_length", n_embd // n_head)),
        n_expert=int(key("expert_count")),
        n_expert_used=int(key("expert_used_count")),
        n_ff_exp=int(key("expert_feed_forward_length")),
        rope_base=float(key("rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        tied_output="output.weight" not in weights,
    )
    return TinyMoeModel(cfg, weights)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_neox(x: np.ndarray, base: float) -> np.ndarray:
    """x: (T, H, hd) at positions 0..T-1; rotates element i with i + hd/2 (ggml NEOX mode)."""
    n_tok, _, hd = x.shape
    half = hd // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / hd)
    ang = np.arange(n_tok, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first (ties: lower index first)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    return order[:, :k]


def attention(x: np.ndarray, w: Dict[str, np.ndarray], b: str, cfg: TinyMoeConfig) -> np.ndarray:
    n_tok = x.shape[0]
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    q = (x @ w[b + "attn_q.weight"].T).reshape(n_tok, nh, hd)
    k = (x @ w[b + "attn_k.weight"].T).reshape(n_tok, nkv, hd)
    v = (x @ w[b + "attn_v.weight"].T).reshape(n_tok, nkv, hd)
    q = rope_neox(rms_norm(q, w[b + "attn_q_norm.weight"], cfg.rms_eps), cfg.rope_base)
    k = rope_neox(rms_norm(k, w[b + "attn_k_norm.weight"], cfg.rms_eps), cfg.rope_base)
    group = nh // nkv  # query head h reads kv head h // group, as ggml broadcasts
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (H, T, hd)
    scores = (q @ k.transpose(0, 2, 1)) / np.float32(np.sqrt(hd))
    causal = np.triu(np.ones((n_tok, n_tok), dtype=bool), k=1)
    scores = np.where(causal[None], -np.inf, scores)
    out = (softmax(scores, axis=-1) @ v).transpose(1, 0, 2).reshape(n_tok, nh * hd)
    return out @ w[b + "attn_output.weight"].T


def moe_ffn(x: np.ndarray, w: Dict[str, np.ndarray], b: str, cfg: TinyMoeConfig,
            sel: Optional[np.ndarray] = None):
    """Softmax over all experts, top-k, renormalized top-k weights, SwiGLU experts.

    `sel` replaces the top-k choice (to follow another implementation's routing).
    """
    probs = softmax(x @ w[b + "ffn_gate_inp.weight"].T)
    if sel is None:
        sel = top_k(probs, cfg.n_expert_used)
    sel_w = np.take_along_axis(probs, sel, axis=-1)
    sel_w = sel_w / sel_w.sum(-1, keepdims=True)
    gate, up, down = (w[b + "ffn_gate_exps.weight"], w[b + "ffn_up_exps.weight"],
                      w[b + "ffn_down_exps.weight"])
    out = np.zeros_like(x)
    for e in np.unique(sel):
        rows, slot = np.nonzero(sel == e)
        xe = x[rows]
        h = silu(xe @ gate[e].T) * (xe @ up[e].T)
        out[rows] += (h @ down[e].T) * sel_w[rows, slot][:, None]
    return out, probs, sel


def forward(model: TinyMoeModel, tokens: Sequence[int],
            force_topk: Optional[Sequence[np.ndarray]] = None) -> ForwardResult:
    """Logits for every position of one sequence starting at position 0 (float32).

    `force_topk` (per layer, (T, k) expert ids) makes the pass use those selections instead
    of its own: comparing logits against llama.cpp with llama.cpp's routing keeps a
    near-tie that rounding flipped from hiding (or faking) an arithmetic difference.
    """
    cfg, w = model.cfg, model.weights
    toks = np.asarray(tokens, dtype=np.int64)
    x = w["token_embd.weight"][toks].astype(np.float32)
    res = ForwardResult(logits=np.empty(0))
    for il in range(cfg.n_layer):
        b = f"blk.{il}."
        x = x + attention(rms_norm(x, w[b + "attn_norm.weight"], cfg.rms_eps), w, b, cfg)
        forced = None if force_topk is None else np.asarray(force_topk[il])
        m, probs, sel = moe_ffn(rms_norm(x, w[b + "ffn_norm.weight"], cfg.rms_eps), w, b, cfg, forced)
        x = x + m
        res.probs.append(probs)
        res.topk.append(sel)
    x = rms_norm(x, w["output_norm.weight"], cfg.rms_eps)
    out_w = w["token_embd.weight"] if cfg.tied_output else w["output.weight"]
    res.logits = (x @ out_w.T).astype(np.float32)
    return res


def topk_margin(probs: np.ndarray, k: int) -> np.ndarray:
    """Per row: k-th largest prob minus (k+1)-th; small means the selection is a near-tie."""
    srt = -np.sort(-probs, axis=-1)
    return srt[:, k - 1] - srt[:, k]
