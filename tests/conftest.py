"""Shared fixtures: tiny synthetic models, built once per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# the repository root: scripts.tiny_moe (the training tools, outside the package)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_gguf import paths, synth  # noqa: E402

# Tests never touch the user's profiles and plans: the run gets a data directory of its own.
# The cache (compiled recorder, synthetic models, wheels) stays shared; fixed before HOME moves.
os.environ.setdefault("HYBRID_GGUF_CACHE", str(paths.cache_dir()))
os.environ["HYBRID_GGUF_HOME"] = tempfile.mkdtemp(prefix="hybrid-gguf-test-home-")

# Architecture name (as tests say it) -> tiny preset.  "dense" is a non-MoE llama.
TINY_PRESETS = {
    "qwen3moe": "tiny",
    "qwen2moe": "tiny-qwen2moe",
    "llama": "tiny-mixtral",
    "mixtral": "tiny-mixtral",
    "gpt-oss": "tiny-gpt-oss",
    "dense": "tiny-dense",
}
SYNTH_ARCHS = ("qwen3moe", "qwen2moe", "llama", "gpt-oss")


def tiny_spec(arch: str = "qwen3moe", **overrides) -> synth.SynthSpec:
    """The SynthSpec that tiny_model_factory(arch, **overrides) builds."""
    return synth.preset(TINY_PRESETS[arch], **overrides)


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> Path:
    """Session-wide directory of synthetic models (kept for the whole run)."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def tiny_model_factory(synth_cache):
    """callable(arch="qwen3moe", **SynthSpec overrides) -> Path of a tiny GGUF.

    arch: qwen3moe, qwen2moe, llama (alias mixtral), gpt-oss, or dense.  Identical
    requests share one file; `factory.spec(arch, **overrides)` gives the spec.
    """

    def make(arch: str = "qwen3moe", **overrides) -> Path:
        return synth.ensure_synthetic(tiny_spec(arch, **overrides), synth_cache)

    make.spec = tiny_spec
    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    """The default tiny qwen3moe model (F32, 2 layers, 8 experts top-2)."""
    return tiny_model_factory("qwen3moe")


@pytest.fixture(scope="session")
def require_patch_v3():
    """The backend replays routing traces (hybrid patch version 3). Under
    HYBRID_GGUF_REQUIRE_PATCHED=1 (make test) a missing patch fails instead of skipping."""
    import os

    pytest.importorskip("llama_cpp")
    from hybrid_gguf.llama import hybrid as hybrid_backend

    version = hybrid_backend.capability().version
    if version < 3:
        msg = f"the backend's hybrid patch is version {version}; routing traces need version 3"
        if os.environ.get("HYBRID_GGUF_REQUIRE_PATCHED") == "1":
            pytest.fail(msg + " (rebuild with `hybrid-gguf backend install` or `make setup`)")
        pytest.skip(msg)
    return version
