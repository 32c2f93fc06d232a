"""The package-level Python API: names in __all__, `plan` stays a function."""

from __future__ import annotations

import os
import sys
import types

import pytest

import hybrid_gguf


def test_all_lists_the_api():
    for name in hybrid_gguf.__all__:
        assert getattr(hybrid_gguf, name) is not None
    assert {"HybridModel", "inspect", "plan", "list_devices"} <= set(hybrid_gguf.__all__)
    assert set(hybrid_gguf.__all__) <= set(dir(hybrid_gguf))


def test_plan_stays_callable_after_the_plan_module_is_imported(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    import hybrid_gguf.planning.plan  # noqa: F401  the plan-file module
    from hybrid_gguf.planning.plan import Plan

    assert callable(hybrid_gguf.plan) and not isinstance(hybrid_gguf.plan, types.ModuleType)
    first = hybrid_gguf.plan(tiny_model, "8MiB", 512, calibrate=False, measure=False)
    assert isinstance(first.plan, Plan)
    # the call imported the planner and the plan module; the name still means the function
    again = hybrid_gguf.plan(str(tiny_model), 8 * 2**20, 512, calibrate=False, measure=False)
    assert isinstance(again.plan, Plan)
    assert not isinstance(hybrid_gguf.plan, types.ModuleType)


@pytest.mark.parametrize("given,expected", [({}, "20000000"), ({"GOMP_SPINCOUNT": "300000"}, "300000"),
                                            ({"OMP_WAIT_POLICY": "passive"}, None)])
def test_importing_sets_the_openmp_spin_only_where_the_user_chose_none(given, expected):
    """`import hybrid_gguf` lets OpenMP threads spin about 0.2 s before sleeping (libgomp reads
    GOMP_SPINCOUNT when llama_cpp loads it), unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", "import os, hybrid_gguf; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


_AFFINITY_AFTER_A_FORWARD = (
    "import os, sys\n"
    "import hybrid_gguf, llama_cpp\n"
    "m = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=2, verbose=False)\n"
    "m.eval(m.tokenize(b'one two three'))\n"  # an OpenMP team has run: any binding is in place
    "print(len(os.sched_getaffinity(0)), os.environ.get('OMP_PROC_BIND'))\n")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least two CPUs to tell a bound thread from a free one")
@pytest.mark.parametrize("given", [{"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, {"OMP_PLACES": "cores"},
                                   {"GOMP_CPU_AFFINITY": "0-1"}, {"OMP_PROC_BIND": "spread"}])
def test_importing_disarms_openmp_binding(given, tiny_model):
    """OpenMP binding pins the decoding thread to one core, and the CPU worker made after it
    inherits that core (realistic decode on the H200 host: 64.2 -> 14.8 tok/s). After `import
    hybrid_gguf` and a real CPU forward, the decoding thread may still use every CPU it had;
    HYBRID_GGUF_OMP_BIND=keep leaves the user's binding in force."""
    import subprocess

    allowed = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY",
                                                             "HYBRID_GGUF_OMP_BIND")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", _AFFINITY_AFTER_A_FORWARD, str(tiny_model)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(allowed), "false"]
    kept = subprocess.run([sys.executable, "-c", _AFFINITY_AFTER_A_FORWARD, str(tiny_model)],
                          capture_output=True, text=True, env=dict(env, HYBRID_GGUF_OMP_BIND="keep"), timeout=300)
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert int(kept.stdout.split()[0]) < allowed  # the user's binding, in force: the test can fail


def test_a_backend_built_for_another_cpu_is_refused_before_it_loads(tmp_path, tiny_model):
    """A -march=native llama-cpp-python built on a CPU with instructions this one lacks would
    die of SIGILL: its build info names them, and then `import llama_cpp` raises a one-line
    error, `run` exits 2 with it, and `doctor` reports it with its fix. The installed build is
    stood in for by a dist-info first on the path."""
    import subprocess

    info = tmp_path / "llama_cpp_python-0.3.36.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36+hybrid.13\n")
    (info / "hybrid_gguf_build.json").write_text('{"cpu_isa": "avx2 an_isa_no_cpu_has"}')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)

    imported = run("-c", "import hybrid_gguf, llama_cpp")
    assert imported.returncode != 0 and "BackendForAnotherCpu" in imported.stderr
    assert "built for another CPU (an_isa_no_cpu_has" in imported.stderr
    ran = run("-m", "hybrid_gguf.cli", "run", str(tiny_model), "-p", "hi", "-n", "2")
    assert ran.returncode == 2 and "another CPU" in ran.stderr and "Traceback" not in ran.stderr
    doc = run("-m", "hybrid_gguf.cli", "doctor")
    assert "an_isa_no_cpu_has" in doc.stdout and "hybrid-gguf backend install" in doc.stdout
    # the real build info (no such instruction set) loads as before
    plain = subprocess.run([sys.executable, "-c", "import hybrid_gguf, llama_cpp; print(hybrid_gguf.backend_for_another_cpu == '')"],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and plain.stdout.strip() == "True", plain.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C++ runtime workaround is Linux-only")
def test_importing_after_numpy_makes_the_cxx_runtime_global():
    """On the lent GPU machine a model load segfaulted in processes that imported numpy before
    llama_cpp, unless libstdc++ had been made global (tenth lease): `import hybrid_gguf` does
    that to the copy numpy loaded (a plain `import llama_cpp` leaves it local). Checked through
    the process's global symbol scope; the crash itself never happened on the dev box."""
    import subprocess

    code = ("import ctypes, numpy\n"
            "if not any('libstdc++' in l for l in open('/proc/self/maps')):\n"
            "    print('numpy loaded no libstdc++')\n"
            "else:\n"
            "    import hybrid_gguf\n"
            "    print(hasattr(ctypes.CDLL(None), '_ZNSt8ios_base4InitC1Ev'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "numpy loaded no libstdc++":
        pytest.skip("this numpy loads no libstdc++: nothing to make global")
    assert out.stdout.strip() == "True"
