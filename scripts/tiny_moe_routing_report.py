#!/usr/bin/env python3
"""Measure the bundled tiny MoE's routing per stdlib package and draw a heatmap.

    .venv/bin/python scripts/tiny_moe_routing_report.py \
        --png docs/img/tiny-moe-routing.png --json /tmp/tiny-moe-routing.json

Routing comes from the numpy reference forward (scripts/tiny_moe/reference.py), which
tests/test_tiny_moe.py holds equal to llama.cpp's top-k selections. Each package is read
as fixed, evenly spread 256-token windows. Prints markdown tables for docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scripts.tiny_moe import corpus  # noqa: E402
from scripts.tiny_moe import reference as ref  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hybrid_gguf", "data")
# Training packages to show next to the held-out ones: large ones of distinct character.
TRAIN_SHOWN = ["encodings", "idlelib", "distutils", "tkinter", "multiprocessing", "unittest",
               "logging", "http", "re", "typing", "_pydecimal", "turtle"]


def windows(tokens: np.ndarray, seq: int, n: int) -> List[np.ndarray]:
    n_avail = len(tokens) // seq
    picks = np.linspace(0, n_avail - 1, num=min(n, n_avail)).astype(np.int64)
    return [tokens[i * seq:(i + 1) * seq] for i in picks]


def package_counts(model, tokens: np.ndarray, n_windows: int):
    """(n_layer, n_expert) selection counts and the mean per-token router entropy per layer."""
    cfg = model.cfg
    counts = np.zeros((cfg.n_layer, cfg.n_expert), dtype=np.int64)
    ent = np.zeros(cfg.n_layer)
    n_tok = 0
    for w in windows(tokens, cfg.n_ctx, n_windows):
        out = ref.forward(model, w)
        for il in range(cfg.n_layer):
            counts[il] += np.bincount(out.topk[il].reshape(-1), minlength=cfg.n_expert)
            p = out.probs[il].astype(np.float64)
            ent[il] += float(-(p * np.log2(np.maximum(p, 1e-30))).sum())
        n_tok += len(w)
    return counts, ent / n_tok


def entropy_bits(share: np.ndarray) -> float:
    s = share[share > 0]
    return float(-(s * np.log2(s)).sum())


def hit_rate(load: np.ndarray, chosen: np.ndarray) -> float:
    """Share of expert selections that land on the chosen experts."""
    return float(load[chosen].sum() / load.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(DATA, "tiny-moe-stdlib.gguf"))
    ap.add_argument("--windows", type=int, default=32, help="256-token windows per package")
    ap.add_argument("--hot", type=int, default=4, help="experts per layer a placement keeps 'hot'")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model = ref.load(args.model)
    cfg = model.cfg
    side = json.load(open(os.path.splitext(args.model)[0] + ".json"))
    held = side["train"]["heldout_packages"]
    units = corpus.list_units()
    shown = [u for u in TRAIN_SHOWN if u in units] + [u for u in held if u in units]

    per_pkg: Dict[str, np.ndarray] = {}
    tok_entropy: Dict[str, np.ndarray] = {}
    for name in shown:
        per_pkg[name], tok_entropy[name] = package_counts(model, corpus.unit_tokens(units[name]), args.windows)
        print(f"routed {name}", file=sys.stderr, flush=True)

    train_names = [n for n in shown if n not in held]
    held_names = [n for n in shown if n in held]
    train_load = sum(per_pkg[n] for n in train_names)
    all_load = sum(per_pkg.values())
    E, L, H = cfg.n_expert, cfg.n_layer, args.hot

    print("| layer | load entropy (bits, max %.0f) | mean token router entropy (bits) | busiest experts (share) | least used (share) | max/min load |" % np.log2(E))
    print("|---|---|---|---|---|---|")
    layer_rows = []
    for il in range(L):
        share = all_load[il] / all_load[il].sum()
        order = np.argsort(-share)
        tok_ent = float(np.mean([tok_entropy[n][il] for n in shown]))
        row = {
            "layer": il, "load_entropy_bits": entropy_bits(share), "token_router_entropy_bits": tok_ent,
            "top": [(int(e), float(share[e])) for e in order[:3]],
            "bottom": [(int(e), float(share[e])) for e in order[-2:]],
            "max_over_min": float(share.max() / max(share.min(), 1e-12)),
        }
        layer_rows.append(row)
        top = ", ".join(f"{e} ({s:.1%})" for e, s in row["top"])
        bot = ", ".join(f"{e} ({s:.1%})" for e, s in row["bottom"])
        print(f"| {il} | {row['load_entropy_bits']:.2f} | {tok_ent:.2f} | {top} | {bot} | {row['max_over_min']:.1f} |")

    # Stability: how alike are packages' expert loads, and does a placement profiled on the
    # training packages keep its hit rate on unseen ones?
    print()
    print(f"| layer | mean pairwise corr. of package loads | hot-{H} hit rate on held-out: train-profiled | oracle (own profile) | uniform |")
    print("|---|---|---|---|---|")
    stab_rows = []
    for il in range(L):
        loads = np.stack([per_pkg[n][il] / per_pkg[n][il].sum() for n in shown])
        c = np.corrcoef(loads)
        mean_corr = float(c[np.triu_indices(len(shown), 1)].mean())
        hot = np.argsort(-train_load[il])[:H]
        profiled = float(np.mean([hit_rate(per_pkg[n][il], hot) for n in held_names]))
        oracle = float(np.mean([hit_rate(per_pkg[n][il], np.argsort(-per_pkg[n][il])[:H]) for n in held_names]))
        stab_rows.append({"layer": il, "mean_pairwise_corr": mean_corr, "hot": [int(e) for e in hot],
                          "heldout_hit_train_profiled": profiled, "heldout_hit_oracle": oracle,
                          "uniform": H / E})
        print(f"| {il} | {mean_corr:.2f} | {profiled:.1%} | {oracle:.1%} | {H / E:.0%} |")

    print()
    print(f"| held-out package | hot-{H} hit rate per layer, train-profiled (own-profile oracle) |")
    print("|---|---|")
    for n in held_names:
        cells = []
        for il in range(L):
            hot = np.argsort(-train_load[il])[:H]
            own = np.argsort(-per_pkg[n][il])[:H]
            cells.append(f"L{il} {hit_rate(per_pkg[n][il], hot):.0%} ({hit_rate(per_pkg[n][il], own):.0%})")
        print(f"| {n} | " + ", ".join(cells) + " |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"packages": shown, "heldout": held_names, "windows": args.windows,
                       "counts": {n: per_pkg[n].tolist() for n in shown},
                       "layers": layer_rows, "stability": stab_rows}, f, indent=1)
    if args.png:
        draw_heatmap(args.png, per_pkg, shown, held_names, cfg)


def draw_heatmap(path: str, per_pkg, shown, held_names, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, cfg.n_layer, figsize=(4 * cfg.n_layer, 0.32 * len(shown) + 1.6),
                             sharey=True, constrained_layout=True)
    labels = [f"{n} *" if n in held_names else n for n in shown]
    for il, ax in enumerate(np.atleast_1d(axes)):
        # Load relative to uniform: 1.0 means the expert gets 1/n_expert of the selections.
        rel = np.stack([per_pkg[n][il] / per_pkg[n][il].sum() * cfg.n_expert for n in shown])
        im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=3)
        ax.set_title(f"layer {il}")
        ax.set_xticks(range(cfg.n_expert))
        ax.set_xticklabels(range(cfg.n_expert), fontsize=7)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(shown)))
        ax.set_yticklabels(labels, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="load / uniform load")
    fig.suptitle("tiny-moe-stdlib: expert load per stdlib package (* = held out from training)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
