"""hybrid_gguf.backend: flags, cache key, local version label (no compiling here)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from hybrid_gguf import backend


def test_patch_ships_in_the_package():
    assert backend.PATCH_PATH.is_file()
    assert b"llama_hybrid_version" in backend.patch_bytes()
    assert backend.patch_api_version() >= 1
    assert backend.local_version(True) == f"hybrid.{backend.patch_api_version()}"
    assert backend.local_version(False) is None


def test_user_cmake_args_are_kept_and_win(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    ours = backend.cmake_args(cuda=False)
    assert ours[-1] == "-DGGML_NATIVE=ON"
    monkeypatch.setenv("CMAKE_ARGS", '-DGGML_NATIVE=OFF -DGGML_BLAS=ON -DX="a b"')
    args = backend.cmake_args(cuda=False)
    assert args[:3] == ["-DGGML_NATIVE=OFF", "-DGGML_BLAS=ON", "-DX=a b"]
    assert "-DGGML_NATIVE=ON" not in args and set(backend.COMMON_CMAKE_ARGS) <= set(args)
    # the user's flags are part of the wheel's identity
    assert backend.build_key(True, args) != backend.build_key(True, ours)


def test_cache_key_is_unchanged_without_user_flags(monkeypatch):
    # wheels cached before the package owned the build logic must keep hitting
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setenv("HYBRID_GGUF_CUDA", "0")
    cfg = backend.config()
    h = hashlib.sha256()
    h.update(b"0.3.36")
    h.update(backend.PATCH_PATH.read_bytes())
    h.update(" ".join([*backend.COMMON_CMAKE_ARGS, "-DGGML_NATIVE=ON"]).encode())
    h.update(backend.cpu_isa_signature().encode())
    assert cfg.key == h.hexdigest()[:16]
    assert cfg.wheel_dir.name == f"hybrid-cpu-{cfg.key}"


def test_a_native_wheel_is_keyed_by_the_cpus_instruction_sets(monkeypatch, tmp_path):
    """A home shared by machines with other CPUs must not reuse a -march=native wheel: the
    key of a native build follows the CPU's instruction sets; a portable one's does not."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    native = list(backend.cmake_args(cuda=False))
    portable = list(backend.cmake_args(cuda=False, native=False))
    monkeypatch.setattr(backend, "cpu_isa_signature", lambda: "avx avx2 fma")
    a = backend.build_key(True, native), backend.build_key(True, portable)
    monkeypatch.setattr(backend, "cpu_isa_signature", lambda: "avx avx2 avx512f fma")
    b = backend.build_key(True, native), backend.build_key(True, portable)
    assert a[0] != b[0] and a[1] == b[1]
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu pni avx2 sse4_2 hypervisor avx512f amx_tile\n")
    from hybrid_gguf.llama.cpu_features import cpu_flags, isa_signature

    assert isa_signature(str(info)) == "amx_tile avx2 avx512f sse3 sse4_2"
    assert cpu_flags(str(info)) == ["sse3", "sse4_2", "avx2", "avx512f", "amx_tile"]
    assert isa_signature(str(tmp_path / "absent")).strip()  # the platform's name instead


