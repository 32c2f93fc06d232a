from __future__ import annotations

from hybrid_gguf.llama import cpu_features


def test_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu pni avx2 fma amx_int8 avx512f\n\nprocessor\t: 1\nflags : x\n")
    assert cpu_features.cpu_flags(str(info)) == ["sse3", "fma", "avx2", "avx512f", "amx_int8"]
    assert cpu_features.cpu_flags(str(tmp_path / "missing")) == []


def test_cpu_report_shape():
    r = cpu_features.cpu_report()
    assert isinstance(r["flags"], list) and isinstance(r["extra_buffer_types"], list)
    assert isinstance(r["backend_features"], dict)
    if "error" not in r:
        assert r["backend_features"]  # the CPU backend always reports some features
        assert all(isinstance(n, str) and n for n in r["extra_buffer_types"])
