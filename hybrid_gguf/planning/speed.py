"""What a placement buys: expected hit rate from per-expert selection probabilities, and
tokens/s from the machine's calibration constants (planning/calibration.py).

Decode is memory-bound: per token every dense weight and every selected expert is read
once, so time per token = bytes read on each side / that side's bandwidth, plus fixed GPU
times per step (launch, sync, logits) and per layer (kernel launches and small ops,
whatever the bytes), plus a hand-off for every layer whose experts (some of them) run on
the CPU. A hand-off costs more when the token selected one of the layer's host experts
("busy": the CPU chain has work) than when it did not ("idle": the chain still runs, on
no rows). Prefill (one ubatch of T tokens) is compute-bound on the GPU; experts left in
host memory are copied to the GPU over PCIe (op offload), only the ones the batch uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from hybrid_gguf.planning.calibration import Bandwidth


def hit_rate(p: np.ndarray, gpu_experts: Mapping[int, Sequence[int]]) -> float:
    """Fraction of expert selections served from GPU memory: sum of p over the GPU
    experts (hot packs and whole layers) / total selections per token."""
    total = float(p.sum())
    if total <= 0:
        return 0.0
    hit = sum(float(p[l, list(es)].sum()) for l, es in gpu_experts.items() if len(es))
    return hit / total


def layer_busy(p: np.ndarray, gpu_experts: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Probability per layer that a token selects at least one expert outside the GPU set.

    The profile holds marginals only, so this is an estimate: the larger of
    1 - prod over host experts of (1 - p) (exact for independent selections, and a lower
    bound for top-k selection, whose indicators are negatively associated) and
    1 - h^k with h the layer's GPU share of its k selections (exact when the layer has no
    GPU experts or no host experts). Tokens whose experts cluster make it lower.
    """
    busy = np.zeros(p.shape[0])
    for l in range(p.shape[0]):
        k = float(p[l].sum())
        if k <= 0:
            continue
        on_gpu = np.zeros(p.shape[1], dtype=bool)
        on_gpu[[int(e) for e in gpu_experts.get(l, ()) if 0 <= int(e) < p.shape[1]]] = True
        product = 1.0 - float(np.prod(1.0 - np.clip(p[l, ~on_gpu], 0.0, 1.0)))
        share = 1.0 - min(1.0, float(p[l, on_gpu].sum()) / k) ** k
        busy[l] = max(product, share)
    return busy