def test_cuda_builds_are_native_unless_portable(monkeypatch):
    """The CPU computes the cold experts in CUDA builds too, so they get -march=native; a
    wheel meant for other machines asks for --portable."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert "-DGGML_NATIVE=ON" in backend.cmake_args(cuda=True, cuda_arch="90")
    assert "-DGGML_NATIVE=OFF" in backend.cmake_args(cuda=True, cuda_arch="90", native=False)
    assert "-DGGML_NATIVE=OFF" in backend.config(cuda=True, cuda_arch="90", portable=True).args


def test_local_version_satisfies_the_pin():
    assert SpecifierSet("==0.3.36").contains(Version("0.3.36+hybrid.2"))


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llama_cpp/__init__.py", "__version__ = '0.3.36'\n")
        info = zipfile.ZipInfo("llama_cpp/lib/libx.so")
        info.external_attr = 0o755 << 16
        z.writestr(info, b"\x7fELF")
        z.writestr("llama_cpp_python-0.3.36.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n")
        z.writestr("llama_cpp_python-0.3.36.dist-info/WHEEL", "Wheel-Version: 1.0\n")
        z.writestr("llama_cpp_python-0.3.36.dist-info/RECORD", "stale\n")
    return path


def test_retag_wheel(tmp_path):
    src = _fake_wheel(tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    out = backend.retag_wheel(src, "hybrid.2", {"patched": True}, tmp_path / "out")
    assert out.name == "llama_cpp_python-0.3.36+hybrid.2-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        di = "llama_cpp_python-0.3.36+hybrid.2.dist-info/"
        assert {di + "METADATA", di + "WHEEL", di + "RECORD", di + backend.BUILD_INFO_NAME} <= names
        assert not any(n.startswith("llama_cpp_python-0.3.36.dist-info") for n in names)
        assert "Version: 0.3.36+hybrid.2\n" in z.read(di + "METADATA").decode()
        assert json.loads(z.read(di + backend.BUILD_INFO_NAME)) == {"patched": True}
        assert z.getinfo("llama_cpp/lib/libx.so").external_attr >> 16 == 0o755
        rows = list(csv.reader(io.StringIO(z.read(di + "RECORD").decode())))
        for name, digest, size in rows:
            if name == di + "RECORD":
                assert digest == "" and size == ""
                continue
            assert digest == backend._record_hash(z.read(name)) and int(size) == len(z.read(name))
        assert {r[0] for r in rows} == names


def test_labeled_wheel_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HYBRID_GGUF_CUDA", "0")
    cfg = backend.config()
    cfg.wheel_dir.mkdir(parents=True)
    src = _fake_wheel(cfg.wheel_dir / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    assert backend.cached_wheel(cfg) == src
    labeled = backend.labeled_wheel(src, cfg)
    assert labeled.parent == cfg.wheel_dir and src.exists()
    assert backend.cached_wheel(cfg) == labeled  # preferred from now on
    assert backend.labeled_wheel(labeled, cfg) == labeled
    info = json.loads(zipfile.ZipFile(labeled).read(
        f"llama_cpp_python-0.3.36+{cfg.label}.dist-info/{backend.BUILD_INFO_NAME}"))
    assert info["key"] == cfg.key and info["patch_sha256"] == backend.patch_sha256()


def test_cuda_without_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDACXX", raising=False)
    with pytest.raises(backend.BackendError, match="nvcc"):
        backend.install(cuda=True)


def test_a_native_build_records_its_instruction_sets_and_a_cpu_without_them_is_named(monkeypatch):
    """The build info of a -march=native wheel carries the CPU's instruction sets; on a CPU
    lacking some of them cpu_isa_missing names those, and a portable build records none."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setattr(backend, "cpu_isa_signature", lambda: "avx avx2 avx512f fma")
    native = backend.build_info(backend.config(cuda=False))
    portable = backend.build_info(backend.config(cuda=False, portable=True))
    assert native["cpu_isa"] == "avx avx2 avx512f fma" and "cpu_isa" not in portable
    assert backend.cpu_isa_missing(native) == []
    monkeypatch.setattr(backend, "cpu_isa_signature", lambda: "avx avx2 fma")
    assert backend.cpu_isa_missing(native) == ["avx512f"]
    assert backend.cpu_isa_missing(portable) == [] and backend.cpu_isa_missing(None) == []
    assert backend.cpu_isa_missing({"cpu_isa": 7}) == []
    msg = backend.cpu_mismatch_message([f"isa{i}" for i in range(9)])
    assert "isa0, isa1, isa2, isa3, isa4, isa5 and 3 more" in msg and "hybrid-gguf backend install" in msg


def test_a_stock_dev_tree_builds_the_unpatched_source(monkeypatch, tmp_path):
    """`--dev-tree DIR --stock`: the stock source in a tree of its own, for A/Bs of the patch on
    the GPU machine; without --stock the patched one."""
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    calls = []
    monkeypatch.setattr(backend, "dev_build", lambda sdist, tree, args, patched=True: calls.append(patched) or tree)
    sdist = tmp_path / "sdist.tar.gz"
    assert backend.main(["--cpu", "--stock", "--dev-tree", str(tmp_path / "stock"), "--sdist", str(sdist)]) == 0
    assert backend.main(["--cpu", "--dev-tree", str(tmp_path / "patched"), "--sdist", str(sdist)]) == 0
    assert calls == [False, True]
