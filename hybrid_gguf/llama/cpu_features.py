"""What the CPU offers llama.cpp: instruction-set flags and the CPU backend's extra buffer
types (repacked layouts such as CPU_REPACK, or AMX), for `doctor` and `inspect --devices`."""

from __future__ import annotations

import ctypes
import platform
import re
from typing import Optional

# flags that change which ggml CPU kernels run, in the order a reader compares them
INTERESTING_FLAGS = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    # Arm (/proc/cpuinfo "Features")
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",
)


# the flags a -march=native build may compile in: a wheel built with them is only valid on
# CPUs that have them all (the backend's cache key and its SIGILL guard)
_ISA_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|popcnt|movbe|adx|sha|vaes|vpclmul|gfni|aes|pclmul|"
                       r"lzcnt|abm|xsave|cx16|rdrand|rdseed|asimd|sve|i8mm|bf16|dotprod|fp16)")


def cpuinfo_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[set]:
    """Every flag of the first processor in /proc/cpuinfo (x86 `flags`, Arm `Features`; SSE3
    also under its name, not only the kernel's "pni"), None where there is no such file."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for _, line in zip(range(4096), fh):
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    have = set(value.split()[:1024])
                    if "pni" in have:
                        have.add("sse3")
                    return have
    except OSError:
        return None
    return set()


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The INTERESTING_FLAGS this CPU has (first processor of /proc/cpuinfo; [] elsewhere)."""
    have = cpuinfo_flags(cpuinfo) or set()
    return [f for f in INTERESTING_FLAGS if f in have]


def isa_signature(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The instruction sets a compiler may use here (sorted, space-separated), or the
    platform's processor name where there is no cpuinfo."""
    have = cpuinfo_flags(cpuinfo)
    if have is None:
        return f"{platform.machine()} {platform.processor()}"
    return " ".join(sorted(f for f in have if _ISA_FLAG.match(f)))


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
