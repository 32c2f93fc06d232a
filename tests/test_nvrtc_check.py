"""scripts/nvrtc_check.py: the patch's hand-off kernels (ggml-cuda/hybrid-handoff.cu) compiled for
the GPU without a GPU or a CUDA compiler, by NVRTC from pip. The test extras install it on Linux
x86-64; elsewhere these tests skip."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import nvrtc_check  # noqa: E402

NVRTC = nvrtc_check.load_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="needs NVRTC (pip nvidia-cuda-nvrtc-cu12; the test extras "
                                                     "install it on Linux x86-64)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    try:
        return nvrtc_check.patched_tree(tmp_path_factory.mktemp("sdist"))
    except FileNotFoundError as exc:
        pytest.skip(f"needs the cached llama-cpp-python sdist: {exc}")


def test_the_patched_hand_off_kernels_compile_for_the_gpu(tree):
    ok, log, entries = nvrtc_check.compile_source(NVRTC, nvrtc_check.kernel_source(tree), "compute_90")
    assert ok, log
    assert set(entries) == {"k_hybrid_post", "k_hybrid_collect"}


def test_a_device_code_error_fails_the_check(tree, tmp_path):
    """The check is not vacuous: a kernel naming a slot field that does not exist fails."""
    for rel in (nvrtc_check.HANDOFF, nvrtc_check.GGML_H):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree / rel, tmp_path / rel)
    cu = tmp_path / nvrtc_check.HANDOFF
    text = cu.read_text()
    assert "ggml_hybrid_slot_header, ans)" in text
    cu.write_text(text.replace("ggml_hybrid_slot_header, ans)", "ggml_hybrid_slot_header, no_such_field)", 1))
    ok, log, _ = nvrtc_check.compile_source(NVRTC, nvrtc_check.kernel_source(tmp_path), "compute_90")
    assert not ok and "no_such_field" in log
