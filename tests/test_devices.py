"""Devices through ctypes on llama_cpp's own ggml libraries."""

import pytest

import llama_cpp  # noqa: F401  (load libllama first: docs/backend-patch.md, "Import order")

from hybrid_gguf.llama import devices
from hybrid_gguf.llama import ggml_lib
from hybrid_gguf.errors import HybridError


def test_cpu_device_with_sane_memory():
    devs = devices.list_devices()
    cpus = [d for d in devs if d.type == "cpu"]
    assert cpus and cpus[0].name == "CPU"
    ram = devices.cpu_ram()
    assert 0 < ram.available_bytes <= ram.total_bytes
    cpu = cpus[0]
    assert 0 < cpu.free_bytes <= cpu.total_bytes
    # ggml's CPU device reports physical memory: within 10% of /proc/meminfo's total.
    assert abs(cpu.total_bytes - ram.total_bytes) <= 0.1 * ram.total_bytes
    assert [d.index for d in devs] == list(range(len(devs)))


def test_gpu_list_and_cuda_flag_agree():
    gpus = devices.gpu_devices()
    assert all(d.type in ("gpu", "igpu") for d in gpus)
    assert devices.has_cuda() == any(d.name.startswith("CUDA") for d in gpus)
    for gpu in gpus:
        assert gpu.total_bytes > 0 and gpu.free_bytes <= gpu.total_bytes


def test_resolve_device():
    best = devices.resolve_device(None)
    gpus = devices.gpu_devices()
    assert best == (gpus[0] if gpus else devices.resolve_device("cpu"))
    assert devices.resolve_device("cpu").type == "cpu"
    assert devices.resolve_device("Cpu").name == "CPU"
    if devices.has_cuda():
        assert devices.resolve_device("gpu").name == "CUDA0"
        assert devices.resolve_device("cuda0").name == "CUDA0"
    else:
        with pytest.raises(HybridError, match="CUDA"):
            devices.resolve_device("CUDA0")
    with pytest.raises(HybridError, match="unknown device"):
        devices.resolve_device("TPU7")


def test_only_the_mapped_library_copies_are_used():
    libs = ggml_lib.libs()
    assert libs.base._name.endswith("libggml-base.so.0")
    # The TRAP: no second copy of libggml-base (plain .so or .so.0.x.y) got mapped.
    with open("/proc/self/maps") as fh:
        mapped = {line.split()[-1] for line in fh if "libggml-base" in line}
    assert len(mapped) == 1, mapped
    # The CPU buffer type we hand to llama.cpp is the one its CPU device uses.
    cpu = ggml_lib.dev_by_type(ggml_lib.DEV_TYPE_CPU)
    assert ggml_lib.dev_buffer_type(cpu) == ggml_lib.cpu_buffer_type()
    assert ggml_lib.buft_name(ggml_lib.cpu_buffer_type()) == "CPU"


def test_inspect_devices_reports_cpu_features_and_extra_buffer_types():
    import json

    from typer.testing import CliRunner

    from hybrid_gguf.cli import app
    from hybrid_gguf.llama.cpu_features import cpu_flags

    res = CliRunner().invoke(app, ["inspect", "--devices", "--json"])
    assert res.exit_code == 0, res.output
    cpu = json.loads(res.stdout)["cpu"]
    assert cpu["flags"] == cpu_flags()
    assert "CPU_REPACK" in cpu["extra_buffer_types"] or "error" in cpu
    # a build with AMX kernels (native builds on AMX CPUs) offers the AMX buffer
    if cpu["backend_features"].get("AMX_INT8") == "1" and {"amx_tile", "amx_int8"} <= set(cpu["flags"]):
        assert "AMX" in cpu["extra_buffer_types"]
    text = CliRunner().invoke(app, ["inspect", "--devices"]).stdout
    assert "CPU features:" in text and "extra buffer types" in text
