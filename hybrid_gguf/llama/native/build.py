"""Compile the native routing recorder against the installed llama-cpp-python.

The shared object links against the `libggml-base.so.0` that llama_cpp ships in
`llama_cpp/lib/` (the same SONAME libllama needs, so the dynamic loader reuses the copy
llama_cpp already mapped) and is cached under
`<cache root>/native/<hash of source + headers + library path>/`.

Headers come from $HYBRID_GGUF_GGML_INCLUDE, else `include/` next to this file: ggml.h,
ggml-backend.h and ggml-alloc.h copied unchanged from llama-cpp-python 0.3.36's vendored
llama.cpp (MIT, its LICENSE beside them), so building never downloads anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("recorder.c")
INCLUDE_DIR = Path(__file__).with_name("include")
HEADERS = ("ggml.h", "ggml-backend.h", "ggml-alloc.h")
HEADERS_VERSION = "0.3.36"  # the llama-cpp-python whose vendored ggml/include they are
LIB_NAME = "libggml-base.so.0"


class BuildError(Exception):
    """The recorder cannot be built here; the message says why."""


@dataclass(frozen=True)
class BuiltLibrary:
    path: Path
    lib_dir: Path
    include_dir: Path


def cache_root() -> Path:
    from hybrid_gguf import paths

    return paths.cache_dir()


def llama_lib_dir() -> Path:
    """llama_cpp/lib of the installed wheel; importing it also maps libggml-base."""
    try:
        import llama_cpp.llama_cpp as bindings
    except Exception as exc:  # ImportError, OSError from a broken wheel
        raise BuildError(f"llama_cpp cannot be imported: {exc}") from exc
    lib_dir = Path(bindings._base_path).resolve()
    if not (lib_dir / LIB_NAME).exists():
        raise BuildError(f"{LIB_NAME} not found in {lib_dir}")
    return lib_dir


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        # imported from a source tree (scripts/build_backend.py --dev-tree): no dist-info
        import llama_cpp

        return llama_cpp.__version__


def _has_headers(d: Path) -> bool:
    return all((d / h).is_file() for h in HEADERS)


def find_include_dir(version: Optional[str] = None) -> Path:
    """$HYBRID_GGUF_GGML_INCLUDE, else the headers shipped in this package (they are
    llama-cpp-python 0.3.36's, so another installed version is refused: its structs may
    differ)."""
    env = os.environ.get("HYBRID_GGUF_GGML_INCLUDE")
    if env:
        if not _has_headers(Path(env)):
            raise BuildError(f"HYBRID_GGUF_GGML_INCLUDE={env} lacks {', '.join(HEADERS)}")
        return Path(env)
    if version is not None and version.split("+", 1)[0] != HEADERS_VERSION:
        raise BuildError(
            f"the shipped ggml headers are llama-cpp-python {HEADERS_VERSION}'s but {version} is installed; "
            "run `hybrid-gguf backend install`, or point HYBRID_GGUF_GGML_INCLUDE at that version's "
            "ggml/include")
    if not _has_headers(INCLUDE_DIR):
        raise BuildError(f"this hybrid-gguf installation lacks its ggml headers ({INCLUDE_DIR})")
    return INCLUDE_DIR


def find_compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise BuildError("no C compiler found (cc, gcc or clang; or set CC)")


def _cache_key(include_dir: Path, lib_dir: Path, compiler: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    for name in HEADERS:
        h.update(name.encode())
        h.update((include_dir / name).read_bytes())
    h.update(str(lib_dir / LIB_NAME).encode())
    h.update(compiler.encode())
    return h.hexdigest()[:20]


def build_recorder(force: bool = False) -> BuiltLibrary:
    """Return the compiled recorder, building it into the cache when needed."""
    lib_dir = llama_lib_dir()
    include_dir = find_include_dir(llama_cpp_version())
    compiler = find_compiler()
    out_dir = cache_root() / "native" / _cache_key(include_dir, lib_dir, compiler)
    target = out_dir / "libhg_recorder.so"
    if target.is_file() and not force:
        return BuiltLibrary(target, lib_dir, include_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent builders never see half a file
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [
        compiler, "-O2", "-shared", "-fPIC", "-std=c11", "-fvisibility=hidden",
        f"-I{include_dir}", str(SOURCE), "-o", tmp_name,
        f"-L{lib_dir}", f"-l:{LIB_NAME}", f"-Wl,-rpath,{lib_dir}", "-lpthread",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(tmp_name)
        raise BuildError(f"compiler failed to run: {exc}") from exc
    if proc.returncode != 0:
        os.unlink(tmp_name)
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError("compiling recorder.c failed: " + " | ".join(msg[-5:]))
    os.replace(tmp_name, target)
    return BuiltLibrary(target, lib_dir, include_dir)


if __name__ == "__main__":
    built = build_recorder(force="--force" in sys.argv)
    print(built.path)
