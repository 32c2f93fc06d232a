"""Build and install llama-cpp-python with the hybrid-gguf patch of its vendored llama.cpp.

Steps: fetch the pinned sdist from PyPI (or take `sdist=`), apply the patch shipped in this
package (`llama-cpp-hybrid.patch`), build a wheel with CMake flags for CPU or CUDA, cache it
under `<cache>/wheels/<kind>-<key>/` (key = version + patch + CMake flags; paths.py), give
it the local version `0.3.36+hybrid.N` (N: the patch's LLAMA_HYBRID_VERSION) so `pip list`
tells it from the stock wheel, and pip-install it into the chosen interpreter. A cached
wheel makes the next call take seconds instead of minutes.

The user's CMAKE_ARGS are kept: this module appends its own flags to them, leaving out any
variable the user already defines (so `CMAKE_ARGS=-DGGML_NATIVE=OFF` wins over ours).

Entry points: `hybrid-gguf backend install`, `python -m hybrid_gguf.backend` (no third-party
imports, so `make` can call it before the package's dependencies are installed) and
`scripts/build_backend.py`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from hybrid_gguf import paths
from hybrid_gguf.errors import HybridError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DIST_NAME = "llama_cpp_python"
PATCH_PATH = Path(__file__).with_name("llama-cpp-hybrid.patch")
BUILD_INFO_NAME = "hybrid_gguf_build.json"  # written into the wheel's .dist-info

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

Log = Callable[[str], None]


class BackendError(HybridError):
    """The backend cannot be built or installed; the message says why and what to do."""


def _print(msg: str) -> None:
    print(msg, flush=True)


# --- configuration --------------------------------------------------------------------

def gpu_visible() -> bool:
    # nvcc alone is not enough: CI machines carry the toolkit without a GPU, and a CUDA
    # build there takes far longer than the CPU one for nothing.
    if os.environ.get("HYBRID_GGUF_CUDA") == "1":
        return True
    if os.environ.get("HYBRID_GGUF_CUDA") == "0":
        return False
    return shutil.which("nvcc") is not None and Path("/dev/nvidia0").exists()


def patch_bytes() -> bytes:
    try:
        return PATCH_PATH.read_bytes()
    except OSError as exc:
        raise BackendError(f"the hybrid patch is missing from the package ({PATCH_PATH}): {exc}") from None


def patch_sha256() -> str:
    return hashlib.sha256(patch_bytes()).hexdigest()


def patch_api_version() -> int:
    """LLAMA_HYBRID_VERSION as the shipped patch defines it (what llama_hybrid_version returns)."""
    m = re.search(rb"#define LLAMA_HYBRID_VERSION (\d+)", patch_bytes())
    return int(m.group(1)) if m else 0


def local_version(patched: bool) -> Optional[str]:
    """The local version label of a build: "hybrid.N" for patched builds, None for stock."""
    return f"hybrid.{patch_api_version()}" if patched else None


def user_cmake_args() -> list[str]:
    return shlex.split(os.environ.get("CMAKE_ARGS", ""))


def _defined_name(arg: str) -> Optional[str]:
    m = re.match(r"-D([A-Za-z_][A-Za-z0-9_]*)(:[A-Za-z]+)?=", arg)
    return m.group(1) if m else None


def cmake_args(cuda: bool, cuda_arch: str = "native", native: bool = True,
               user: Optional[list[str]] = None) -> list[str]:
    """The user's CMAKE_ARGS (environment) followed by ours, minus the variables the user
    already sets. Without user flags this is exactly our list (the cache key relies on it)."""
    ours = list(COMMON_CMAKE_ARGS)
    if cuda:
        ours += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    # native in CUDA builds too: the CPU computes the cold experts, and on the H200 host a
    # native CPU backend answered a busy hand-off in 157-175 us against 173-203 us built for
    # AVX2 (docs/benchmarks.md, twelfth lease)
    ours.append(f"-DGGML_NATIVE={'ON' if native else 'OFF'}")
    user = user_cmake_args() if user is None else list(user)
    taken = {n for n in map(_defined_name, user) if n}
    return user + [a for a in ours if _defined_name(a) not in taken]


def cpu_isa_signature() -> str:
    """This CPU's instruction sets (llama/cpu_features.isa_signature): a -march=native build is
    only valid on CPUs with all of them."""
    from hybrid_gguf.llama.cpu_features import isa_signature

    return isa_signature()


def build_key(patched: bool, args: list[str]) -> str:
    h = hashlib.sha256()
    h.update(LLAMA_CPP_PYTHON_VERSION.encode())
    h.update(patch_bytes() if patched else b"stock")
    h.update(" ".join(args).encode())
    if "-DGGML_NATIVE=ON" in args:
        # a home shared by machines with other CPUs must not hand one of them a wheel built
        # for instructions it lacks (SIGILL at the first matrix product)
        h.update(cpu_isa_signature().encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BuildConfig:
    patched: bool
    cuda: bool
    args: tuple

    @property
    def key(self) -> str:
        return build_key(self.patched, list(self.args))

    @property
    def wheel_dir(self) -> Path:
        kind = f"{'hybrid' if self.patched else 'stock'}-{'cuda' if self.cuda else 'cpu'}"
        return paths.wheels_dir() / f"{kind}-{self.key}"

    @property
    def label(self) -> Optional[str]:
        return local_version(self.patched)

    def describe(self) -> str:
        return f"{'hybrid-patched' if self.patched else 'stock'}, {'CUDA' if self.cuda else 'CPU'}"


def config(cuda: Optional[bool] = None, cuda_arch: Optional[str] = None, portable: bool = False,
           stock: bool = False) -> BuildConfig:
    """The build this machine gets for these options (cuda None: when a GPU is visible)."""
    cuda = gpu_visible() if cuda is None else cuda
    arch = cuda_arch or os.environ.get("HYBRID_GGUF_CUDA_ARCH", "native")
    return BuildConfig(patched=not stock, cuda=cuda, args=tuple(cmake_args(cuda, arch, native=not portable)))


def _wheel_version(wheel: Path) -> str:
    # llama_cpp_python-<version>-<tags>.whl
    return wheel.name.split("-")[1]


def cached_wheel(cfg: BuildConfig) -> Optional[Path]:
    """The cached wheel for cfg, preferring one that already carries the local version."""
    wheels = sorted(cfg.wheel_dir.glob(f"{DIST_NAME}-*.whl"))
    if not wheels:
        return None
    labeled = [w for w in wheels if cfg.label and _wheel_version(w).endswith("+" + cfg.label)]
    return (labeled or wheels)[0]


# --- source ---------------------------------------------------------------------------

def sdist_path() -> Path:
    """Where the llama-cpp-python sdist is cached (it may not be there yet)."""
    return paths.sdist_dir() / f"{DIST_NAME}-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


def fetch_sdist(log: Log = _print) -> Path:
    sdist = sdist_path()
    sdist_dir = sdist.parent
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)],
                check=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BackendError(f"could not download the llama-cpp-python sdist ({exc}); "
                               "pass one with --sdist") from None
    return sdist


def extract(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def apply_patch(src_root: Path) -> None:
    if shutil.which("git"):
        cmd = ["git", "apply", "--whitespace=nowarn", str(PATCH_PATH)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--quiet", "-i", str(PATCH_PATH)]
    else:
        raise BackendError("applying the hybrid patch needs `git` or `patch` on PATH")
    subprocess.run(cmd, cwd=src_root, check=True)


def trim_sdist(out: Path, log: Log = _print) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(fetch_sdist(log), Path(tmp))
        for rel in TRIM_DIRS:
            shutil.rmtree(root / rel, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:gz") as tar:
            tar.add(root, arcname=root.name)
    log(f"trimmed sdist: {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def build_wheel(sdist: Path, patched: bool, args: list[str], wheel_dir: Path, no_isolation: bool,
                log: Log = _print) -> Path:
    with tempfile.TemporaryDirectory(prefix="hybrid-gguf-build-") as tmp:
        root = extract(sdist, Path(tmp))
        if patched:
            apply_patch(root)
        env = dict(os.environ, CMAKE_ARGS=shlex.join(args))
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(root)]
        if no_isolation:
            cmd.insert(4, "--no-build-isolation")
        log(f"building llama-cpp-python ({'patched' if patched else 'stock'}): CMAKE_ARGS={env['CMAKE_ARGS']}")
        subprocess.run(cmd, check=True, env=env)
    (wheel,) = wheel_dir.glob(f"{DIST_NAME}-*.whl")
    return wheel


# --- the local version label ----------------------------------------------------------

def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def retag_wheel(wheel: Path, label: str, info: dict, out_dir: Path) -> Path:
    """Copy `wheel` into out_dir as version <version>+<label>: the .dist-info directory is
    renamed, METADATA's Version rewritten, `info` added as hybrid_gguf_build.json and
    RECORD regenerated. Nothing is compiled; the libraries are copied unchanged."""
    name, version, tags = wheel.name[:-len(".whl")].split("-", 2)
    base = version.split("+", 1)[0]
    new_version = f"{base}+{label}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{new_version}-{tags}.whl"
    fd, tmp_name = tempfile.mkstemp(prefix=".retag-", suffix=".whl", dir=out_dir)
    os.close(fd)
    record: list[tuple[str, str, str]] = []
    try:
        with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp_name, "w", zipfile.ZIP_DEFLATED) as zout:
            for item in zin.infolist():
                arcname = item.filename
                if arcname.startswith(old_info):
                    arcname = new_info + arcname[len(old_info):]
                if arcname == new_info + "RECORD" or item.is_dir():
                    continue
                data = zin.read(item)
                if arcname == new_info + "METADATA":
                    data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
                if arcname == new_info + BUILD_INFO_NAME:
                    continue  # replaced below
                out = zipfile.ZipInfo(arcname, date_time=item.date_time)
                out.external_attr = item.external_attr
                out.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(out, data)
                record.append((arcname, _record_hash(data), str(len(data))))
            extra = (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
            zout.writestr(new_info + BUILD_INFO_NAME, extra)
            record.append((new_info + BUILD_INFO_NAME, _record_hash(extra), str(len(extra))))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(record)
            writer.writerow((new_info + "RECORD", "", ""))
            zout.writestr(new_info + "RECORD", buf.getvalue())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def build_info(cfg: BuildConfig) -> dict:
    from hybrid_gguf import __version__

    return {
        "patched": cfg.patched,
        "patch_api_version": patch_api_version() if cfg.patched else 0,
        "patch_sha256": patch_sha256() if cfg.patched else None,
        "cuda": cfg.cuda,
        "cmake_args": list(cfg.args),
        "key": cfg.key,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "hybrid_gguf": __version__,
        # what a -march=native build may use: checked before the library is ever loaded
        **({"cpu_isa": cpu_isa_signature()} if "-DGGML_NATIVE=ON" in cfg.args else {}),
    }


def cpu_isa_missing(info: Optional[dict]) -> list[str]:
    """The instruction sets a native backend was built with (its build info's `cpu_isa`) that
    this CPU lacks; empty for portable builds and builds that did not record them."""
    built = (info or {}).get("cpu_isa")
    if not isinstance(built, str):
        return []
    return sorted(set(built.split()[:1024]) - set(cpu_isa_signature().split()))


def cpu_mismatch_message(missing: list[str]) -> str:
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return (f"the installed llama-cpp-python was built for another CPU ({shown}, which this CPU lacks) and "
            f"would crash here; rebuild it on this machine with `hybrid-gguf backend install`")


def labeled_wheel(wheel: Path, cfg: BuildConfig, out_dir: Optional[Path] = None) -> Path:
    """wheel itself when it needs no label or has it already, else a labeled copy in
    out_dir (default: next to it, in the cache)."""
    if cfg.label is None or _wheel_version(wheel).endswith("+" + cfg.label):
        return wheel
    return retag_wheel(wheel, cfg.label, build_info(cfg), out_dir or wheel.parent)


def installed_build_info() -> Optional[dict]:
    """hybrid_gguf_build.json of the installed llama-cpp-python, None when it has none
    (a stock wheel, or a patched one built before the label existed)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None
    text = dist.read_text(BUILD_INFO_NAME)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# --- incremental builds for patch work ------------------------------------------------

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


def dev_build(sdist: Path, tree: Path, args: list[str], log: Log = _print, patched: bool = True) -> Path:
    """Patch development: a persistent patched source tree and CMake build directory under
    tree, rebuilt incrementally (seconds to a minute after a small patch change instead of a
    full wheel build). The libraries are installed into tree/src/llama_cpp/lib, so
    PYTHONPATH=tree/src imports this build. Not for users: it skips the wheel and its cache.
    `patched` False: the stock source, for A/Bs against the patch (a tree of its own)."""
    src, build = tree / "src", tree / "build"
    tree.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree) as tmp:
        fresh = extract(sdist, Path(tmp))
        if patched:
            apply_patch(fresh)
        log(f"dev tree: {sync_tree(fresh, src)} files changed")
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    if not (build / "CMakeCache.txt").exists():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                        f"-DSKBUILD_PLATLIB_DIR={tree / 'platlib'}", *args], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True)
    subprocess.run(["cmake", "--install", str(build)], check=True, stdout=subprocess.DEVNULL)
    return src


