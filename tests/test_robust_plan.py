"""Issue 13: plan files are bounded and parsed safely: no aliases, no tags, no deep nesting,
no huge lists; bad keys and sizes are one line that names the place."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from hybrid_gguf.planning import memory as mm
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.plan import MAX_PLAN_BYTES, Plan
from hybrid_gguf.planning.planner import make_plan
from hybrid_gguf.routing.profile import RoutingProfile


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=3, n_expert=8)
    return path, read_inventory(path)


@pytest.fixture(scope="module")
def plan_text(model):
    _, inv = model
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 100, size=(inv.n_layer, inv.n_expert)).astype(float)
    prof = RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used, counts,
                          np.zeros_like(counts), counts.sum(1) / 2, np.zeros(inv.n_layer), sessions=1)
    opts = mm.MemoryOptions(2048, compute_bytes=mm.MIB, margin_bytes=64 * 1024)
    base = mm.predict_memory(inv, None, opts, gpus=["GPU"]).gpu_bytes
    plan = make_plan(inv, int(base * 0.8), 2048, prof, memory=opts)
    return plan.to_yaml()


def refused(text, inv, *fragments, seconds=2.0):
    t0 = time.monotonic()
    with pytest.raises(HybridError) as info:
        Plan.from_yaml(text, inv, source="p.yaml")
    assert time.monotonic() - t0 < seconds
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_the_fixture_plan_parses(plan_text, model):
    Plan.from_yaml(plan_text, model[1])


def test_alias_bomb_is_refused(plan_text, model):
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        bomb.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    text = plan_text + "\n".join(bomb) + "\n"
    refused(text, model[1], "p.yaml:", "alias")


def test_anchor_alone_is_refused(plan_text, model):
    text = plan_text.replace("notes:", "notes: &n", 1)
    refused(text, model[1], "anchor")


@pytest.mark.parametrize("tagged", ["!!python/object:os.system x", "!custom 5", "!!binary aGVsbG8="])
def test_tags_are_refused(plan_text, model, tagged):
    import re

    text, n = re.subn(r"^created: .*$", f"created: {tagged}", plan_text, count=1, flags=re.M)
    assert n == 1
    refused(text, model[1], "p.yaml:", "tag")


def test_a_non_hashable_key_names_its_line(plan_text, model):
    text = plan_text.replace("hot:\n", "hot:\n  ? [1, 2]\n  : [3]\n", 1)
    line = text.splitlines().index("  ? [1, 2]") + 1
    refused(text, model[1], f"p.yaml:{line}:")


def test_deep_nesting_is_refused(plan_text, model):
    text = plan_text + "deep: " + "[" * 10000 + "]" * 10000 + "\n"
    refused(text, model[1], "nest")


def test_a_million_expert_ids_are_refused_fast(plan_text, model):
    _, inv = model
    layer = 0
    ids = ", ".join(["1"] * 10**6)
    text = plan_text.replace("hot:\n", f"hot:\n  {layer}: [{ids}]\n", 1)
    refused(text, inv, "p.yaml")


def test_a_layer_listing_more_ids_than_it_has_experts(plan_text, model):
    _, inv = model
    import re

    text = re.sub(r"^hot:\n(  .*\n)*", "hot:\n  0: [" + ", ".join(["1"] * 50) + "]\n", plan_text, flags=re.M)
    refused(text, inv, "p.yaml:", "50 expert ids", "8 experts")


def test_n_ubatch_is_bounded(plan_text, model):
    import re

    text = re.sub(r"n_ubatch: \d+", "n_ubatch: 1000000000", plan_text)
    refused(text, model[1], "p.yaml:", "n_ubatch", "at most")


def test_load_refuses_special_and_huge_files(tmp_path, model):
    """Run in a child with a memory cap and a timeout: reading /dev/zero grows without end
    and opening a FIFO waits for a writer, so a regression must not take the run with it."""
    import resource
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(MAX_PLAN_BYTES + 1)
    os.mkfifo(tmp_path / "fifo")
    code = textwrap.dedent(f"""
        from hybrid_gguf.errors import HybridError
        from hybrid_gguf.planning.plan import Plan
        for path in ("/dev/zero", {str(tmp_path)!r}, {str(tmp_path / "fifo")!r}, {str(big)!r}):
            try:
                Plan.load(path)
            except HybridError as exc:
                print("refused:", exc)
    """)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=cap, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 4, res.stdout
    assert all("not a regular file" in line for line in lines[:3]), lines
    assert "larger than" in lines[3]


def test_a_realistic_large_plan_still_loads_quickly(plan_text, tiny_model_factory):
    """61 layers x 256 experts, every expert hot: the biggest real hot sets parse in well under a second."""
    import re

    path = tiny_model_factory("qwen3moe", n_layer=61, n_expert=256, n_expert_used=8, n_embd=64,
                              n_ff_exp=16, n_head=2, n_head_kv=1, head_dim=16)
    inv = read_inventory(path)
    text = plan_text.replace(read_inventory_fp(plan_text), inv.fingerprint)
    hot = "hot:\n" + "".join(f"  {l}: [{', '.join(map(str, range(256)))}]\n" for l in range(61))
    text = re.sub(r"^hot:\n(  .*\n)*", hot, text, flags=re.M)
    text = re.sub(r"n_layer: \d+", "n_layer: 61", text)
    text = re.sub(r"n_expert: \d+", "n_expert: 256", text)
    t0 = time.monotonic()
    plan = Plan.from_yaml(text, inv)
    assert sum(len(v) for v in plan.hot.values()) == 61 * 256
    assert time.monotonic() - t0 < 3.0


def read_inventory_fp(text):
    import re

    return re.search(r"fingerprint: (\S+)", text).group(1)
