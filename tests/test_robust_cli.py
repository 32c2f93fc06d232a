"""Issue 13: ordinary bad input to the CLI is one red line and exit status 2, never a
traceback, a crash, a hang or a silently wrong result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from hybrid_gguf.llama import hybrid as hybrid_backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(*args, stdin=None, tmp_path=None, timeout=120, memory_cap=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    if tmp_path is not None:
        env["HYBRID_GGUF_HOME"] = str(tmp_path / "cache")

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", *args], input=stdin,
                          capture_output=True, env=env, timeout=timeout,
                          preexec_fn=cap if memory_cap else None)


def assert_one_line_error(res, *fragments):
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 2, (res.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    text = " ".join(lines)
    # at most the model's notices before it, then the error (rich may wrap it)
    assert text.count("error:") == 1 and lines[-1] in text[text.index("error:"):], err
    for fragment in fragments:
        assert fragment in text, (fragment, err)


@pytest.fixture(scope="module")
def f32_model(tiny_model_factory):
    return str(tiny_model_factory("qwen3moe", weight_type="F32"))


# -- run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["-n", "0"], "-n"),
    (["-n", "-5"], "-n"),
    (["--threads", "100000"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--ctx", "10000000"], "memory"),
    (["--ctx", str(2**40)], "--ctx"),
    (["--ctx", "0"], "--ctx"),
])
def test_run_refuses_bad_numbers(f32_model, tmp_path, args, fragment):
    res = cli("run", f32_model, "-p", "hi", "--no-record", *args, tmp_path=tmp_path)
    assert_one_line_error(res, fragment)


def test_run_prompt_longer_than_ctx(f32_model, tmp_path):
    res = cli("run", f32_model, "-p", "x" * 100, "--ctx", "64", "-n", "4", "--no-record", "--threads", "1",
              tmp_path=tmp_path)
    assert_one_line_error(res, "context of 64")


def test_run_invalid_utf8_on_stdin(f32_model, tmp_path):
    res = cli("run", f32_model, "--no-record", "-n", "2", stdin=b"abc \xff\xfe def\n", tmp_path=tmp_path)
    assert_one_line_error(res, "UTF-8")


def test_run_lone_surrogate_in_prompt(f32_model, tmp_path):
    # an argument that is not UTF-8 reaches Python as a lone surrogate (surrogateescape)
    env = dict(os.environ, PYTHONPATH=str(REPO), HYBRID_GGUF_HOME=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable.encode(), b"-m", b"hybrid_gguf.cli", b"run", f32_model.encode(),
                          b"--no-record", b"-n", b"2", b"-p", b"abc\xffdef"], capture_output=True, env=env,
                         timeout=120)
    assert_one_line_error(res, "UTF-8")


@pytest.mark.skipif(not hybrid_backend.capability().per_expert, reason=hybrid_backend.STOCK_NOTICE)
def test_run_hot_layer_without_experts_is_named(f32_model, tmp_path):
    res = cli("run", f32_model, "-p", "hi", "--no-record", "--hot", "0:", tmp_path=tmp_path)
    assert_one_line_error(res, "layer 0 lists no experts")


def test_run_plan_that_is_not_a_regular_file(f32_model, tmp_path):
    res = cli("run", f32_model, "-p", "hi", "--no-record", "--plan", "/dev/zero", tmp_path=tmp_path,
              timeout=60, memory_cap=4 << 30)  # a regression reads /dev/zero until memory runs out
    assert_one_line_error(res, "/dev/zero", "not a regular file")


def test_run_plan_directory(f32_model, tmp_path):
    res = cli("run", f32_model, "-p", "hi", "--no-record", "--plan", str(tmp_path), tmp_path=tmp_path)
    assert_one_line_error(res, "not a regular file")


def test_run_names_a_profile_from_another_model_and_what_to_do(f32_model, tmp_path):
    """A profile stored under this model's name but made for another one: the error names
    the file to move aside, and is reported before anything is generated."""
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

    fp = read_inventory(f32_model).fingerprint
    store = ProfileStore(tmp_path / "cache" / "profiles")
    RoutingProfile.empty("0" * 32, "qwen3moe", 2, 8, 2).save(store.path_for(fp))
    res = cli("run", f32_model, "-p", "hi", "-n", "2", "--threads", "1", tmp_path=tmp_path)
    assert_one_line_error(res, "another model", store.path_for(fp).name, "move that file aside")
    assert b"hi" not in res.stdout  # refused before generating


# -- profile / plan / bench ------------------------------------------------------------------------


def test_profile_store_pointing_at_a_file(f32_model, tmp_path):
    store = tmp_path / "store.txt"
    store.write_text("not a directory")
    res = cli("profile", f32_model, "-n", "2", "--ctx", "64", "--threads", "1", "--store", str(store),
              tmp_path=tmp_path)
    assert_one_line_error(res, "--store", "not a directory")


def test_profile_out_into_a_missing_folder_fails_before_the_run(f32_model, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "p.json"
    res = cli("profile", f32_model, "-n", "2", "--ctx", "64", "--threads", "1", "--out", str(out),
              tmp_path=tmp_path)
    assert_one_line_error(res, "--out", "does not exist")
    assert b"profiling" not in res.stderr  # refused before loading the model


def test_profile_heatmap_into_a_directory_is_refused(f32_model, tmp_path):
    res = cli("profile", f32_model, "-n", "2", "--ctx", "64", "--threads", "1", "--heatmap", str(tmp_path),
              "--no-store", tmp_path=tmp_path)
    assert_one_line_error(res, "--heatmap", "directory")


def test_profile_heatmap_reports_the_file_written(f32_model, tmp_path):
    from hybrid_gguf.llama.recorder import recorder_status

    ok, why = recorder_status()
    if not ok:
        pytest.skip(why)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    res = cli("profile", f32_model, "--prompts", str(prompts), "-n", "2", "--ctx", "64", "--threads", "1",
              "--heatmap", str(tmp_path / "heat"), "--no-store", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    written = [p for p in tmp_path.iterdir() if p.name.startswith("heat")]
    assert len(written) == 1
    assert f"wrote {written[0]}" in res.stdout.decode()


def test_profile_threads_out_of_range(f32_model, tmp_path):
    res = cli("profile", f32_model, "-n", "2", "--ctx", "64", "--threads", "100000", tmp_path=tmp_path)
    assert_one_line_error(res, "--threads")


def test_plan_out_is_a_directory(f32_model, tmp_path):
    res = cli("plan", f32_model, "--gpu-budget", "16MiB", "--ctx", "256", "--no-measure", "--no-calibrate",
              "--out", str(tmp_path), tmp_path=tmp_path)
    assert_one_line_error(res, "--out", "directory")


def test_bench_reps_zero(f32_model, tmp_path):
    res = cli("bench", f32_model, "--reps", "0", "--no-probe-gpu", tmp_path=tmp_path)
    err = res.stderr.decode()
    assert res.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "--reps" in err
