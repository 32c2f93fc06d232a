"""`hybrid-gguf doctor`: the report's sections and its problems with their fixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hybrid_gguf import doctor
from hybrid_gguf.llama import hybrid as hybrid_backend


@pytest.fixture(autouse=True)
def _home_decides_the_cache(monkeypatch):
    # conftest pins HYBRID_GGUF_CACHE for the run; these tests check where HOME alone puts it
    monkeypatch.delenv("HYBRID_GGUF_CACHE", raising=False)


def run_doctor(*args, env):
    import os

    return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "doctor", *args],
                          capture_output=True, text=True, env=dict(os.environ, **env), timeout=300)


def test_json_report_of_this_installation(tmp_path):
    res = run_doctor("--json", env={"HYBRID_GGUF_HOME": str(tmp_path)})
    rep = json.loads(res.stdout)
    assert res.returncode == (1 if rep["problems"] else 0), res.stderr
    b = rep["backend"]
    assert b["installed"] and b["version"].startswith("0.3.36") and b["kind"] in ("CPU", "CUDA")
    assert b["patched"] == hybrid_backend.capability().per_expert
    assert isinstance(rep["cpu"]["flags"], list) and isinstance(rep["cpu"]["extra_buffer_types"], list)
    # the test process has neither OpenMP variable unless the caller set one (run_doctor's env)
    wait = rep["cpu"]["openmp_wait"]
    if "OMP_WAIT_POLICY" not in os.environ and os.environ.get("GOMP_SPINCOUNT") in (None, "20000000"):
        assert wait["GOMP_SPINCOUNT"] == "20000000"
    assert rep["recorder"]["builds"], rep["recorder"]
    names = {p["name"]: p for p in rep["paths"]}
    assert names["profiles"]["path"] == str(tmp_path / "profiles")
    assert names["wheels"]["path"] == str(tmp_path / "cache" / "wheels")
    assert any(d["type"] == "cpu" for d in rep["devices"])
    assert all(set(p) == {"problem", "fix"} for p in rep["problems"])


def test_text_report_says_each_problem_and_its_fix(tmp_path):
    # profiles left in the cache by an older version are a problem with a command to fix it
    env = {"HYBRID_GGUF_HOME": str(tmp_path / "home"), "HYBRID_GGUF_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache" / "profiles").mkdir(parents=True)
    res = run_doctor("--no-recorder", env=env)
    assert res.returncode == 1
    assert "backend" in res.stdout and "extra buffer types" in res.stdout
    assert "profiles of an older hybrid-gguf" in res.stdout
    assert f"fix: mkdir -p {tmp_path / 'home' / 'profiles'}" in res.stdout


def test_stock_backend_is_a_problem(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    monkeypatch.setattr(hybrid_backend, "capability",
                        lambda: hybrid_backend.Capability(False, 0, hybrid_backend.STOCK_NOTICE))
    monkeypatch.setenv("HYBRID_GGUF_CUDA", "0")
    rep = doctor.diagnose(build_recorder=False)
    assert rep.backend["patched"] is False
    assert [p.fix for p in rep.problems] == ["hybrid-gguf backend install"]


def test_stale_patch_is_a_problem(monkeypatch, tmp_path):
    from hybrid_gguf import backend

    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    monkeypatch.setenv("HYBRID_GGUF_CUDA", "0")
    monkeypatch.setattr(hybrid_backend, "capability", lambda: hybrid_backend.Capability(True, 2, "ok"))
    monkeypatch.setattr(backend, "installed_build_info", lambda: {"patch_sha256": "0" * 64, "cmake_args": []})
    rep = doctor.diagnose(build_recorder=False)
    assert any("another version of the hybrid patch" in p.problem for p in rep.problems)
