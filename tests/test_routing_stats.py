"""Routing summaries on hand-made count matrices."""

import math

import numpy as np

from hybrid_gguf.routing import stats as rs

COUNTS = np.array([
    [10, 0, 0, 0],  # one expert does everything
    [1, 1, 1, 1],  # uniform
    [0, 0, 0, 0],  # nothing recorded
    [5, 3, 2, 0],
])


def test_entropy():
    h = rs.normalized_entropy(COUNTS)
    assert h[0] == 0.0 and math.isclose(h[1], 1.0) and math.isnan(h[2])
    p = np.array([0.5, 0.3, 0.2])
    assert math.isclose(h[3], -(p * np.log(p)).sum() / np.log(4))


def test_coverage_and_hits():
    assert rs.experts_for_coverage(COUNTS, 0.5).tolist() == [1, 2, 0, 1]
    assert rs.experts_for_coverage(COUNTS, 0.9).tolist() == [1, 4, 0, 3]
    hit = rs.static_hit_rate(COUNTS, 2)
    assert hit[0] == 1.0 and hit[1] == 0.5 and math.isnan(hit[2]) and hit[3] == 0.8
    assert math.isclose(rs.overall_hit_rate(COUNTS, 2), (10 + 2 + 8) / 24)


def test_top_experts_skip_unused():
    tops = rs.top_experts(COUNTS, 3)
    assert tops[0] == [(0, 1.0)] and tops[2] == []
    assert tops[3] == [(0, 0.5), (1, 0.3), (2, 0.2)]


def test_summarize_is_json_ready():
    import json

    s = rs.summarize(COUNTS, np.array([10, 4, 0, 10]), 1, slots=[1, 2])
    json.dumps(s, allow_nan=False)
    assert s["layers"][2]["entropy"] is None
    assert s["layers"][3]["static_hit"]["2"] == 0.8
    assert s["slots"] == [1, 2]
