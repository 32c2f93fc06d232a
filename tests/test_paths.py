"""paths.py: one module knows every location; HYBRID_GGUF_HOME and HYBRID_GGUF_CACHE move them."""

from __future__ import annotations

from hybrid_gguf import paths, synth
from hybrid_gguf import autoplan
from hybrid_gguf.planning import calibration
from hybrid_gguf.routing import profile
from hybrid_gguf.llama.native import build


def test_home_moves_data_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    monkeypatch.delenv("HYBRID_GGUF_CACHE", raising=False)
    assert paths.data_dir() == tmp_path
    assert profile.default_store_root() == tmp_path / "profiles"
    assert autoplan.plans_dir() == tmp_path / "plans"
    # the rebuildable files go to DIR/cache
    assert paths.cache_dir() == tmp_path / "cache"
    assert synth.default_cache_dir() == tmp_path / "cache" / "synth"
    assert calibration.calibration_path() == tmp_path / "cache" / "calibration.json"
    assert build.cache_root() == tmp_path / "cache"


def test_cache_env_moves_only_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path / "c"))
    assert paths.wheels_dir() == tmp_path / "c" / "wheels"
    assert paths.plans_dir() == tmp_path / "home" / "plans"


def test_defaults_are_platformdirs(monkeypatch, tmp_path):
    monkeypatch.delenv("HYBRID_GGUF_HOME", raising=False)
    monkeypatch.delenv("HYBRID_GGUF_CACHE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    assert paths.profiles_dir() == tmp_path / "share" / "hybrid-gguf" / "profiles"
    assert paths.synth_dir() == tmp_path / "xc" / "hybrid-gguf" / "synth"


def test_legacy_dirs_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path / "c"))
    assert paths.legacy_data_dirs() == []
    (tmp_path / "c" / "profiles").mkdir(parents=True)
    (tmp_path / "c" / "profiles" / "a.json").write_bytes(b"x" * 10)
    assert paths.legacy_data_dirs() == [tmp_path / "c" / "profiles"]
    assert paths.tree_size(tmp_path / "c") == 10
    assert paths.tree_size(tmp_path / "nothing") == 0
    assert set(paths.all_paths()) >= {"data", "profiles", "plans", "cache", "wheels"}
