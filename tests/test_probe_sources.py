"""The C probes under scripts/ that the GPU machine builds (`gpu_eval.sh cpumoe`) compile against
the patched tree's ggml headers here, so a change to a probe does not first fail on a lease."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import nvrtc_check  # noqa: E402

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def include(tmp_path_factory):
    try:
        return nvrtc_check.patched_tree(tmp_path_factory.mktemp("sdist")) / "ggml" / "include"
    except FileNotFoundError as exc:
        pytest.skip(f"needs the cached llama-cpp-python sdist: {exc}")


def compile_probe(include: Path, source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CC, "-fsyntax-only", "-Wall", "-Werror", "-fopenmp", f"-I{include}", str(source)],
                          capture_output=True, text=True, timeout=120)


def test_the_cpu_moe_probe_compiles(include):
    proc = compile_probe(include, REPO / "scripts" / "cpu_moe_probe.c")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_weighted_sum_probe_compiles(include):
    proc = compile_probe(include, REPO / "scripts" / "weighted_sum_probe.c")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_broken_probe_fails_the_check(include, tmp_path):
    """Not vacuous: the probe with a call to a function ggml does not have fails."""
    text = (REPO / "scripts" / "cpu_moe_probe.c").read_text()
    broken = tmp_path / "cpu_moe_probe.c"
    broken.write_text(text.replace("ggml_backend_cpu_init()", "ggml_backend_cpu_init_missing()", 1))
    assert compile_probe(include, broken).returncode != 0