# --- install --------------------------------------------------------------------------

def install_wheel(wheel: Path, python: str) -> None:
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel)],
        check=True,
    )


def install(cuda: Optional[bool] = None, cuda_arch: Optional[str] = None, portable: bool = False,
            stock: bool = False, sdist: Optional[Path] = None, no_build_isolation: bool = False,
            wheel_only: bool = False, python: Optional[str] = None, log: Log = _print) -> Path:
    """Build (or take from the cache) the backend wheel and install it; returns the wheel."""
    cfg = config(cuda, cuda_arch, portable, stock)
    if cfg.cuda and shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        raise BackendError("a CUDA build was requested (--cuda or HYBRID_GGUF_CUDA=1) but nvcc is not on "
                           "PATH; install the CUDA toolkit or set CUDACXX, or build for the CPU with --cpu")
    wheel = cached_wheel(cfg)
    if wheel is not None:
        log(f"using cached wheel {wheel}")
    else:
        cfg.wheel_dir.mkdir(parents=True, exist_ok=True)
        source = sdist or fetch_sdist(log)
        try:
            built = build_wheel(source, cfg.patched, list(cfg.args), cfg.wheel_dir, no_build_isolation, log)
        except BaseException:
            shutil.rmtree(cfg.wheel_dir, ignore_errors=True)
            raise
        wheel = labeled_wheel(built, cfg)
        if wheel != built:
            built.unlink()  # our own fresh output: only the labeled copy stays cached
    # a wheel cached before the label existed gets a labeled copy beside it; the original
    # stays, since another build may be installing it right now
    wheel = labeled_wheel(wheel, cfg)
    if not wheel_only:
        install_wheel(wheel, python or sys.executable)
    log(f"llama-cpp-python {_wheel_version(wheel)} ({cfg.describe()}) ready: {wheel}")
    return wheel


