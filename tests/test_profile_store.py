"""Routing profile files and the per-fingerprint store: merging, locking, crash safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.routing.profile import (
    SLOW_WRITE_ENV,
    ProfileCorrupt,
    ProfileStore,
    RoutingProfile,
)

REPO = Path(__file__).resolve().parents[1]
L, E, K = 3, 6, 2
FP = "synthfp0123"


def make_delta(seed: int, fp: str = FP, label: str = "w") -> RoutingProfile:
    rng = np.random.default_rng(seed)
    cp = rng.integers(0, 50, size=(L, E))
    cd = rng.integers(0, 50, size=(L, E))
    return RoutingProfile(
        fp, "qwen3moe", L, E, K, cp, cd,
        cp.sum(1) / K, cd.sum(1) / K, sessions=1, labels={label: 1},
    )


def test_roundtrip_is_exact_and_readable(tmp_path):
    p = make_delta(1)
    path = p.save(tmp_path / "p.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "hybrid-gguf-routing-profile" and raw["version"] == 1
    assert raw["counts"]["prompt"] == p.counts_prompt.astype(int).tolist()  # ints stay ints
    back = RoutingProfile.load(path)
    np.testing.assert_array_equal(back.counts, p.counts)
    np.testing.assert_array_equal(back.tokens_per_layer, p.tokens_per_layer)
    assert (back.fingerprint, back.n_layer, back.n_expert, back.n_expert_used) == (FP, L, E, K)
    assert back.labels == {"w": 1} and back.sessions == 1


def test_merge_sums_and_decay(tmp_path):
    store = ProfileStore(tmp_path)
    a, b = make_delta(1, label="a"), make_delta(2, label="b")
    store.merge_session(a)
    m = store.merge_session(b)
    np.testing.assert_array_equal(m.counts_prompt, a.counts_prompt + b.counts_prompt)
    assert m.sessions == 2 and m.labels == {"a": 1, "b": 1}
    m2 = store.merge_session(a, decay=0.5)
    np.testing.assert_allclose(m2.counts_decode, 0.5 * (a.counts_decode + b.counts_decode)
                               + a.counts_decode)
    assert store.load(FP).labels == {"a": 2, "b": 1}
    with pytest.raises(HybridError):
        store.merge_session(a, decay=0.0)


def _merge_worker(args):
    root, seeds = args
    store = ProfileStore(root)
    for s in seeds:
        store.merge_session(make_delta(s))
    return len(seeds)


def test_concurrent_merges_lose_nothing(tmp_path):
    n_proc, per_proc = 4, 12
    jobs = [(str(tmp_path), list(range(p * per_proc, (p + 1) * per_proc))) for p in range(n_proc)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(n_proc) as pool:
        assert sum(pool.map(_merge_worker, jobs)) == n_proc * per_proc
    expect = sum(make_delta(s).counts for s in range(n_proc * per_proc))
    got = ProfileStore(tmp_path).load(FP)
    np.testing.assert_array_equal(got.counts, expect)
    assert got.sessions == n_proc * per_proc
    assert not list(tmp_path.glob(".*tmp-*"))  # no temp files left behind


def test_writer_killed_mid_write_leaves_previous_profile(tmp_path):
    store = ProfileStore(tmp_path)
    before = store.merge_session(make_delta(1))
    code = (
        "import sys; from tests.test_profile_store import make_delta;"
        "from hybrid_gguf.routing.profile import ProfileStore;"
        f"ProfileStore(sys.argv[1]).merge_session(make_delta(2))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), **{SLOW_WRITE_ENV: "60"})
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".*tmp-*")):  # half the new file is written
            assert child.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    after = store.load(FP)  # the lock died with the writer: this must not block
    np.testing.assert_array_equal(after.counts, before.counts)
    assert after.sessions == before.sessions
    merged = store.merge_session(make_delta(3))  # and the store keeps working
    np.testing.assert_array_equal(merged.counts, before.counts + make_delta(3).counts)
    assert not list(tmp_path.glob(".*tmp-*"))  # the dead writer's temp file was cleaned


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'{"format": "other"}',
                                     b"\xff\xfe\x00"])
def test_corrupt_file_moved_aside(tmp_path, content):
    store = ProfileStore(tmp_path)
    path = store.path_for(FP)
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="moved it aside"):
        assert store.load(FP) is None
    aside = list(tmp_path.glob(path.name + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not path.exists()
    m = store.merge_session(make_delta(1))  # starts afresh
    assert m.sessions == 1


def test_bad_shape_in_file_is_corrupt(tmp_path):
    d = make_delta(1).to_dict()
    d["counts"]["prompt"] = d["counts"]["prompt"][:-1]
    with pytest.raises(ProfileCorrupt):
        RoutingProfile.from_dict(d)
    d = make_delta(1).to_dict()
    d["counts"]["decode"][0][0] = -1
    with pytest.raises(ProfileCorrupt):
        RoutingProfile.from_dict(d)


def test_fingerprint_mismatch_refused(tmp_path):
    store = ProfileStore(tmp_path)
    other = make_delta(1, fp="otherfp")
    other.save(store.path_for(FP))  # a file under FP's name that belongs to another model
    with pytest.raises(HybridError, match="another model"):
        store.load(FP)
    with pytest.raises(HybridError, match="another model"):
        store.merge_session(make_delta(2))
    assert store.path_for(FP).exists()  # refused, not moved aside
    with pytest.raises(HybridError, match="another model"):
        RoutingProfile.load(store.path_for(FP), expected_fingerprint=FP)
    with pytest.raises(HybridError, match="another model"):
        make_delta(1).merged(make_delta(2, fp="x"))


def test_shape_mismatch_refused(tmp_path):
    store = ProfileStore(tmp_path)
    store.merge_session(make_delta(1))
    d = make_delta(2)
    wrong = RoutingProfile(FP, "qwen3moe", L, E, K + 1, d.counts_prompt, d.counts_decode,
                           d.tokens_prompt, d.tokens_decode, sessions=1)
    with pytest.raises(HybridError, match="shape"):
        store.merge_session(wrong)


def test_unsafe_fingerprint_gets_a_safe_file_name(tmp_path):
    store = ProfileStore(tmp_path)
    fp = "../../etc/passwd"
    path = store.path_for(fp)
    assert path.parent == tmp_path and "/" not in path.name[:-5]
    store.merge_session(make_delta(1, fp=fp))
    assert store.load(fp).fingerprint == fp


def test_store_root_follows_home_env(tmp_path, monkeypatch):
    # profiles are user data: HYBRID_GGUF_HOME moves them, HYBRID_GGUF_CACHE does not
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path / "c"))
    assert ProfileStore().root == tmp_path / "h" / "profiles"
