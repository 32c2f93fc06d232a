"""hybrid-gguf: per-expert GPU/CPU placement for Mixture-of-Experts GGUF models."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that wait longer before they sleep, unless the user chose: libgomp reads this
# once, when llama_cpp loads it below. By default a thread sleeps after about 3 ms of spinning,
# and the CPU worker's sparse busy hand-offs then each paid a wake-up of the whole team: about
# 1 ms instead of 0.14 ms on the H200 host (docs/tuning.md, "OpenMP threads").
# 20 million spins is libgomp's own former default (about 0.2 s, then the threads sleep).
OPENMP_SPIN_DEFAULT = "20000000"
openmp_spin_set_here = "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ
if openmp_spin_set_here:
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_DEFAULT

# No OpenMP thread binding, unless HYBRID_GGUF_OMP_BIND=keep. Binding pins the decoding thread to
# one core when the first team starts, and every thread made after that (the CPU worker, the
# GPU driver's) inherits that single core and fights OpenMP thread 0 for it: on the H200 host
# OMP_PROC_BIND=close OMP_PLACES=cores took the worker's busy hand-off from 0.2 ms to 1.3 ms and
# realistic decode from 64.2 to 14.8 tok/s (docs/tuning.md). OMP_PROC_BIND=false also disarms
# OMP_PLACES and GOMP_CPU_AFFINITY; llama.cpp binds nothing by default either.
OPENMP_BIND_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")
openmp_bind_cleared_here = ()
if _os.environ.get("HYBRID_GGUF_OMP_BIND", "").strip().lower() != "keep" \
        and _os.environ.get("OMP_PROC_BIND", "").strip().lower() != "false":
    openmp_bind_cleared_here = tuple(f"{name}={_os.environ[name]}" for name in OPENMP_BIND_VARIABLES
                                     if _os.environ.get(name, "").strip())
    if openmp_bind_cleared_here:
        _os.environ["OMP_PROC_BIND"] = "false"


def _cxx_runtime_global():
    """Make the C++ runtime's symbols global before libllama loads, when a module imported
    earlier (numpy, torch) already loaded it privately. On the lent GPU machine (Python 3.12,
    numpy 2 wheels) every model load, CPU or CUDA, segfaulted in a process that had imported
    numpy first; with libstdc++ made global, even after numpy, it loaded (docs/backend-patch.md,
    "Import order"). RTLD_NOLOAD: the copy already in the process, never a second one (a
    conda Python could find an older libstdc++ than the one libllama was built against)."""
    import sys

    if not sys.platform.startswith("linux") or not hasattr(_os, "RTLD_NOLOAD"):
        return
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=_os.RTLD_GLOBAL | _os.RTLD_NOLOAD)
    except OSError:
        pass  # not loaded yet: libllama will load its own, and nothing came before it


_cxx_runtime_global()


def _refuse_a_backend_for_another_cpu() -> str:
    """A -march=native llama-cpp-python built on another CPU (a home or a venv shared by
    machines) dies of SIGILL once loaded. Where its build info names instruction sets this CPU
    lacks, every `import llama_cpp` raises BackendForAnotherCpu instead; returns the message."""
    import sys

    try:
        from hybrid_gguf.backend import cpu_isa_missing, cpu_mismatch_message, installed_build_info

        missing = cpu_isa_missing(installed_build_info())
    except Exception:
        return ""  # no build info to go by: load as before
    if not missing or "llama_cpp" in sys.modules:
        return ""
    from importlib.abc import MetaPathFinder

    from hybrid_gguf.errors import BackendForAnotherCpu

    message = cpu_mismatch_message(missing)

    class _Refuse(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llama_cpp" or name.startswith("llama_cpp."):
                raise BackendForAnotherCpu(message)
            return None

    sys.meta_path.insert(0, _Refuse())
    return message


backend_for_another_cpu = _refuse_a_backend_for_another_cpu()

try:
    # Load libllama before numpy where we can: the order mattered on the GPU machine
    # (docs/backend-patch.md, "Import order").
    import llama_cpp as _llama_cpp  # noqa: F401
except (ImportError, OSError):
    # no backend yet, or a broken one: inventory, synth and `hybrid-gguf backend install`
    # still work
    pass


__all__ = ["HybridModel", "inspect", "plan", "list_devices", "__version__"]


def plan(model=None, gpu_budget=None, n_ctx=None, **kwargs):
    """Plan per-expert placement of `model` (a GGUF path, a models.yaml alias or a Hugging
    Face cache name org/repo:file.gguf; None: the default model) for `gpu_budget` (total VRAM
    in bytes, or a size such as "8GiB"; None and upper bound: what the GPU has free less the
    reserve of planning/budget.py) and a context of n_ctx tokens (None:
    the model's training context, at most limits.DEFAULT_CTX, as every command does).
    Returns autoplan.AutoPlan (.plan, .diff, .notes); the keyword arguments are
    autoplan.plan_model's."""
    from hybrid_gguf.autoplan import plan_model
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.limits import default_ctx
    from hybrid_gguf.models import resolve_model
    from hybrid_gguf.sizes import parse_size

    resolved = resolve_model(None if model is None else str(model))
    budget = None if gpu_budget is None else parse_size(gpu_budget)
    if n_ctx is None:
        n_ctx = default_ctx(read_inventory(resolved.path))
    return plan_model(resolved.path, budget, n_ctx, **kwargs)


def __getattr__(name):
    # the API's nouns, imported on first use so `import hybrid_gguf` stays cheap
    if name == "HybridModel":
        from hybrid_gguf.model import HybridModel

        return HybridModel
    if name == "inspect":
        from hybrid_gguf.header.inventory import read_inventory

        return read_inventory
    if name == "list_devices":
        from hybrid_gguf.llama.devices import list_devices

        return list_devices
    raise AttributeError(f"module 'hybrid_gguf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
