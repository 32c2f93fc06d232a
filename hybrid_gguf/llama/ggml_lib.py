"""ctypes access to the ggml backend API of the libraries llama-cpp-python already loaded.

The wheel ships each library as several separate files (`libggml-base.so`, `.so.0`,
`.so.0.x.y`). libllama links against the `.so.0` names, so opening `libggml-base.so`
would map a second, independent copy whose buffer-type pointers llama.cpp does not
recognise. We therefore only attach to copies that are already mapped (RTLD_NOLOAD).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hybrid_gguf.errors import HybridError

# enum ggml_backend_dev_type (ggml-backend.h)
DEV_TYPE_CPU = 0
DEV_TYPE_GPU = 1
DEV_TYPE_IGPU = 2
DEV_TYPE_ACCEL = 3
DEV_TYPE_META = 4

_RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)


@dataclass(frozen=True)
class GgmlLibs:
    base: ctypes.CDLL  # libggml-base: device/buffer-type accessors, CPU buffer type
    ggml: ctypes.CDLL  # libggml: backend registry (dev_count, dev_get, dev_by_type, load_all)
    llama: ctypes.CDLL
    lib_dir: Path


_libs: Optional[GgmlLibs] = None
_lock = threading.Lock()


def _lib_dir() -> Path:
    import llama_cpp.llama_cpp as bindings  # loads libllama and, through it, ggml

    return Path(bindings._base_path).resolve()


def _mapped_files(lib_dir: Path) -> list[Path]:
    """Shared objects from lib_dir mapped into this process (Linux /proc/self/maps)."""
    found: list[Path] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                path = Path(parts[5].strip())
                if path.parent == lib_dir and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def _attach(stem: str, lib_dir: Path, mapped: list[Path]) -> ctypes.CDLL:
    """Attach to the already-mapped copy of lib<stem>; never load a new one."""
    prefix = f"lib{stem}.so"
    candidates = [p for p in mapped if p.name == prefix or p.name.startswith(prefix + ".")]
    # Fallbacks when /proc is unavailable: the SONAME file first, then the plain name.
    candidates += [lib_dir / f"lib{stem}.so.0", lib_dir / f"lib{stem}.so"]
    errors = []
    for path in candidates:
        try:
            return ctypes.CDLL(str(path), mode=_RTLD_NOLOAD | ctypes.RTLD_LOCAL)
        except OSError as exc:
            errors.append(f"{path.name}: {exc}")
    raise HybridError(
        f"lib{stem} from llama-cpp-python is not loaded in this process ({'; '.join(errors)})"
    )


def _declare(lib: ctypes.CDLL, name: str, argtypes: list, restype) -> None:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype


def _declare_all(base: ctypes.CDLL, ggml: ctypes.CDLL) -> None:
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    # registry (libggml)
    _declare(ggml, "ggml_backend_dev_count", [], sz)
    _declare(ggml, "ggml_backend_dev_get", [sz], vp)
    _declare(ggml, "ggml_backend_dev_by_type", [ctypes.c_int], vp)
    _declare(ggml, "ggml_backend_dev_by_name", [cp], vp)
    _declare(ggml, "ggml_backend_reg_count", [], sz)
    _declare(ggml, "ggml_backend_load_all", [], None)
    # device / buffer type accessors (libggml-base)
    _declare(base, "ggml_backend_dev_name", [vp], cp)
    _declare(base, "ggml_backend_dev_description", [vp], cp)
    _declare(base, "ggml_backend_dev_type", [vp], ctypes.c_int)
    _declare(base, "ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None)
    _declare(base, "ggml_backend_dev_buffer_type", [vp], vp)
    _declare(base, "ggml_backend_dev_host_buffer_type", [vp], vp)
    _declare(base, "ggml_backend_cpu_buffer_type", [], vp)
    _declare(base, "ggml_backend_buft_name", [vp], cp)
    _declare(base, "ggml_backend_buft_is_host", [vp], ctypes.c_bool)
    _declare(base, "ggml_backend_buft_get_device", [vp], vp)
    _declare(base, "ggml_backend_dev_backend_reg", [vp], vp)
    _declare(base, "ggml_backend_reg_get_proc_address", [vp, cp], vp)
    _declare(base, "ggml_backend_reg_name", [vp], cp)


def libs() -> GgmlLibs:
    """The ggml libraries llama_cpp uses, with backends registered."""
    global _libs
    with _lock:
        if _libs is None:
            lib_dir = _lib_dir()
            mapped = _mapped_files(lib_dir)
            base = _attach("ggml-base", lib_dir, mapped)
            ggml = _attach("ggml", lib_dir, mapped)
            llama = _attach("llama", lib_dir, mapped)
            _declare_all(base, ggml)
            _ensure_backends(ggml)
            _libs = GgmlLibs(base=base, ggml=ggml, llama=llama, lib_dir=lib_dir)
        return _libs


def _ensure_backends(ggml: ctypes.CDLL) -> None:
    # llama_backend_init loads dynamic backends when none is registered and sets up
    # ggml's fp16 tables; Llama() calls it too, calling it twice is harmless.
    import llama_cpp

    llama_cpp.llama_backend_init()
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all()


def _decode(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def dev_count() -> int:
    return int(libs().ggml.ggml_backend_dev_count())


def dev_get(index: int) -> int:
    dev = libs().ggml.ggml_backend_dev_get(index)
    if not dev:
        raise HybridError(f"no ggml device with index {index}")
    return dev


def dev_by_name(name: str) -> Optional[int]:
    return libs().ggml.ggml_backend_dev_by_name(name.encode()) or None


def dev_by_type(dev_type: int) -> Optional[int]:
    return libs().ggml.ggml_backend_dev_by_type(dev_type) or None


def dev_name(dev: int) -> str:
    return _decode(libs().base.ggml_backend_dev_name(dev))


def dev_description(dev: int) -> str:
    return _decode(libs().base.ggml_backend_dev_description(dev))


def dev_type(dev: int) -> int:
    return int(libs().base.ggml_backend_dev_type(dev))


def dev_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes as the backend reports them."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    libs().base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def dev_buffer_type(dev: int) -> int:
    buft = libs().base.ggml_backend_dev_buffer_type(dev)
    if not buft:
        raise HybridError(f"device {dev_name(dev)} has no buffer type")
    return buft


def cpu_buffer_type() -> int:
    """The plain CPU buffer type; llama.cpp compares override pointers against this one."""
    return libs().base.ggml_backend_cpu_buffer_type()


def buft_name(buft: int) -> str:
    return _decode(libs().base.ggml_backend_buft_name(buft))


# ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t): NULL-terminated array
_GET_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def dev_host_buffer_type(dev: int) -> Optional[int]:
    """Pinned host memory of a GPU device (e.g. CUDA_Host); None for devices without one."""
    return libs().base.ggml_backend_dev_host_buffer_type(dev) or None


def cpu_extra_buffer_types() -> list[int]:
    """The CPU backend's extra weight buffer types (e.g. CPU_REPACK), as llama.cpp finds them."""
    cpu = dev_by_type(DEV_TYPE_CPU)
    if cpu is None:
        return []
    base = libs().base
    reg = base.ggml_backend_dev_backend_reg(cpu)
    addr = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not addr:
        return []
    array = _GET_EXTRA_BUFTS(addr)(cpu)
    found = []
    i = 0
    while array and array[i]:
        found.append(array[i])
        i += 1
    return found


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of the ggml in llama-cpp-python 0.3.36 (GGML_MAX_DIMS 4,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64): for reading tensors handed to a Python cb_eval."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def sched_timers_window(action: str) -> None:
    """The patch's scheduler timers (LLAMA_HYBRID_SCHED_TIMERS set): "start" clears them,
    "report" prints them to stderr and clears them. A no-op without the variable or the
    function (stock builds, patches before version 4)."""
    if not os.environ.get("LLAMA_HYBRID_SCHED_TIMERS"):
        return
    fn = getattr(libs().base, "ggml_hybrid_sched_timers", None)
    if fn is None:
        return
    fn.argtypes, fn.restype = [ctypes.c_int], None
    fn(1 if action == "report" else 0)


