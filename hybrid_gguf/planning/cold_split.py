"""Both readers of the cold experts (patch version 10, `cold=both`): which of a split layer's
cold experts its GPU reads in place from pinned host memory, the CPU worker computing the rest.

A pure function of the routing profile, the hot sets and one share: the GPU should carry about
`share` of each layer's expected cold selections, so that both finish a busy layer together.
`gpu_read_share` is that share from the calibration's two rates (the GPU's in-place read of
host memory and the CPU's rate on expert weights). Bench-only for now: plans do not choose it
yet (docs/backend-patch.md, "both readers at once").
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from hybrid_gguf.errors import HybridError


def gpu_read_share(host_read_bytes_per_s: float, cpu_bytes_per_s: float) -> float:
    """The share of the cold bytes that makes the GPU's in-place reads and the CPU's compute
    take the same time."""
    if not (host_read_bytes_per_s > 0 and cpu_bytes_per_s > 0):
        raise HybridError("both read rates must be positive")
    return host_read_bytes_per_s / (host_read_bytes_per_s + cpu_bytes_per_s)


def split_cold(hot: Mapping[int, Sequence[int]], counts: np.ndarray, share: float) -> dict:
    """{layer: [cold expert the GPU reads, ...]} for each layer with a hot pack and cold experts.
    `counts[layer, expert]`: the profile's selections. Cold experts are taken from the most
    selected down, each to the reader further below its target (the GPU's `share` of the
    layer's cold selections, the CPU's the rest); a layer whose cold experts were never
    selected splits them by count of experts instead."""
    if not 0.0 <= share <= 1.0:
        raise HybridError(f"the GPU's share of the cold experts must be in [0, 1], got {share}")
    out = {}
    for layer, experts in sorted(hot.items()):
        if not len(experts):
            continue
        row = np.asarray(counts[int(layer)], dtype=float)
        owned = {int(e) for e in experts}
        cold = [e for e in range(row.shape[0]) if e not in owned]
        if not cold or share == 0.0:
            continue
        weight = row[cold] if row[cold].sum() > 0 else np.ones(len(cold))
        order = sorted(range(len(cold)), key=lambda i: (-weight[i], cold[i]))
        gpu_mass = cpu_mass = 0.0
        mine = []
        for i in order:
            # the reader whose load is further below its share of what has been handed out
            total = gpu_mass + cpu_mass + weight[i]
            if (gpu_mass + weight[i]) / total - share <= share - gpu_mass / total:
                gpu_mass += weight[i]
                mine.append(cold[i])
            else:
                cpu_mass += weight[i]
        if mine:
            out[int(layer)] = sorted(mine)
    return out
