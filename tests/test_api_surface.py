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
