"""Files the installed package needs are inside it, not only in the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_gguf import models, paths
from hybrid_gguf.errors import HybridError

REPO = Path(__file__).resolve().parent.parent


def test_models_yaml_is_package_data_and_the_top_level_file():
    shipped = paths.package_file("data", "models.yaml")
    assert models.models_yaml_path() == shipped
    # one source: the developers' top-level models.yaml is what the package ships
    assert shipped.read_bytes() == (REPO / "models.yaml").read_bytes()
    data = models.load_models_yaml()
    assert {"synth-tiny", "synth-small", data["default"]} <= set(data["bundled"])


def test_patch_in_package_is_the_developers_patch():
    from hybrid_gguf import backend

    assert backend.PATCH_PATH.read_bytes() == (REPO / "patches" / "llama-cpp-hybrid.patch").read_bytes()


def test_missing_models_yaml_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_MODELS_YAML", str(tmp_path / "none.yaml"))
    with pytest.raises(HybridError, match="HYBRID_GGUF_MODELS_YAML"):
        models.resolve_model("synth-tiny")


def test_bundled_model_file_resolves_from_the_package():
    res = models.resolve_model(None)
    assert res.path.is_file()
