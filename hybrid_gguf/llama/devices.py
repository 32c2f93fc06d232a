"""Compute devices as llama.cpp sees them, plus host RAM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from hybrid_gguf.llama import ggml_lib
from hybrid_gguf.errors import HybridError

_TYPE_NAMES = {
    ggml_lib.DEV_TYPE_CPU: "cpu",
    ggml_lib.DEV_TYPE_GPU: "gpu",
    ggml_lib.DEV_TYPE_IGPU: "igpu",
    ggml_lib.DEV_TYPE_ACCEL: "accel",
    ggml_lib.DEV_TYPE_META: "meta",
}


@dataclass(frozen=True)
class Device:
    index: int  # position in ggml's device registry
    name: str  # e.g. "CPU", "CUDA0"; what llama.cpp prints in its buffer names
    description: str
    type: str  # cpu | gpu | igpu | accel | meta
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.type in ("gpu", "igpu")


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int


def list_devices() -> list[Device]:
    """All ggml backend devices registered in llama_cpp's libraries, in registry order."""
    devices = []
    for i in range(ggml_lib.dev_count()):
        dev = ggml_lib.dev_get(i)
        free, total = ggml_lib.dev_memory(dev)
        devices.append(
            Device(
                index=i,
                name=ggml_lib.dev_name(dev),
                description=ggml_lib.dev_description(dev),
                type=_TYPE_NAMES.get(ggml_lib.dev_type(dev), "unknown"),
                free_bytes=free,
                total_bytes=total,
            )
        )
    return devices


def cpu_ram() -> HostMemory:
    """Total and available host RAM; /proc/meminfo's MemAvailable counts reclaimable cache."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    info[key] = int(fields[0]) * 1024  # values are in kB
    except OSError:
        pass
    if "MemTotal" in info:
        return HostMemory(info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0)))
    page = os.sysconf("SC_PAGE_SIZE")
    return HostMemory(os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page)


def gpu_devices() -> list[Device]:
    """Devices with their own memory or integrated GPUs (what n_gpu_layers offloads to)."""
    return [d for d in list_devices() if d.is_gpu]


def has_cuda() -> bool:
    """True when llama_cpp was built with CUDA and sees at least one CUDA device."""
    return any(d.name.upper().startswith("CUDA") for d in gpu_devices())


def resolve_device(name: Optional[str] = None) -> Device:
    """The device for a name ("CPU", "CUDA0", case-insensitive, or "gpu"/"cpu"); None = best.

    None or "gpu" picks the first GPU (CUDA0 on a CUDA box); None falls back to the CPU.
    """
    devices = list_devices()
    if not devices:
        raise HybridError("llama.cpp reports no compute devices")
    gpus = [d for d in devices if d.is_gpu]
    if name is None:
        return gpus[0] if gpus else _cpu(devices)
    wanted = name.strip()
    if wanted.lower() == "gpu":
        if not gpus:
            raise HybridError("a GPU was requested but llama.cpp sees none (CPU-only build or no device)")
        return gpus[0]
    if wanted.lower() == "cpu":
        return _cpu(devices)
    for dev in devices:
        if dev.name.lower() == wanted.lower():
            return dev
    if wanted.lower().startswith("cuda") and not has_cuda():
        raise HybridError(f"device {name!r} requested but this llama.cpp build has no CUDA device")
    known = ", ".join(d.name for d in devices)
    raise HybridError(f"unknown device {name!r}; available: {known}")


def _cpu(devices: list[Device]) -> Device:
    for dev in devices:
        if dev.type == "cpu":
            return dev
    raise HybridError("llama.cpp reports no CPU device")
