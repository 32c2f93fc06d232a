"""The cache replay's rules on hand-made routing (no llama.cpp): what an upload serves and when."""

from __future__ import annotations

import numpy as np

from hybrid_gguf.routing.cache_sim import simulate_cache


def _steps(*experts):
    """One layer (0), one selected expert per step."""
    return [{0: np.array([e])} for e in experts]


def test_an_ordered_upload_serves_the_next_step_and_a_background_one_the_step_after():
    hot = {0: [0]}  # one slot, expert 0 resident
    # step 1 misses 5 and uploads it (evicting 0); steps 2 and 3 select 5 again
    ordered = simulate_cache(_steps(5, 5, 5), hot, 8, "lru", quota=1)
    assert (ordered.hits, ordered.misses, ordered.uploads) == (2, 1, 1)
    background = simulate_cache(_steps(5, 5, 5), hot, 8, "lru", quota=1, asynchronous=True)
    # step 2 runs while the copy is in flight: a miss, and no second upload of the same expert
    assert (background.hits, background.misses, background.uploads) == (1, 2, 1)


def test_the_victim_leaves_at_once_even_when_its_replacement_is_in_flight():
    hot = {0: [0]}
    # 5 replaces 0 at step 1; step 2 selects 0: gone in both modes, so a miss
    for asynchronous in (False, True):
        res = simulate_cache(_steps(5, 0), hot, 8, "lru", quota=1, asynchronous=asynchronous)
        assert res.hits == 0 and res.misses == 2


def test_quota_zero_is_the_static_hot_set():
    hot = {0: [1, 2]}
    steps = _steps(1, 3, 2, 3, 1)
    res = simulate_cache(steps, hot, 8, "lru", quota=0)
    assert (res.hits, res.misses, res.uploads) == (3, 2, 0)


def test_a_background_upload_that_lands_is_not_uploaded_again():
    hot = {0: [0, 1]}
    # 5 misses at step 1 (upload issued), misses again at step 2 while in flight (it lands
    # after step 2's count): no second copy of 5 in the other slot
    res = simulate_cache(_steps(5, 5, 5, 5), hot, 8, "lru", quota=4, asynchronous=True)
    assert res.uploads == 1 and (res.hits, res.misses) == (2, 2)
