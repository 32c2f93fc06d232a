"""A wheel of hybrid-gguf works on its own: built here, installed with its dependencies into
a fresh virtualenv next to the already built backend wheel, run from outside the checkout.

Needs PyPI (or pip's cache) for the dependencies and setuptools, and the backend wheel that
`make setup` cached; it never compiles llama-cpp-python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from hybrid_gguf import backend

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def backend_wheel(tmp_path_factory) -> Path:
    # the same key function the build uses: the wheel `make setup` cached for this patch and flags
    cfg = backend.config()
    wheel = backend.cached_wheel(cfg)
    if wheel is None:
        pytest.skip(f"no cached backend wheel in {cfg.wheel_dir}; run `make setup` (or "
                    "`hybrid-gguf backend install --wheel-only`) first")
    # a wheel cached before the version label existed is labeled in a scratch copy, so the
    # test leaves the user's cache as it found it
    return backend.labeled_wheel(wheel, cfg, tmp_path_factory.mktemp("backend"))


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # build isolation: pyproject asks for setuptools>=77 (its license field), newer than
    # what a development venv may carry
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO])
    (wheel,) = out.glob("hybrid_gguf-*.whl")
    return wheel


def test_wheel_carries_what_the_checkout_has(project_wheel):
    with zipfile.ZipFile(project_wheel) as z:
        names = set(z.namelist())
        # symlinks in the checkout arrive as the files they point to
        assert z.read("hybrid_gguf/data/models.yaml") == (REPO / "models.yaml").read_bytes()
        assert z.read("hybrid_gguf/backend/llama-cpp-hybrid.patch") == \
            (REPO / "patches" / "llama-cpp-hybrid.patch").read_bytes()
    for name in ("hybrid_gguf/llama/native/recorder.c", "hybrid_gguf/llama/native/include/ggml.h",
                 "hybrid_gguf/llama/native/include/ggml-backend.h", "hybrid_gguf/llama/native/include/ggml-alloc.h",
                 "hybrid_gguf/llama/native/include/LICENSE", "hybrid_gguf/data/tiny-moe-stdlib.gguf",
                 "hybrid_gguf/backend/__main__.py", "hybrid_gguf/commands/doctor.py"):
        assert name in names, name


def test_fresh_venv_runs_and_doctors(project_wheel, backend_wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, exe = env_dir / "bin" / "python", env_dir / "bin" / "hybrid-gguf"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HYBRID_GGUF_CACHE", "HYBRID_GGUF_MODELS_YAML",
                        "HYBRID_GGUF_GGML_INCLUDE")}
    env.update(HYBRID_GGUF_HOME=str(tmp_path / "home"), HYBRID_GGUF_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # the backend wheel satisfies the llama-cpp-python==0.3.36 pin, so pip compiles nothing
    _run([py, "-m", "pip", "install", "-q", backend_wheel, project_wheel], env=env)
    listed = _run([py, "-m", "pip", "list"], env=env).stdout
    assert f"0.3.36+{backend.local_version(True)}" in listed
    _run([py, "-m", "pip", "check"], env=env)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert _run([exe, "--version"], env=env, cwd=cwd).stdout.strip() == "hybrid-gguf 0.1.0"
    res = _run([exe, "run", "-p", "hi", "-n", "4", "--no-record"], env=env, cwd=cwd)
    assert "generated 4 tok" in res.stdout + res.stderr
    doc = subprocess.run([exe, "doctor"], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert doc.returncode == 0, doc.stdout + doc.stderr
    assert "hybrid-patched" in doc.stdout and "recorder  builds" in doc.stdout
    assert "no problems found" in doc.stdout
    # the recorder was compiled from the shipped headers: nothing was downloaded
    assert not (tmp_path / "home" / "cache" / "sdist").exists()
