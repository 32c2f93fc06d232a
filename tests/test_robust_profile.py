"""Issue 13: routing profiles with absurd content are ProfileCorrupt (one line), a profile
of another model is moved aside with a notice that names it, and moved-aside files do not
pile up."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.routing.profile import KEEP_ASIDE, ProfileCorrupt, ProfileStore, RoutingProfile

L, E, K = 3, 6, 2
FP = "synthfp0123"


def make(fp: str = FP, seed: int = 0) -> RoutingProfile:
    rng = np.random.default_rng(seed)
    cp = rng.integers(0, 50, size=(L, E))
    return RoutingProfile(fp, "qwen3moe", L, E, K, cp, cp * 0, cp.sum(1) / K, np.zeros(L), sessions=1)


def corrupt_text(tmp_path, edit) -> str:
    d = make().to_dict()
    edit(d)
    return json.dumps(d)


def load_text(tmp_path, text: str):
    path = tmp_path / "p.json"
    path.write_text(text)
    return RoutingProfile.load(path)


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(sessions=-2), "sessions"),
    (lambda d: d.update(sessions=1.5), "sessions"),
    (lambda d: d.update(sessions="3"), "sessions"),
    (lambda d: d.update(sessions=10**400), "sessions"),
    (lambda d: d["counts"]["prompt"][0].__setitem__(0, -1), "counts"),
    (lambda d: d["counts"]["prompt"][0].__setitem__(0, 10**400), "count"),
    (lambda d: d["counts"]["prompt"][0].__setitem__(0, "7"), "count"),
    (lambda d: d["counts"]["prompt"][0].__setitem__(0, True), "count"),
    (lambda d: d["tokens_per_layer"].__setitem__("decode", [1e300, 0, 0]), "count"),
    (lambda d: d.update(n_layer=10**400), "n_layer"),
    (lambda d: d.update(n_layer=10**7), "n_layer"),
    (lambda d: d.update(labels={"x": -1}), "labels"),
    (lambda d: d.update(decay=-1), "decay"),
])
def test_absurd_numbers_are_corrupt(tmp_path, edit, fragment):
    with pytest.raises(ProfileCorrupt) as info:
        load_text(tmp_path, corrupt_text(tmp_path, edit))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_huge_integer_literal_in_the_file(tmp_path):
    text = make().save(tmp_path / "ok.json").read_text()
    first = json.loads(text)["counts"]["prompt"][0][0]
    bad = text.replace(f"[{first},", "[" + "9" * 400 + ",", 1)
    assert bad != text
    with pytest.raises(ProfileCorrupt):
        load_text(tmp_path, bad)


def test_deeply_nested_json(tmp_path):
    with pytest.raises(ProfileCorrupt, match="nest"):
        load_text(tmp_path, '{"labels": ' + "[" * 100000 + "]" * 100000 + "}")


def test_a_profile_of_another_model_is_named_with_what_to_do(tmp_path):
    store = ProfileStore(tmp_path)
    make("otherfp999").save(store.path_for(FP))
    for call in (lambda: store.load(FP), lambda: store.merge_session(make())):
        with pytest.raises(HybridError) as info:
            call()
        msg = str(info.value)
        assert "another model" in msg and str(store.path_for(FP)) in msg and "move that file aside" in msg
    assert store.path_for(FP).exists()  # a valid profile is the user's to move, not ours


def test_moved_aside_files_are_pruned(tmp_path):
    store = ProfileStore(tmp_path)
    path = store.path_for(FP)
    moved = []
    for i in range(KEEP_ASIDE + 4):  # several within one second: names must still differ
        path.write_text("{ not json")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert store.load(FP) is None
        moved.append(str(caught[0].message).split("moved it aside to ")[1].split(" and starting")[0])
    aside = sorted(str(p) for p in tmp_path.glob(f"{FP}.json.corrupt-*"))
    assert len(set(moved)) == KEEP_ASIDE + 4
    assert aside == sorted(moved[-KEEP_ASIDE:])  # the newest are kept


def test_profile_store_root_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(HybridError, match="not a directory"):
        ProfileStore(f).load(FP)
    with pytest.raises(HybridError, match="not a directory"):
        ProfileStore(f).merge_session(make())
