#!/usr/bin/env python3
"""Build and install llama-cpp-python with the hybrid-gguf patch of its vendored llama.cpp.

Steps: fetch the pinned sdist from PyPI (or take --sdist), apply patches/llama-cpp-hybrid.patch,
build a wheel with CMake flags for CPU or CUDA, cache it under
~/.cache/hybrid-gguf/wheels/<key>/ (key = version + patch hash + flags), and pip-install it
into --python. A cached wheel makes the next call take seconds instead of minutes.

  python scripts/build_backend.py                     # CPU, or CUDA when a GPU is visible
  python scripts/build_backend.py --cuda --cuda-arch 90
  python scripts/build_backend.py --stock             # unpatched, for A/B runs
  python scripts/build_backend.py --trim-sdist OUT    # small source tarball for the GPU machine
  python scripts/build_backend.py --dev-tree DIR      # incremental build for patch work (no wheel)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REPO_ROOT = Path(__file__).resolve().parent.parent
PATCH_PATH = REPO_ROOT / "patches" / "llama-cpp-hybrid.patch"

# Parts of the vendored llama.cpp the library build never reads; dropping them keeps the
# source small enough to travel (the full sdist is 73 MiB).
TRIM_DIRS = (
    "vendor/llama.cpp/models",
    "vendor/llama.cpp/docs",
    "vendor/llama.cpp/media",
    "vendor/llama.cpp/examples",
    "vendor/llama.cpp/tests",
    "vendor/llama.cpp/tools",
    "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/benches",
    "vendor/llama.cpp/pocs",
    "vendor/llama.cpp/scripts",
    "vendor/llama.cpp/grammars",
    "vendor/llama.cpp/ggml/src/ggml-vulkan",
    "vendor/llama.cpp/ggml/src/ggml-sycl",
    "vendor/llama.cpp/ggml/src/ggml-metal",
    "vendor/llama.cpp/ggml/src/ggml-opencl",
    "vendor/llama.cpp/ggml/src/ggml-cann",
    "vendor/llama.cpp/ggml/src/ggml-musa",
    "vendor/llama.cpp/ggml/src/ggml-webgpu",
    "vendor/llama.cpp/ggml/src/ggml-zdnn",
    "vendor/llama.cpp/ggml/src/ggml-hexagon",
    "vendor/llama.cpp/ggml/src/ggml-openvino",
    "docs",
    "examples",
    "tests",
    "docker",
)

COMMON_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)


def cache_root() -> Path:
    return Path(os.environ.get("HYBRID_GGUF_CACHE", Path.home() / ".cache" / "hybrid-gguf"))


def gpu_visible() -> bool:
    # nvcc alone is not enough: CI machines carry the toolkit without a GPU, and a CUDA
    # build there takes far longer than the CPU one for nothing.
    if os.environ.get("HYBRID_GGUF_CUDA") == "1":
        return True
    if os.environ.get("HYBRID_GGUF_CUDA") == "0":
        return False
    return shutil.which("nvcc") is not None and Path("/dev/nvidia0").exists()


def cmake_args(cuda: bool, cuda_arch: str, native: bool) -> list[str]:
    args = list(COMMON_CMAKE_ARGS)
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}", "-DGGML_NATIVE=OFF"]
    else:
        args.append(f"-DGGML_NATIVE={'ON' if native else 'OFF'}")
    return args


def build_key(patched: bool, args: list[str]) -> str:
    h = hashlib.sha256()
    h.update(LLAMA_CPP_PYTHON_VERSION.encode())
    h.update(PATCH_PATH.read_bytes() if patched else b"stock")
    h.update(" ".join(args).encode())
    return h.hexdigest()[:16]


def fetch_sdist() -> Path:
    sdist_dir = cache_root() / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)],
            check=True,
        )
    return sdist


def extract(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def apply_patch(src_root: Path) -> None:
    subprocess.run(["git", "apply", "--whitespace=nowarn", str(PATCH_PATH)], cwd=src_root, check=True)


def trim_sdist(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(fetch_sdist(), Path(tmp))
        for rel in TRIM_DIRS:
            shutil.rmtree(root / rel, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:gz") as tar:
            tar.add(root, arcname=root.name)
    print(f"trimmed sdist: {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def build_wheel(sdist: Path, patched: bool, args: list[str], wheel_dir: Path, no_isolation: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="hybrid-gguf-build-") as tmp:
        root = extract(sdist, Path(tmp))
        if patched:
            apply_patch(root)
        env = dict(os.environ, CMAKE_ARGS=" ".join(args))
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(root)]
        if no_isolation:
            cmd.insert(4, "--no-build-isolation")
        print(f"building llama-cpp-python ({'patched' if patched else 'stock'}): CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
        subprocess.run(cmd, check=True, env=env)
    (wheel,) = wheel_dir.glob("llama_cpp_python-*.whl")
    return wheel


def sync_tree(fresh: Path, dest: Path) -> int:
    """Make dest's files equal to fresh's, rewriting only the files whose bytes differ so the
    incremental build recompiles only what the patch changed. Returns the number written."""
    written = 0
    for src in fresh.rglob("*"):
        if src.is_dir():
            continue
        dst = dest / src.relative_to(fresh)
        data = src.read_bytes()
        if dst.exists() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        shutil.copymode(src, dst)
        written += 1
    return written


def dev_build(sdist: Path, tree: Path, args: list[str]) -> Path:
    """Patch development: a persistent patched source tree and CMake build directory under
    tree, rebuilt incrementally (seconds to a minute after a small patch change instead of a
    full wheel build). The libraries are installed into tree/src/llama_cpp/lib, so
    PYTHONPATH=tree/src imports this build. Not for users: it skips the wheel and its cache."""
    src, build = tree / "src", tree / "build"
    tree.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree) as tmp:
        fresh = extract(sdist, Path(tmp))
        apply_patch(fresh)
        print(f"dev tree: {sync_tree(fresh, src)} files changed", flush=True)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    if not (build / "CMakeCache.txt").exists():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                        f"-DSKBUILD_PLATLIB_DIR={tree / 'platlib'}", *args], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True)
    subprocess.run(["cmake", "--install", str(build)], check=True, stdout=subprocess.DEVNULL)
    return src


def install_wheel(wheel: Path, python: str) -> None:
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel)],
        check=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter to install into")
    ap.add_argument("--cuda", action="store_true", default=None, help="build with CUDA (default: when a GPU is visible)")
    ap.add_argument("--cpu", dest="cuda", action="store_false", help="build for CPU only")
    ap.add_argument("--cuda-arch", default=os.environ.get("HYBRID_GGUF_CUDA_ARCH", "native"))
    ap.add_argument("--portable", action="store_true", help="CPU build without -march=native")
    ap.add_argument("--stock", action="store_true", help="do not apply the hybrid patch")
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist (full or trimmed) to build from")
    ap.add_argument("--no-build-isolation", action="store_true", help="use already-installed build deps (offline)")
    ap.add_argument("--wheel-only", action="store_true", help="build/cache the wheel but do not install it")
    ap.add_argument("--trim-sdist", type=Path, metavar="OUT", help="write a trimmed sdist tarball and exit")
    ap.add_argument("--dev-tree", type=Path, metavar="DIR",
                    help="incremental build into DIR for patch work; then use PYTHONPATH=DIR/src")
    opts = ap.parse_args()

    if opts.trim_sdist:
        trim_sdist(opts.trim_sdist)
        return 0

    cuda = gpu_visible() if opts.cuda is None else opts.cuda
    if cuda and shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        print("error: a CUDA build was requested (--cuda or HYBRID_GGUF_CUDA=1) but nvcc is not on "
              "PATH; install the CUDA toolkit or set CUDACXX, or build for the CPU with --cpu",
              file=sys.stderr)
        return 2
    args = cmake_args(cuda, opts.cuda_arch, native=not opts.portable)
    patched = not opts.stock
    if opts.dev_tree:
        if not patched:
            print("error: --dev-tree builds the patched tree; use a wheel build for --stock", file=sys.stderr)
            return 2
        src = dev_build(opts.sdist or fetch_sdist(), opts.dev_tree, args)
        print(f"dev build ready: PYTHONPATH={src}")
        return 0
    key = build_key(patched, args)
    wheel_dir = cache_root() / "wheels" / f"{'hybrid' if patched else 'stock'}-{'cuda' if cuda else 'cpu'}-{key}"
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if wheels:
        wheel = wheels[0]
        print(f"using cached wheel {wheel}")
    else:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        sdist = opts.sdist or fetch_sdist()
        try:
            wheel = build_wheel(sdist, patched, args, wheel_dir, opts.no_build_isolation)
        except BaseException:
            shutil.rmtree(wheel_dir, ignore_errors=True)
            raise
    if not opts.wheel_only:
        install_wheel(wheel, opts.python)
    print(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({'hybrid-patched' if patched else 'stock'}, "
          f"{'CUDA' if cuda else 'CPU'}) ready: {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