def main(argv: Optional[list[str]] = None) -> int:
    doc = (__doc__ or "").split("\n\n")[0]
    ap = argparse.ArgumentParser(prog="python -m hybrid_gguf.backend", description=doc)
    ap.add_argument("command", nargs="?", default="install", choices=("install",),
                    help="install (the default): build or take the cached wheel and install it")
    ap.add_argument("--python", default=sys.executable, help="interpreter to install into")
    ap.add_argument("--cuda", action="store_true", default=None, help="build with CUDA (default: when a GPU is visible)")
    ap.add_argument("--cpu", dest="cuda", action="store_false", help="build for CPU only")
    ap.add_argument("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES (default: native, or $HYBRID_GGUF_CUDA_ARCH)")
    ap.add_argument("--portable", action="store_true",
                    help="CPU backend without -march=native (a wheel for other machines' CPUs)")
    ap.add_argument("--stock", action="store_true", help="do not apply the hybrid patch")
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist (full or trimmed) to build from")
    ap.add_argument("--no-build-isolation", action="store_true", help="use already-installed build deps (offline)")
    ap.add_argument("--wheel-only", action="store_true", help="build/cache the wheel but do not install it")
    ap.add_argument("--trim-sdist", type=Path, metavar="OUT", help="write a trimmed sdist tarball and exit")
    ap.add_argument("--dev-tree", type=Path, metavar="DIR",
                    help="incremental build into DIR for patch work; then use PYTHONPATH=DIR/src")
    opts = ap.parse_args(argv)
    try:
        if opts.trim_sdist:
            trim_sdist(opts.trim_sdist)
            return 0
        if opts.dev_tree:
            cfg = config(opts.cuda, opts.cuda_arch, opts.portable, opts.stock)
            src = dev_build(opts.sdist or fetch_sdist(), opts.dev_tree, list(cfg.args), patched=not opts.stock)
            print(f"dev build ready: PYTHONPATH={src}")
            return 0
        install(cuda=opts.cuda, cuda_arch=opts.cuda_arch, portable=opts.portable, stock=opts.stock,
                sdist=opts.sdist, no_build_isolation=opts.no_build_isolation, wheel_only=opts.wheel_only,
                python=opts.python)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {shlex.join(map(str, exc.cmd))} failed with status {exc.returncode}", file=sys.stderr)
        return 1
    return 0
