"""Issue 13: the Python API never crashes on ordinary misuse.

Calls that used to segfault run in a child process, so a regression fails one test
instead of killing the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from hybrid_gguf.errors import HybridError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_child(code: str, tmp_path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HYBRID_GGUF_HOME=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(tmp_path))


@pytest.fixture(scope="module")
def f32_model(tiny_model_factory):
    return tiny_model_factory("qwen3moe", weight_type="F32")


def test_every_call_after_close_raises(f32_model, tmp_path):
    res = run_child(f"""
        from hybrid_gguf.model import HybridModel
        from hybrid_gguf.errors import HybridError
        hm = HybridModel({str(f32_model)!r}, n_ctx=128, n_threads=1, record=False)
        hm.close()
        hm.close()  # closing twice is fine
        calls = {{
            "generate": lambda: hm.generate("hi", max_tokens=2),
            "stream": lambda: hm.stream("hi", max_tokens=2),
            "tokenize": lambda: hm.tokenize("hi"),
            "create_completion": lambda: hm.create_completion("hi", max_tokens=2),
            "create_chat_completion": lambda: hm.create_chat_completion([{{"role": "user", "content": "hi"}}]),
            "llm": lambda: hm.llm,
        }}
        for name, call in calls.items():
            try:
                call()
            except HybridError as exc:
                assert "closed" in str(exc), (name, exc)
                print("refused", name)
            else:
                raise SystemExit(f"{{name}} after close did not raise")
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("refused") == 6


def test_two_threads_generating_on_one_model_are_serialized(f32_model, tmp_path):
    res = run_child(f"""
        import threading
        from hybrid_gguf.model import HybridModel
        hm = HybridModel({str(f32_model)!r}, n_ctx=128, n_threads=1, record=False)
        alone = hm.generate("def f(x):", max_tokens=12).tokens
        results, errors = [], []
        def work():
            try:
                for _ in range(3):
                    results.append(hm.generate("def f(x):", max_tokens=12).tokens)
            except BaseException as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        hm.close()
        assert not errors, errors
        assert len(results) == 9 and all(r == alone for r in results), results
        print("ok")
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout


def test_close_during_generate_waits_for_it(f32_model, tmp_path):
    res = run_child(f"""
        import threading, time
        from hybrid_gguf.model import HybridModel
        from hybrid_gguf.errors import HybridError
        hm = HybridModel({str(f32_model)!r}, n_ctx=256, n_threads=1, record=False)
        started = threading.Event()
        out = {{}}
        def on_text(piece):
            started.set()
            time.sleep(0.01)
        def work():
            out["res"] = hm.stream("def f(x):", max_tokens=60, on_text=on_text)
        t = threading.Thread(target=work)
        t.start()
        started.wait(60)
        hm.close()           # must wait for the running generation, not free it underneath
        t.join()
        assert len(out["res"].tokens) == 60, out
        try:
            hm.generate("x", max_tokens=1)
        except HybridError as exc:
            print("closed:", exc)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "closed:" in res.stdout


@pytest.mark.parametrize("n", [0, -5])
def test_max_tokens_below_one_is_refused(f32_model, n):
    from hybrid_gguf.model import HybridModel

    with HybridModel(str(f32_model), n_ctx=128, n_threads=1, record=False) as hm:
        with pytest.raises(HybridError, match="max_tokens"):
            hm.generate("hi", max_tokens=n)


def test_a_prompt_longer_than_the_requested_context_is_a_clear_error(f32_model):
    from hybrid_gguf.model import HybridModel

    # llama.cpp pads the context to 256 cells; llama-cpp-python sizes its arrays by the 64 asked for
    with HybridModel(str(f32_model), n_ctx=64, n_threads=1, record=False) as hm:
        with pytest.raises(HybridError, match="context of 64"):
            hm.generate("x" * 100, max_tokens=4)
        with pytest.raises(HybridError, match="context of 64"):
            hm.generate("x" * 50, max_tokens=20)
        assert len(hm.generate("x" * 20, max_tokens=4).tokens) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_threads=100000), "threads"),
    (dict(n_threads=-1), "threads"),
    (dict(n_ctx=2**40), "context"),
    (dict(n_ctx=10_000_000), "memory"),
    (dict(n_ctx=0), "context"),
    (dict(n_ubatch=0), "batch"),
])
def test_sizes_are_checked_before_loading(f32_model, tmp_path, kwargs, message):
    res = run_child(f"""
        import time
        from hybrid_gguf.model import HybridModel
        from hybrid_gguf.errors import HybridError
        t0 = time.monotonic()
        try:
            HybridModel({str(f32_model)!r}, record=False, **{kwargs!r})
        except HybridError as exc:
            print("refused:", exc)
        print("seconds:", time.monotonic() - t0)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused:" in res.stdout and message in res.stdout.split("refused:")[1], res.stdout
    assert float(res.stdout.split("seconds:")[1]) < 5


@pytest.mark.parametrize("ids", [[1, 100000], [1, -3]])
def test_token_ids_outside_the_vocabulary_are_refused(f32_model, ids):
    from hybrid_gguf.model import HybridModel

    with HybridModel(str(f32_model), n_ctx=128, n_threads=1, record=False) as hm:
        with pytest.raises(HybridError, match="vocabulary"):
            hm.generate(ids, max_tokens=2)