def layer_hits(p: np.ndarray, gpu_experts: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Expected GPU-served selections per token of each layer."""
    h = np.zeros(p.shape[0])
    for l, es in gpu_experts.items():
        if len(es):
            h[l] = p[l, list(es)].sum()
    return h


# --- bandwidth model ---------------------------------------------------------------------------


@dataclass
class SpeedPrediction:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    decode_ms: dict = field(default_factory=dict)  # breakdown of one decode step
    handoffs: dict = field(default_factory=dict)  # expected busy / idle hand-offs per decode step
    prefill_ms: dict = field(default_factory=dict)  # breakdown of one ubatch

    def to_dict(self) -> dict:
        return asdict(self)


def _elements(t) -> int:
    n = 1
    for d in t.shape:
        n *= int(d)
    return n


def predict_speed(inv, p: Optional[np.ndarray], gpu_experts: Mapping[int, Sequence[int]],
                  dense_on_gpu: bool, bw: Bandwidth, n_ctx: int, n_ubatch: int = 512,
                  kv_fill: Optional[int] = None, kv_bytes_per_token: Optional[int] = None,
                  op_offload: bool = True, p_prefill: Optional[np.ndarray] = None,
                  cold_on_gpu: bool = False, card_hops: int = 0, worker: bool = False,
                  gpu_cold: Optional[Mapping[int, Sequence[int]]] = None) -> SpeedPrediction:
    """Decode and prefill tokens/s of a placement.

    cold_on_gpu: the GPU computes the host-side experts too, reading them in place from pinned
    host memory (patch v4, plan `cold: gpu`): no CPU hand-offs, host bytes at
    bw.host_read_bytes_per_s, and each split layer a second GPU chain.

    p: selections per token [n_layer, n_expert] (None: uniform routing); p_prefill the same
    for prompt tokens when they route differently (default: p).
    gpu_experts: {layer: experts in GPU memory} (hot packs and whole layers alike).
    dense_on_gpu: attention/norm/router/shared/output weights and the KV cache on the GPU.
    kv_fill: context tokens attended per decode step (default n_ctx // 2).
    card_hops: times a decode step passes from one GPU's layers to the next's (cards - 1),
    each bw.gpu_hop_s.
    worker: split layers hand their cold experts to the CPU worker (patch v8, plan `handoff:
    worker`) instead of the scheduler's graph cut: hand-offs at bw.worker_handoff_s (busy) and
    bw.worker_handoff_idle_s (idle).
    gpu_cold ({layer: cold experts}, patch v10 `cold=both`, with `worker`): in a decode step each
    listed layer's GPU reads those experts in place (bw.host_read_bytes_per_s) while the worker
    computes the rest, so the layer's cold time is the longer of the two, and a token that picks
    only the GPU's share leaves the worker idle; prompt batches run as with cold_on_gpu.
    """
    L = inv.n_layer
    if p is None:
        p = np.zeros((L, max(inv.n_expert, 1)))
        for layer in inv.layers:
            if layer.is_moe:
                p[layer.index, :layer.n_expert] = layer.n_expert_used / layer.n_expert
    gpu_cold = {int(l): list(v) for l, v in (gpu_cold or {}).items() if len(v)} if dense_on_gpu else {}
    gpu_sel = layer_hits(p, gpu_experts)
    host_sel = p.sum(axis=1) - gpu_sel
    # the worker's share: what neither the packs nor (cold=both) the GPU's reads take
    not_cpu = {l: list(gpu_experts.get(l, ())) + gpu_cold.get(l, []) for l in set(gpu_experts) | set(gpu_cold)}
    read_sel = layer_hits(p, gpu_cold) if gpu_cold else np.zeros(L)
    busy = layer_busy(p, not_cpu)

    dense_bytes = dense_elems = 0
    for t in inv.tensors:
        if t.is_expert or t.kind == "embedding":
            continue  # embeddings: one row per token
        dense_bytes += t.n_bytes
        dense_elems += _elements(t)
    if not any(t.name == "output.weight" for t in inv.tensors):
        for t in inv.tensors:  # tied output matrix is read in full
            if t.name == "token_embd.weight":
                dense_bytes += t.n_bytes
                dense_elems += _elements(t)
    fill = n_ctx // 2 if kv_fill is None else kv_fill
    kv_read = (inv.kv_bytes_per_token if kv_bytes_per_token is None else kv_bytes_per_token) * fill

    # decode: one token
    d_bw = bw.gpu_bytes_per_s if dense_on_gpu else bw.cpu_bytes_per_s
    exp_gpu = exp_cpu = 0.0
    both_read_s = 0.0  # cold=both: what the GPU's in-place reads take beyond the worker's compute
    n_busy = n_idle = 0.0
    for layer in inv.layers:
        if not layer.is_moe:
            continue
        l = layer.index
        exp_gpu += gpu_sel[l] * layer.per_expert_bytes
        cpu_bytes = (host_sel[l] - read_sel[l]) * layer.per_expert_bytes
        exp_cpu += cpu_bytes
        if l in gpu_cold:
            both_read_s += max(0.0, read_sel[l] * layer.per_expert_bytes / bw.host_read_bytes_per_s
                               - cpu_bytes / bw.cpu_bytes_per_s) + bw.gpu_chain_s
        if dense_on_gpu and len(set(gpu_experts.get(l, ()))) < layer.n_expert:
            n_busy += busy[l]
            n_idle += 1.0 - busy[l]
    cold_read = cold_on_gpu and dense_on_gpu
    ms = {
        "dense": 1e3 * dense_bytes / d_bw,
        "kv": 1e3 * kv_read / d_bw,
        "experts_gpu": 1e3 * exp_gpu / bw.gpu_bytes_per_s,
        "experts_cpu": 0.0 if cold_read else 1e3 * exp_cpu / bw.cpu_bytes_per_s,
        "gpu_layers": 1e3 * (L if dense_on_gpu else 0) * bw.gpu_layer_s,
        "gpu_step": 1e3 * (1 if dense_on_gpu else 0) * bw.gpu_step_s,
        "handoff": 0.0 if cold_read else 1e3 * (
            n_busy * bw.worker_handoff_s + n_idle * bw.worker_handoff_idle_s if worker
            else n_busy * bw.handoff_s + n_idle * bw.handoff_idle_s),
    }
    if cold_read:
        ms["experts_host_read"] = 1e3 * exp_cpu / bw.host_read_bytes_per_s
        ms["cold_chains"] = 1e3 * (n_busy + n_idle) * bw.gpu_chain_s
    if gpu_cold:
        ms["experts_both_read"] = 1e3 * both_read_s
    if card_hops and dense_on_gpu:
        ms["card_hops"] = 1e3 * card_hops * bw.gpu_hop_s
    decode_s = sum(ms.values()) / 1e3

    # prefill: one ubatch of T tokens
    if p_prefill is not None:
        p = p_prefill
        gpu_sel = layer_hits(p, gpu_experts)
        host_sel = p.sum(axis=1) - gpu_sel
    T = max(1, min(n_ubatch, n_ctx))
    gpu_flop = cpu_flop = 0.0
    copy_bytes = host_read_bytes = 0.0
    offload = op_offload and dense_on_gpu and T >= 32
    dense_flop = 2.0 * dense_elems * T + 4.0 * T * T / 2 * _attn_width(inv)
    if dense_on_gpu:
        gpu_flop += dense_flop
    else:
        cpu_flop += dense_flop
    for layer in inv.layers:
        if not layer.is_moe:
            continue
        l = layer.index
        per_elem = sum(_elements(inv.tensor(n)) for n in layer.expert_tensors) / max(layer.n_expert, 1)
        on_gpu = set(int(e) for e in gpu_experts.get(l, ()))
        f_gpu = 2.0 * per_elem * T * gpu_sel[l]
        f_host = 2.0 * per_elem * T * host_sel[l]
        if cold_read or gpu_cold:
            # the GPU reads the used host experts of the batch in place (cold=both: every cold
            # expert lives in zero-copy memory and the worker takes decode steps only, so a
            # prompt's are read in place as well)
            host = [e for e in range(layer.n_expert) if e not in on_gpu]
            used = float(np.sum(1.0 - (1.0 - np.clip(p[l, host], 0, 1)) ** T)) if host else 0.0
            host_read_bytes += used * layer.per_expert_bytes
            gpu_flop += f_gpu + f_host
        elif offload:
            # the scheduler copies the used host experts of the batch and runs them on the GPU
            host = [e for e in range(layer.n_expert) if e not in on_gpu]
            used = float(np.sum(1.0 - (1.0 - np.clip(p[l, host], 0, 1)) ** T)) if host else 0.0
            copy_bytes += used * layer.per_expert_bytes
            gpu_flop += f_gpu + f_host
        else:
            gpu_flop += f_gpu if dense_on_gpu else 0.0
            cpu_flop += f_host + (0.0 if dense_on_gpu else f_gpu)
    pms = {
        "gpu_compute": 1e3 * gpu_flop / bw.gpu_flops,
        "cpu_compute": 1e3 * cpu_flop / bw.cpu_flops,
        "pcie_copies": 1e3 * copy_bytes / bw.pcie_bytes_per_s,
        "host_reads": 1e3 * host_read_bytes / bw.host_read_bytes_per_s,
        # a ubatch on the GPU pays the per-layer and per-graph fixed times too (decode's); without
        # them a small model's prefill came out at tens of millions of tokens/s
        "gpu_fixed": 1e3 * ((L * bw.gpu_layer_s + bw.gpu_step_s) if dense_on_gpu else 0.0),
    }
    prefill_s = sum(pms.values())/1e3
    return SpeedPrediction(
        decode_tokens_per_s=float(1.0 / decode_s) if decode_s > 0 else float("inf"),
        prefill_tokens_per_s=float(T / prefill_s) if prefill_s > 0 else float("inf"),
        decode_ms={k: round(float(v), 4) for k, v in ms.items()},
        prefill_ms={k: round(float(v), 3) for k, v in pms.items()},
        handoffs={"busy": float(n_busy), "idle": float(n_idle)},
    )


def _attn_width(inv) -> float:
    """Sum over layers of n_head * head_dim (QK^T and PV flops per token pair / 2)."""
    heads = inv.n_head if isinstance(inv.n_head, list) else [inv.n_head] * inv.n_layer
    return float(sum(int(h) for h in heads) * (inv.head_dim_k or 0))


def cache_decode_tokens_per_s(decode_ms: dict, static_hit: float, cache_hit: float,
                              upload_bytes_per_token: float, bw: Bandwidth, active: bool = True,
                              n_cache_layers: int = 0, uploads_per_token: float = 0.0) -> float:
    """Decode tokens/s of a plan whose hot packs run as an in-session cache, from the plan's
    static decode terms (SpeedPrediction.decode_ms): the expert bytes served from the packs
    and from host memory scale with the cache's hit rate instead of the static one, and each
    token pays for its uploads at the pinned copy rate bw.pcie_bytes_per_s, in full: on the
    CPU the copies precede the step, and on a GPU the default stream-ordered uploads run
    ahead of the next ubatch, which waits for them there (CacheOptions.background ones run
    beside decode but still share the link and the host's memory with it). Hand-off terms
    stay as they are: a split layer hands off whether or not the cache hit. An `active` cache
    also pays its host step per token (bw.cache_step_s, plus bw.cache_upload_s for each of its
    `uploads_per_token`) and a fixed cost per cached layer (bw.cache_layer_s, `n_cache_layers`
    of them); the static packs do not."""
    ms = dict(decode_ms)
    if static_hit > 0:
        ms["experts_gpu"] = ms.get("experts_gpu", 0.0) * cache_hit / static_hit
    miss_scale = (1.0 - cache_hit) / (1.0 - static_hit) if static_hit < 1.0 else 1.0
    for key in ("experts_cpu", "experts_host_read"):
        if key in ms:
            ms[key] = ms[key] * miss_scale
    ms["uploads"] = 1e3 * upload_bytes_per_token / bw.pcie_bytes_per_s
    ms["cache_step"] = 1e3 * (bw.cache_step_s + uploads_per_token * bw.cache_upload_s
                              + n_cache_layers * bw.cache_layer_s) if active else 0.0
    total_s = sum(ms.values()) / 1e3
    return 1.0 / total_s if total_s > 0 else float("inf")
