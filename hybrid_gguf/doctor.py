"""`hybrid-gguf doctor`: what this installation has, and one line per problem with its fix.

`diagnose()` never raises: each section catches its own failure and turns it into a
problem, so a broken backend still gets a report.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field

from hybrid_gguf import __version__, paths


@dataclass
class Problem:
    problem: str
    fix: str


@dataclass
class Report:
    hybrid_gguf: str
    python: str
    backend: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    recorder: dict = field(default_factory=dict)
    paths: list = field(default_factory=list)
    devices: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _backend(report: Report) -> None:
    from hybrid_gguf import backend as build

    info: dict = {"installed": False}
    report.backend = info
    try:
        import llama_cpp
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
        report.problems.append(Problem(f"llama-cpp-python cannot be imported ({info['error']})",
                                       "hybrid-gguf backend install"))
        return
    from importlib import metadata

    info["installed"] = True
    try:
        info["version"] = metadata.version(build.DIST_NAME)
    except metadata.PackageNotFoundError:  # a --dev-tree build on PYTHONPATH
        info["version"] = getattr(llama_cpp, "__version__", "?")
    info["location"] = os.path.dirname(llama_cpp.__file__)
    from hybrid_gguf.llama import hybrid as hybrid_backend

    cap = hybrid_backend.capability()
    info["patched"] = cap.per_expert
    info["patch_version"] = cap.version
    try:
        info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        info["gpu_offload"] = None
    built = build.installed_build_info()
    info["build"] = built
    cuda_args = [a for a in (built or {}).get("cmake_args", []) if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
    info["gpu_archs"] = cuda_args[-1].split("=", 1)[1] if cuda_args else None
    info["kind"] = "CUDA" if info["gpu_offload"] else "CPU"

    want_cuda = build.gpu_visible()
    cuda_flag = " --cuda" if want_cuda else ""
    if not cap.per_expert:
        report.problems.append(Problem("the backend is stock llama-cpp-python: experts are placed per whole layer",
                                       f"hybrid-gguf backend install{cuda_flag}"))
    else:
        shipped = build.patch_api_version()
        stale = cap.version < shipped
        if built and built.get("patch_sha256") and built["patch_sha256"] != build.patch_sha256():
            stale = True
        if stale:
            report.problems.append(Problem(
                f"the backend was built from another version of the hybrid patch (library {cap.version}, "
                f"shipped {shipped})", f"hybrid-gguf backend install{cuda_flag}"))
    if want_cuda and info["gpu_offload"] is False:
        report.problems.append(Problem("a GPU and nvcc are present but the backend is a CPU build",
                                       "hybrid-gguf backend install --cuda"))


def _cpu(report: Report) -> None:
    from hybrid_gguf.llama.cpu_features import cpu_report

    report.cpu = cpu_report()
    report.cpu["model"] = _cpu_model()
    report.cpu["openmp_wait"] = openmp_wait()


def openmp_wait() -> dict:
    """How long the CPU backend's OpenMP threads spin before sleeping: the two variables libgomp
    reads when it loads, and whether hybrid-gguf set GOMP_SPINCOUNT (docs/tuning.md)."""
    import hybrid_gguf

    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
            "set_by_hybrid_gguf": bool(hybrid_gguf.openmp_spin_set_here),
            "OMP_PROC_BIND": os.environ.get("OMP_PROC_BIND"),
            # the binding variables `import hybrid_gguf` disarmed (docs/tuning.md)
            "binding_cleared": list(hybrid_gguf.openmp_bind_cleared_here)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _recorder(report: Report) -> None:
    if not report.backend.get("installed"):
        report.recorder = {"builds": False, "error": "no backend"}
        return
    from hybrid_gguf.llama.native import build

    try:
        built = build.build_recorder()
    except build.BuildError as exc:
        report.recorder = {"builds": False, "error": str(exc)}
        msg = str(exc)
        if "no C compiler" in msg:
            fix = "install a C compiler (e.g. `apt install gcc`) or set CC"
        elif "headers" in msg or "HYBRID_GGUF_GGML_INCLUDE" in msg:
            fix = "hybrid-gguf backend install"
        else:
            fix = "check the compiler message above; `run --no-record` works meanwhile"
        report.problems.append(Problem(f"the routing recorder does not build: {msg}", fix))
        return
    except Exception as exc:
        report.recorder = {"builds": False, "error": f"{type(exc).__name__}: {exc}"}
        report.problems.append(Problem(f"the routing recorder does not build: {exc}",
                                       "hybrid-gguf backend install"))
        return
    report.recorder = {"builds": True, "path": str(built.path)}


def _paths(report: Report) -> None:
    for label, path in paths.all_paths().items():
        report.paths.append({"name": label, "path": str(path), "exists": path.exists(),
                             "bytes": paths.tree_size(path)})
    for old in paths.legacy_data_dirs():
        new = paths.data_dir() / old.name
        report.problems.append(Problem(
            f"{old.name} of an older hybrid-gguf are still in the cache ({old})",
            f"mkdir -p {new} && cp -rn {old}/. {new}/ && rm -r {old}"))
    try:
        from hybrid_gguf.models import models_yaml_path

        if not models_yaml_path().is_file():
            report.problems.append(Problem(f"models.yaml is missing ({models_yaml_path()})",
                                           "unset HYBRID_GGUF_MODELS_YAML or reinstall hybrid-gguf"))
    except Exception:
        pass


def _devices(report: Report) -> None:
    if not report.backend.get("installed"):
        return
    try:
        from hybrid_gguf.llama.devices import list_devices

        for d in list_devices():
            report.devices.append({"name": d.name, "type": d.type, "description": d.description,
                                   "free_bytes": d.free_bytes, "total_bytes": d.total_bytes})
    except Exception as exc:
        report.problems.append(Problem(f"llama.cpp's devices cannot be listed: {exc}",
                                       "hybrid-gguf backend install"))


def diagnose(build_recorder: bool = True) -> Report:
    report = Report(hybrid_gguf=__version__, python=f"{platform.python_version()} ({sys.executable})")
    _backend(report)
    _cpu(report)
    if build_recorder:
        _recorder(report)
    _paths(report)
    _devices(report)
    needs_build = any(p.fix.startswith("hybrid-gguf backend install") for p in report.problems)
    if needs_build and not shutil.which("git") and not shutil.which("patch"):
        report.problems.append(Problem("neither git nor patch is on PATH: `backend install` cannot apply the patch",
                                       "install git (e.g. `apt install git`)"))
    return report
