"""Input files a command reads whole (prompts, text, profiles, plans, traces, models.yaml) and
the images it writes: a device, a pipe, a corrupt archive or an unwritable image name is a
one-line error before any work, never a hang, a traceback or gigabytes of memory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.readfile import read_bounded, read_bounded_text
from hybrid_gguf.routing.replay import MAX_TRACE_ENTRIES, load_trace

MODEL = Path(__file__).resolve().parent.parent / "hybrid_gguf" / "data" / "tiny-moe-stdlib.gguf"


def cli(*args, home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYBRID_GGUF_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, res.stderr
    return last


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


# --- the reader itself ------------------------------------------------------------------------


def test_read_bounded_refuses_devices_pipes_folders_and_big_files(tmp_path, fifo):
    with pytest.raises(HybridError, match="is not a regular file .it is a device, pipe or socket"):
        read_bounded("/dev/zero", "prompts file", 1 << 20)
    with pytest.raises(HybridError, match="is not a regular file .it is a device, pipe or socket"):
        read_bounded(fifo, "prompts file", 1 << 20)  # opening it must not wait for a writer
    with pytest.raises(HybridError, match="is not a regular file .it is a directory"):
        read_bounded(tmp_path, "prompts file", 1 << 20)
    with pytest.raises(HybridError, match="does not exist"):
        read_bounded(tmp_path / "missing", "prompts file", 1 << 20)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2049)
    with pytest.raises(HybridError, match="larger than 2.00 KiB"):
        read_bounded(big, "prompts file", 2048)
    assert read_bounded(big, "prompts file", 4096) == b"x" * 2049
    big.write_bytes(b"ok \xff")
    with pytest.raises(HybridError, match="not UTF-8 text .byte offset 3"):
        read_bounded_text(big, "prompts file", 4096)


# --- the commands -----------------------------------------------------------------------------


@pytest.mark.parametrize("option,what", [("--prompts", "prompts file"), ("--text", "text file")])
def test_profile_refuses_a_device_or_pipe_as_its_workload(option, what, tmp_path, fifo):
    for path in ("/dev/zero", fifo):
        res = cli("profile", MODEL, option, path, "-n", "2", "--no-store", home=tmp_path)
        one_line_error(res, what, "not a regular file")


def test_plan_refuses_a_device_as_its_profile(tmp_path):
    res = cli("plan", MODEL, "--gpu-budget", "0", "--no-measure", "--profile", "/dev/zero", home=tmp_path)
    one_line_error(res, "routing profile /dev/zero is not a regular file")


def test_an_image_name_matplotlib_cannot_write_is_refused_before_the_work(tmp_path):
    trace = tmp_path / "t.npz"
    np.savez(trace, ids=np.zeros((4, 4, 2), dtype=np.int32), n_expert=np.int64(16))
    res = cli("plan", MODEL, "--gpu-budget", "0", "--no-measure", "--replay", trace, "--plot",
              tmp_path / "p.txt", home=tmp_path)
    one_line_error(res, "--plot", "cannot write '.txt' images")
    res = cli("plan", MODEL, "--gpu-budget", "0", "--no-measure", "--replay", trace, "--plot",
              tmp_path / "nowhere" / "p.png", home=tmp_path)
    one_line_error(res, "--plot", "does not exist")
    # a name without a suffix is a PNG, and the command names the file it wrote
    res = cli("plan", MODEL, "--gpu-budget", "0", "--no-measure", "--replay", trace, "--plot",
              tmp_path / "chart", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert str(tmp_path / "chart.png") in res.stdout + res.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_status_names_the_plans_it_cannot_read(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "broken.yaml").write_text("format: hybrid-gguf-plan\npredicted:\n  memory:\n    CUDA0: {total: abc}\n")
    res = cli("status", "--plans", plans, "--store", tmp_path / "store", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "skipped plan" in res.stderr and "broken.yaml" in res.stderr


# --- routing traces ---------------------------------------------------------------------------


def _zip_with(path: Path, name: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, data)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "cannot read trace"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really"), "cannot read trace"),
    (lambda p: np.savez(p, ids=np.zeros((5, 4, 0), dtype=np.int32)), "empty"),
    (lambda p: np.savez(p, ids=np.zeros((0, 4, 2), dtype=np.int32)), "empty"),
    (lambda p: np.savez(p, ids=np.zeros((5, 4), dtype=np.int32)), "integer array of 3 dimension"),
    (lambda p: np.savez(p, ids=np.full((5, 4, 2), 0.5)), "integer array of 3 dimension"),
    (lambda p: np.savez(p, ids=np.full((5, 4, 2), 2**40, dtype=np.int64)), "beyond 32 bits"),
    (lambda p: np.savez(p, ids=np.zeros((5, 4, 2), dtype=np.int32), n_expert=np.int64(10**6)), "n_expert"),
    (lambda p: np.savez(p, ids=np.zeros((5, 4, 2), dtype=np.int32), n_expert=np.zeros(3, dtype=np.int64)),
     "n_expert"),
    (lambda p: np.savez(p, token=np.arange(2), layer=np.array([0, 10**6]), ids=np.zeros((2, 2), dtype=np.int32)),
     "more than llama.cpp allows"),
    # unique tokens times layers would make a [tokens, layers, k] table far larger than the file
    (lambda p: np.savez(p, token=np.arange(40000), layer=np.arange(40000) % 500,
                        ids=np.zeros((40000, 1), dtype=np.int32)), "more than a routing trace can be"),
])
def test_a_broken_trace_is_one_line(tmp_path, make, message):
    path = tmp_path / "t.npz"
    make(path)
    with pytest.raises(HybridError) as info:
        load_trace(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_trace_at_the_entry_bound_is_refused_from_its_header(tmp_path):
    ids = np.zeros((MAX_TRACE_ENTRIES // 8 + 1, 4, 2), dtype=np.int32)
    np.savez_compressed(tmp_path / "many.npz", ids=ids)
    with pytest.raises(HybridError, match="larger than a routing trace can be"):
        load_trace(tmp_path / "many.npz")


def test_a_trace_that_is_a_device_is_refused(tmp_path):
    with pytest.raises(HybridError, match="not a regular file"):
        load_trace("/dev/zero")


# --- models.yaml ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "a models file is a mapping"),
    ("bundled: [a, b]\n", "`bundled` must map model names"),
    ("bundled:\n  tiny: just-a-string\n", "must be a mapping"),
    ("public:\n  big: {repo: [1, 2], file: x.gguf}\n", "are text"),
    ("default: [x]\n", "`default` must be a model name"),
    ("bundled: {a: [\n", "is not valid YAML"),
])
def test_a_broken_models_yaml_is_one_line(tmp_path, monkeypatch, text, message):
    from hybrid_gguf.models import load_models_yaml

    path = tmp_path / "models.yaml"
    path.write_text(text)
    monkeypatch.setenv("HYBRID_GGUF_MODELS_YAML", str(path))
    with pytest.raises(HybridError) as info:
        load_models_yaml()
    assert message in str(info.value) and "\n" not in str(info.value)


# --- outputs: nothing is lost ---------------------------------------------------------------


def test_outputs_never_replace_a_model_an_input_or_a_device(tmp_path, fifo):
    model = tmp_path / "m.gguf"
    model.write_bytes(MODEL.read_bytes())
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n")
    plan = ("plan", model, "--gpu-budget", "0", "--no-measure", "--out")
    one_line_error(cli(*plan, model, home=tmp_path), "--out", "is also this command's input")
    other = tmp_path / "other.gguf"
    other.write_bytes(MODEL.read_bytes())
    one_line_error(cli(*plan, other, home=tmp_path), "--out", "is a GGUF model")
    one_line_error(cli(*plan, fifo, home=tmp_path), "--out", "device, pipe or socket")
    one_line_error(cli("profile", model, "--prompts", prompts, "-n", "2", "--no-store", "--out",
                       tmp_path / "new" / "p.json", home=tmp_path), "--out", "does not exist")
    assert not (tmp_path / "new").exists()
    one_line_error(cli(*plan, prompts / "sub" / "p.yaml", home=tmp_path), "--out", "Not a directory")
    # plan --out makes the folders a plan goes in
    assert cli(*plan, tmp_path / "plans" / "p.yaml", home=tmp_path).returncode == 0
    assert (tmp_path / "plans" / "p.yaml").is_file()
    one_line_error(cli("profile", model, "--prompts", prompts, "-n", "2", "--no-store", "--out", prompts,
                       home=tmp_path), "--out", "is also this command's input")
    assert model.read_bytes() == other.read_bytes() == MODEL.read_bytes()
    assert prompts.read_text() == "def f(x):\n"
    assert fifo.is_fifo()


def test_a_path_the_system_refuses_is_one_line(tmp_path):
    one_line_error(cli("inspect", "a" * 5000, home=tmp_path), "File name too long")


@pytest.mark.parametrize("option", ["--temp"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_temperature_that_is_not_a_finite_number_is_refused(tmp_path, option, value):
    one_line_error(cli("run", MODEL, "-p", "x", "-n", "1", option, value, home=tmp_path), "--temp")


def test_a_huge_context_is_planned_without_a_dry_run_that_would_fill_memory(tmp_path):
    res = cli("plan", MODEL, "--gpu-budget", "6MiB", "-c", "2000000000", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "dry run failed: a context of 2000000000 tokens" in " ".join(res.stdout.split())


@pytest.mark.parametrize("content", ['[1]', '{"format": "hybrid-gguf-calibration", "machines": []}',
                                     '{"format": "hybrid-gguf-calibration", "machines": null}',
                                     "[" * 100000 + "]" * 100000, "\xff not json"])
def test_a_broken_calibration_cache_is_measured_again(tmp_path, content):
    home = tmp_path / "home"
    calib = home / "cache" / "calibration.json"  # paths.calibration_path() under HYBRID_GGUF_HOME
    calib.parent.mkdir(parents=True)
    calib.write_text(content, errors="surrogateescape")
    res = cli("plan", MODEL, "--gpu-budget", "6MiB", "--no-measure", home=home)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_deeply_nested_jsonl_prompts_are_one_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[" * 100000 + "]" * 100000 + "\n")
    one_line_error(cli("profile", MODEL, "--prompts", prompts, "-n", "2", "--no-store", home=tmp_path),
                   "nested too deeply")


def test_a_hugging_face_ref_that_is_not_text_is_no_ref(tmp_path, monkeypatch):
    from hybrid_gguf.models import resolve_hf_cache

    root = tmp_path / "hub" / "models--org--repo"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_bytes(b"\xff\xfe")
    snap = root / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "m.gguf").write_bytes(b"GGUF")
    assert resolve_hf_cache("org/repo", "m.gguf", cache=tmp_path / "hub") == snap / "m.gguf"


@pytest.mark.parametrize("value", ["-1", "8,,32", "0", "x"])
def test_slots_are_positive_whole_numbers(tmp_path, value):
    one_line_error(cli("profile", MODEL, "--slots", value, "-n", "1", "--no-store", home=tmp_path), "--slots")


def test_a_prompt_far_longer_than_the_context_is_cut_before_tokenizing(monkeypatch):
    from types import SimpleNamespace

    from hybrid_gguf.commands import profile as profile_cmd

    seen = []

    class FakeModel:
        llm = object()

        def tokenize(self, text):
            seen.append(len(text))
            return list(range(len(text)))

        def generate(self, tokens, max_tokens, temperature):
            return SimpleNamespace(tokens=[0] * (max_tokens - 1))

    monkeypatch.setattr("hybrid_gguf.limits.context_size", lambda llm: 256)
    n_prompt, _ = profile_cmd.run_prompt(FakeModel(), "x" * 3_000_000, n_predict=4)
    assert n_prompt == 251
    assert seen == [251 * profile_cmd.MAX_CHARS_PER_TOKEN]
