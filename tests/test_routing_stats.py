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


def test_selection_probs_rows_sum_to_k_and_shrink_towards_uniform():
    counts = np.array([[30.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = rs.selection_probs(counts, np.array([20.0, 0.0]), [2, 2], prior=1.0)
    np.testing.assert_allclose(p.sum(axis=1), [2.0, 2.0])
    assert p[0, 0] < 30 / 20 and p[0, 3] > 0  # the prior pulls the counts towards uniform
    np.testing.assert_allclose(p[1], 0.5)  # a layer without tokens is uniform


def test_routing_imports_neither_planning_nor_llama():
    import ast
    from pathlib import Path

    root = Path(rs.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("hybrid_gguf.planning", "hybrid_gguf.llama", "hybrid_gguf.bench",
                                            "llama_cpp")), f"{path.name} imports {name}"