def _cpu_counter(name: str) -> Optional[int]:
    lib_dir = libs().lib_dir
    try:
        cpu = _attach("ggml-cpu", lib_dir, _mapped_files(lib_dir))
    except HybridError:
        return None
    fn = getattr(cpu, name, None)
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int64
    return int(fn())


def mmid_flat_calls() -> Optional[int]:
    """How many one-token MUL_MAT_ID ops the CPU backend computed on the patch's
    contiguous-share path (patch v9; LLAMA_HYBRID_MMID_FLAT=0 turns it off); None where the
    CPU backend lacks the counter (stock builds, older patches)."""
    return _cpu_counter("ggml_cpu_hybrid_mmid_flat_calls")


def mmid_dynamic_calls() -> Optional[int]:
    """How many of those one-token MUL_MAT_IDs ran in chunks the threads claim in turn (patch
    v23, LLAMA_HYBRID_MMID_DYNAMIC=1; off by default); None where the counter is absent."""
    return _cpu_counter("ggml_cpu_hybrid_mmid_dynamic_calls")


def moe_fused_calls() -> Optional[int]:
    """How many one-token up, gate, swiglu, down chains the CPU backend computed as one fused
    pass (patch v9, LLAMA_HYBRID_MOE_FUSE=1); None where the counter is absent."""
    return _cpu_counter("ggml_cpu_hybrid_moe_fused_calls")
