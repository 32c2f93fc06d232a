#!/usr/bin/env python3
"""Compile the patch's own CUDA kernels (the CPU worker's hand-off, ggml-cuda/hybrid-handoff.cu)
with NVRTC, which pip installs (nvidia-cuda-nvrtc-cu12) where no CUDA compiler is: device-code
errors show here instead of in a GPU machine's build. Host code and ggml-cuda's headers are
left out; the kernels get the slot's structs from the patched ggml.h.

  python scripts/nvrtc_check.py [--tree PATCHED_LLAMA_CPP] [--arch compute_90]

Without --tree the cached llama-cpp-python sdist is extracted and patched in a temporary folder.
Exit status 0: compiled; 1: compile errors (printed); 2: no NVRTC or no source.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

HANDOFF = Path("ggml/src/ggml-cuda/hybrid-handoff.cu")
GGML_H = Path("ggml/include/ggml.h")
# NVRTC has no standard headers: what the kernels use of them
PRELUDE = """
typedef unsigned int uint32_t; typedef int int32_t; typedef long long int64_t; typedef unsigned char uint8_t;
typedef unsigned long long uint64_t; typedef unsigned long size_t;
#define offsetof(t, m) ((size_t) &(((t *) 0)->m))
extern "C" int printf(const char *, ...);
"""


def load_nvrtc():
    """libnvrtc from the system or from the nvidia-cuda-nvrtc-cu12 wheel; None if neither."""
    names = ["libnvrtc.so.12", "libnvrtc.so"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        names[:0] = [str(p) for p in sorted(Path(root, "cuda_nvrtc", "lib").glob("libnvrtc.so.*")) if "alt" not in p.name]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def kernel_source(tree: Path) -> str:
    """The hand-off kernels of `tree`'s hybrid-handoff.cu with the slot's structs of its ggml.h,
    as one NVRTC source; the kernels made extern "C" so the PTX names them."""
    cu = (tree / HANDOFF).read_text()
    header = (tree / GGML_H).read_text()
    structs = header[header.index("#define GGML_HYBRID_SLOT_HEADER"):header.index("    static inline struct ggml_hybrid_slot_layout")]
    kernels = cu[cu.index("static constexpr int HYBRID_HANDOFF_THREADS"):cu.index("// a post's or a collect's slot")]
    return PRELUDE + structs + "\n" + kernels.replace("static __global__", 'extern "C" __global__')


def compile_source(nvrtc, source: str, arch: str) -> tuple[bool, str, list[str]]:
    """(compiled, NVRTC's log, the PTX's kernel entries)."""
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), HANDOFF.name.encode(), 0, None, None) != 0:
        return False, "nvrtcCreateProgram failed", []
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    entries: list[str] = []
    if rc == 0:
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        entries = re.findall(r"\.entry (\w+)\(", ptx.value.decode())
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace"), entries


def patched_tree(tmp: Path) -> Path:
    """The cached sdist's vendored llama.cpp with the hybrid patch applied, under `tmp`."""
    from hybrid_gguf import backend

    sdist = backend.sdist_path()
    if not sdist.exists():
        raise FileNotFoundError(f"no cached sdist at {sdist} (`hybrid-gguf backend install` fetches it)")
    root = backend.extract(sdist, tmp)
    backend.apply_patch(root)
    return root / "vendor" / "llama.cpp"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tree", type=Path, help="a patched llama.cpp source tree (default: the cached sdist, patched)")
    ap.add_argument("--arch", default="compute_90")
    args = ap.parse_args(argv)
    nvrtc = load_nvrtc()
    if nvrtc is None:
        print("no NVRTC: pip install nvidia-cuda-nvrtc-cu12", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tree = args.tree or patched_tree(Path(tmp))
            source = kernel_source(tree)
        except (OSError, ValueError) as exc:
            print(f"no source to check: {exc}", file=sys.stderr)
            return 2
        ok, log, entries = compile_source(nvrtc, source, args.arch)
    print(log.strip())
    print(f"{HANDOFF}: {'compiled' if ok else 'FAILED'} for {args.arch}" + (f" ({', '.join(entries)})" if ok else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
