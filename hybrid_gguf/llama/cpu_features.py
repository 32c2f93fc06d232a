"""What the CPU offers llama.cpp: instruction-set flags and the CPU backend's extra buffer
types (repacked layouts such as CPU_REPACK, or AMX), for `doctor` and `inspect --devices`."""

from __future__ import annotations

import ctypes
from typing import Optional

# flags that change which ggml CPU kernels run, in the order a reader compares them
INTERESTING_FLAGS = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    # Arm (/proc/cpuinfo "Features")
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The INTERESTING_FLAGS this CPU has (first processor of /proc/cpuinfo; [] elsewhere)."""
    have: set = set()
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    have = set(value.split())
                    if "pni" in have:  # x86 kernels call SSE3 "pni"
                        have.add("sse3")
                    break
    except OSError:
        return []
    return [f for f in INTERESTING_FLAGS if f in have]


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_GET_FEATURES = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)


def _cpu_reg(ggml_lib) -> Optional[int]:
    cpu = ggml_lib.dev_by_type(ggml_lib.DEV_TYPE_CPU)
    if not cpu:
        return None
    return ggml_lib.libs().base.ggml_backend_dev_backend_reg(cpu) or None


def backend_features() -> dict:
    """{name: value} the CPU backend reports it was built with (ggml_backend_get_features:
    e.g. AVX2, AVX512, AMX_INT8, REPACK), {} when it exports none."""
    from hybrid_gguf.llama import ggml_lib

    reg = _cpu_reg(ggml_lib)
    if reg is None:
        return {}
    addr = ggml_lib.libs().base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    arr = _GET_FEATURES(addr)(reg)
    out = {}
    i = 0
    while arr and arr[i].name:
        out[arr[i].name.decode()] = (arr[i].value or b"").decode()
        i += 1
    return out


def cpu_report() -> dict:
    """{"flags": [...], "extra_buffer_types": [...], "backend_features": {...}}.

    flags come from /proc/cpuinfo and need no backend; the other two come from the CPU
    backend of the installed llama-cpp-python and are empty (with "error" set) when it
    cannot be loaded."""
    report: dict = {"flags": cpu_flags(), "extra_buffer_types": [], "backend_features": {}}
    try:
        from hybrid_gguf.llama import ggml_lib

        report["extra_buffer_types"] = [ggml_lib.buft_name(b) for b in ggml_lib.cpu_extra_buffer_types()]
        report["backend_features"] = backend_features()
    except Exception as exc:  # no backend, or one without the registry API
        report["error"] = f"{type(exc).__name__}: {exc}"
    return report
