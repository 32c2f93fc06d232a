"""`hybrid-gguf backend install`: build the hybrid-patched llama-cpp-python into this environment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

backend_app = typer.Typer(
    help="The llama-cpp-python backend: build and install the hybrid-patched wheel.",
    no_args_is_help=True,
)


@backend_app.command("install")
def install_command(
    cuda: Optional[bool] = typer.Option(None, "--cuda/--cpu",
                                        help="CUDA or CPU build (default: CUDA when nvcc and a GPU are present)"),
    cuda_arch: Optional[str] = typer.Option(None, "--cuda-arch",
                                            help="CMAKE_CUDA_ARCHITECTURES (default: native, or $HYBRID_GGUF_CUDA_ARCH)"),
    portable: bool = typer.Option(False, "--portable", help="CPU build without -march=native"),
    stock: bool = typer.Option(False, "--stock", help="build without the hybrid patch (for A/B runs)"),
    sdist: Optional[Path] = typer.Option(None, "--sdist", help="llama-cpp-python sdist to build from "
                                                               "(default: downloaded from PyPI once, then cached)"),
    no_build_isolation: bool = typer.Option(False, "--no-build-isolation",
                                            help="use the build tools already installed (offline builds)"),
    wheel_only: bool = typer.Option(False, "--wheel-only", help="build and cache the wheel, do not install it"),
) -> None:
    """Build llama-cpp-python 0.3.36 with the hybrid patch (or take the cached wheel) and
    install it into this Python as 0.3.36+hybrid.N. CMAKE_ARGS from the environment are kept."""
    import shlex
    import subprocess

    from hybrid_gguf import backend
    from hybrid_gguf.errors import HybridError

    try:
        backend.install(cuda=cuda, cuda_arch=cuda_arch, portable=portable, stock=stock, sdist=sdist,
                        no_build_isolation=no_build_isolation, wheel_only=wheel_only, python=sys.executable)
    except subprocess.CalledProcessError as exc:
        raise HybridError(f"{shlex.join(map(str, exc.cmd))} failed with status {exc.returncode} "
                          "(its output is above)") from None


def register(app: typer.Typer) -> None:
    app.add_typer(backend_app, name="backend")
