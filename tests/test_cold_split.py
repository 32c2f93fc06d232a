"""planning/cold_split.py: which cold experts a layer's GPU reads with cold=both."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.cold_split import gpu_read_share, split_cold


def test_the_share_balances_the_two_rates():
    assert gpu_read_share(24e9, 48e9) == pytest.approx(1 / 3)
    with pytest.raises(HybridError):
        gpu_read_share(0.0, 48e9)


def test_the_gpu_gets_its_share_of_each_layers_cold_selections():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.6, size=(3, 32)).astype(float)
    hot = {0: list(range(8)), 2: [5, 9, 31]}
    got = split_cold(hot, counts, 0.3)
    assert set(got) == {0, 2}  # layer 1 has no pack
    for layer, mine in got.items():
        cold = [e for e in range(32) if e not in hot[layer]]
        assert set(mine) <= set(cold) and len(set(mine)) == len(mine)
        share = counts[layer, mine].sum() / counts[layer, cold].sum()
        # within one expert's selections of the target
        assert abs(share - 0.3) <= counts[layer, cold].max() / counts[layer, cold].sum()
    assert split_cold(hot, counts, 0.0) == {}
    assert split_cold(hot, counts, 1.0) == {l: [e for e in range(32) if e not in hot[l]] for l in hot}


def test_never_selected_cold_experts_split_by_count():
    counts = np.zeros((1, 10))
    counts[0, :2] = 5.0  # the hot ones
    got = split_cold({0: [0, 1]}, counts, 0.25)
    assert len(got[0]) == 2 and not {0, 1} & set(got[0])
    with pytest.raises(HybridError):
        split_cold({0: [0]}, counts, 1.5)
