#!/usr/bin/env python3
"""Convert published per-token MoE routing logs to the project's trace format (.npz).

The output is what hybrid_gguf.routing.replay.load_trace reads: `ids` [n_tokens, n_layer, k]
(expert ids, -1 where a layer did not route the token; stored in the smallest signed
integer type that holds them) and `n_expert`. Several input files are concatenated in the
order given, as if one server had answered those requests one after the other.

Input formats (--format):

  fingerprint   JSON object with `router_data`: a list of {"token_<i>": {"layer_<l>":
                {"selected_experts": [...], ...}, ...}} in generation order, one entry per
                generated token. Written by the GPT-OSS-20B expert-fingerprinting study
                (github.com/AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting, data/**/_examples.json).

  records       JSON lines, one routing decision per line: a layer number, a token position
                and the selected expert ids (key names set with --layer-key, --token-key,
                --experts-key; lines without the experts key, e.g. a header, are skipped).
                --seq-key splits the lines into sequences (requests, problems), which are
                concatenated in order of first appearance. With --token-key "" the n-th line
                of a layer within a sequence is that sequence's n-th token.
                Covers vLLM-hook logs such as {"layer", "token_idx", "experts"|"topk_ids"}.

Only JSON is parsed; pickles and torch files are refused on purpose.

Examples:
  convert_routing_trace.py --format fingerprint -o gptoss.npz --n-expert 32 a.json b.json
  convert_routing_trace.py --format records --seq-key problem_id --n-expert 8 -o mixtral.npz x.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

_TOKEN_RE = re.compile(r"token_(\d+)$")
_LAYER_RE = re.compile(r"layer_(\d+)$")


def _dense(rows: List[dict], n_layer: Optional[int], k: Optional[int]) -> np.ndarray:
    """rows: one {layer: [experts]} per token -> int array [n_tokens, n_layer, k], -1 = none."""
    if not rows:
        raise ValueError("no routed tokens found")
    L = n_layer or 1 + max(max(r) for r in rows if r)
    K = k or max(len(e) for r in rows for e in r.values())
    out = np.full((len(rows), L, K), -1, dtype=np.int64)
    for t, r in enumerate(rows):
        for layer, experts in r.items():
            if layer >= L:
                raise ValueError(f"layer {layer} is beyond --n-layer {L}")
            e = list(experts)[:K]
            out[t, layer, :len(e)] = e
    return out


def read_fingerprint(path: Path) -> List[dict]:
    """One {layer: experts} per generated token, in generation order."""
    data = json.loads(path.read_text())
    items = data["router_data"]
    rows, positions = [], []
    for item in items:
        for tok_key, layers in item.items():
            m = _TOKEN_RE.match(tok_key)
            if not m:
                raise ValueError(f"{path}: unexpected router_data key {tok_key!r}")
            positions.append(int(m.group(1)))
            row = {}
            for layer_key, sel in layers.items():
                lm = _LAYER_RE.match(layer_key)
                if not lm:
                    raise ValueError(f"{path}: unexpected layer key {layer_key!r}")
                row[int(lm.group(1))] = [int(e) for e in sel["selected_experts"]]
            rows.append(row)
    if positions != sorted(positions):
        order = np.argsort(positions, kind="stable")
        rows = [rows[i] for i in order]
    return rows


def read_records(path: Path, layer_key: str, token_key: str, experts_key: str,
                 seq_key: Optional[str]) -> List[dict]:
    seqs: dict = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        d = json.loads(line)
        if experts_key not in d:
            continue
        seq = d.get(seq_key) if seq_key else None
        s = seqs.setdefault(seq, {"tokens": {}, "next": {}})
        layer = int(d[layer_key])
        if token_key:
            pos = int(d[token_key])
        else:
            pos = s["next"].get(layer, 0)
            s["next"][layer] = pos + 1
        s["tokens"].setdefault(pos, {})[layer] = [int(e) for e in d[experts_key]]
    rows = []
    for s in seqs.values():
        rows.extend(s["tokens"][p] for p in sorted(s["tokens"]))
    return rows


def convert(paths: Iterable[Path], fmt: str, n_expert: Optional[int] = None, n_layer: Optional[int] = None,
            k: Optional[int] = None, max_tokens: Optional[int] = None, layer_key: str = "layer",
            token_key: str = "token_idx", experts_key: str = "experts", seq_key: Optional[str] = None):
    rows: List[dict] = []
    for p in paths:
        p = Path(p)
        if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin"):
            raise ValueError(f"{p}: pickled files are not parsed (unsafe); convert them to JSON first")
        if fmt == "fingerprint":
            rows.extend(read_fingerprint(p))
        elif fmt == "records":
            rows.extend(read_records(p, layer_key, token_key, experts_key, seq_key))
        else:
            raise ValueError(f"unknown format {fmt!r}")
    if max_tokens:
        rows = rows[:max_tokens]
    ids = _dense(rows, n_layer, k)
    E = int(n_expert or ids.max() + 1)
    if ids.max() >= E:
        raise ValueError(f"expert id {int(ids.max())} is beyond --n-expert {E}")
    dtype = np.int8 if E <= 127 else np.int16 if E <= 32767 else np.int32
    return ids.astype(dtype), E


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--format", choices=("fingerprint", "records"), required=True)
    ap.add_argument("--n-expert", type=int, help="experts per layer (default: largest id + 1)")
    ap.add_argument("--n-layer", type=int, help="MoE layers (default: largest layer + 1)")
    ap.add_argument("--k", type=int, help="experts per token (default: longest selection)")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--layer-key", default="layer")
    ap.add_argument("--token-key", default="token_idx", help='"" = order of the lines')
    ap.add_argument("--experts-key", default="experts")
    ap.add_argument("--seq-key")
    ap.add_argument("--stats", action="store_true", help="print routing statistics of the result")
    a = ap.parse_args(argv)
    ids, n_expert = convert(a.inputs, a.format, a.n_expert, a.n_layer, a.k, a.max_tokens, a.layer_key,
                            a.token_key, a.experts_key, a.seq_key)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, ids=ids, n_expert=np.int64(n_expert))
    print(f"{a.out}: {ids.shape[0]} tokens x {ids.shape[1]} layers x k={ids.shape[2]}, "
          f"{n_expert} experts, {a.out.stat().st_size} bytes")
    if a.stats:
        print(json.dumps(trace_stats(ids, n_expert), indent=1))
    return 0


def trace_stats(ids: np.ndarray, n_expert: int) -> dict:
    """routing_stats.workload_stats of a trace where the project has it; else the same
    quantities computed here (coverage of the top 10/25/50 % of each layer's experts, top-1
    share, adjacent-token overlap, replay at 25 % of the experts resident)."""
    from hybrid_gguf.routing.replay import Trace, replay

    ids = np.asarray(ids, dtype=np.int32)
    counts, _ = Trace(ids, n_expert).counts()
    try:
        from hybrid_gguf.routing.stats import workload_stats
    except ImportError:
        workload_stats = None
    if workload_stats is not None:
        return workload_stats(counts, ids)
    srt = -np.sort(-counts, axis=1)
    total = counts.sum()
    cov = {str(f): float(srt[:, :max(1, round(f * n_expert))].sum() / total) for f in (0.1, 0.25, 0.5)}
    cur, prev = ids[1:], ids[:-1]
    both = (cur >= 0).any(axis=2) & (prev >= 0).any(axis=2)
    shared = (cur[..., :, None] == prev[..., None, :]).any(axis=3) & (cur >= 0)
    share = shared.sum(axis=2) / np.maximum((cur >= 0).sum(axis=2), 1)
    row = replay(Trace(ids, n_expert), [max(1, round(n_expert / 4)) * ids.shape[1]]).rows[0]
    return {"coverage": cov, "top1_share": float(counts.max(axis=1).sum() / total),
            "adjacent_overlap": float(share[both].mean()),
            "replay": {"resident": 0.25, "static": row.static, "lru": row.lru, "lfu": row.lfu,
                       "oracle": row.oracle}}


if __name__ == "__main__":
    sys.exit(main())
