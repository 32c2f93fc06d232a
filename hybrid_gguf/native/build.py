"""Compile the native routing recorder against the installed llama-cpp-python.

The shared object links against the `libggml-base.so.0` that llama_cpp ships in
`llama_cpp/lib/` (the same SONAME libllama needs, so the dynamic loader reuses the copy
llama_cpp already mapped) and is cached under
`<cache root>/native/<hash of source + headers + library path>/`.

Headers come from $HYBRID_GGUF_GGML_INCLUDE, else the installed wheel (it ships
`include/ggml*.h`), else a cached sdist tarball (`<cache>/sdist/llama_cpp_python-<version>*.tar.gz`
or $HYBRID_GGUF_SDIST), else `pip download` of the matching sdist.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("recorder.c")
HEADERS = ("ggml.h", "ggml-backend.h", "ggml-alloc.h")
LIB_NAME = "libggml-base.so.0"
DIST_NAME = "llama_cpp_python"


class BuildError(Exception):
    """The recorder cannot be built here; the message says why."""


@dataclass(frozen=True)
class BuiltLibrary:
    path: Path
    lib_dir: Path
    include_dir: Path


def cache_root() -> Path:
    from .. import paths

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


def _wheel_include_dir() -> Optional[Path]:
    """The `include/` directory recorded in the installed wheel's file list."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "ggml.h":
            d = Path(dist.locate_file(f)).parent
            if _has_headers(d):
                return d
    return None


def _extract_headers(tarball: Path, dest: Path) -> Optional[Path]:
    """Extract only vendor/llama.cpp/ggml/include/*.h from an sdist tarball."""
    tmp = Path(tempfile.mkdtemp(prefix=".headers-", dir=dest.parent))
    try:
        with tarfile.open(tarball) as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if (
                    m.isfile()
                    and len(parts) == 6
                    and parts[1:5] == ("vendor", "llama.cpp", "ggml", "include")
                    and parts[5].endswith(".h")
                ):
                    data = tar.extractfile(m).read()
                    (tmp / parts[5]).write_bytes(data)
        if not _has_headers(tmp):
            return None
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _has_headers(dest):  # lost a race to another process: fine if complete
                raise
        return dest
    except (OSError, tarfile.TarError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_include_dir(version: str, allow_download: bool = True) -> Path:
    env = os.environ.get("HYBRID_GGUF_GGML_INCLUDE")
    if env:
        if not _has_headers(Path(env)):
            raise BuildError(f"HYBRID_GGUF_GGML_INCLUDE={env} lacks {', '.join(HEADERS)}")
        return Path(env)
    d = _wheel_include_dir()
    if d is not None:
        return d
    dest = cache_root() / "native" / f"headers-{version}"
    if _has_headers(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    sdist_dir = cache_root() / "sdist"
    tarball = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    candidates = [Path(os.environ["HYBRID_GGUF_SDIST"])] if os.environ.get("HYBRID_GGUF_SDIST") \
        else []
    candidates += sorted(sdist_dir.glob(f"llama_cpp_python-{version}*.tar.gz"))
    for cand in candidates:  # the plain sdist or a trimmed copy of it
        if cand.is_file() and _extract_headers(cand, dest):
            return dest
    if allow_download:
        sdist_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--dest", str(sdist_dir), f"llama-cpp-python=={version}",
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildError(f"ggml headers not found and pip download failed: {exc}") from exc
        if tarball.is_file() and _extract_headers(tarball, dest):
            return dest
    raise BuildError("ggml headers not found (wheel include/, cached sdist or pip download)")


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
