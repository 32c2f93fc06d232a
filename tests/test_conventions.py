"""Issue 18's conventions: -m/--model, -c/--ctx, one context default, aliases and Hugging
Face cache names in every command, --n-cpu-moe/--cpu-moe/--no-repack, stream() as an
iterator, llama-bench-shaped JSON, `status`, tables at 80 columns when piped, and the
small wrong outputs (CPU-only prefill, CPU-only hot experts "on GPU")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_gguf import models
from hybrid_gguf.errors import HybridError

REPO = Path(__file__).resolve().parent.parent
MODEL_COMMANDS = ("run", "serve", "inspect", "profile", "plan", "bench")


# -- the Hugging Face cache ------------------------------------------------------------------


def _hf_tree(root: Path, repo: str, revs: dict, main: str = None) -> Path:
    """A hub cache tree: models--org--name/snapshots/<rev>/<files>, refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    for i, (rev, files) in enumerate(revs.items()):
        snap = base / "snapshots" / rev
        for name, target in files.items():
            path = snap / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)  # as huggingface_hub does: a link into blobs/
        os.utime(snap, (1000 + i, 1000 + i))
    if main:
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(main)
    return base


def test_hf_cache_names_resolve_under_the_hub_cache(tmp_path, monkeypatch, tiny_model, tiny_model_factory):
    other = tiny_model_factory("qwen2moe")
    _hf_tree(tmp_path / "hub", "org/Tiny-GGUF", {"aaa": {"tiny.gguf": tiny_model},
                                                "bbb": {"tiny.gguf": other, "sub/x.gguf": other}}, main="aaa")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    res = models.resolve_model("org/Tiny-GGUF:tiny.gguf")
    assert res.source == "hf-cache" and res.path.resolve() == tiny_model.resolve()  # refs/main wins
    assert res.path.parent.name == "aaa"
    # a file only another snapshot holds (a subdirectory too)
    assert models.resolve_model("org/Tiny-GGUF:sub/x.gguf").path.parent.parent.name == "bbb"
    with pytest.raises(HybridError, match=r"no snapshot of org/Tiny-GGUF holds nope.gguf.*looked for"):
        models.resolve_model("org/Tiny-GGUF:nope.gguf")
    with pytest.raises(HybridError, match=r"org/Other is not in the Hugging Face cache .*downloads nothing"):
        models.resolve_model("org/Other:tiny.gguf")


def test_hf_cache_without_refs_takes_the_newest_snapshot_and_follows_hf_home(tmp_path, monkeypatch,
                                                                           tiny_model, tiny_model_factory):
    other = tiny_model_factory("qwen2moe")
    _hf_tree(tmp_path / "home" / "hub", "org/R", {"old": {"m.gguf": tiny_model}, "new": {"m.gguf": other}})
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert models.hf_hub_cache() == tmp_path / "home" / "hub"
    assert models.resolve_model("org/R:m.gguf").path.parent.name == "new"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"


def test_a_public_alias_is_found_in_the_hf_cache(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HybridError, match="not in the Hugging Face cache"):
        models.resolve_model("qwen3-30b-a3b")
    _hf_tree(tmp_path, "Qwen/Qwen3-30B-A3B-GGUF", {"r1": {"Qwen3-30B-A3B-Q4_K_M.gguf": tiny_model}}, main="r1")
    res = models.resolve_model("qwen3-30b-a3b")
    assert res.source == "hf-cache" and res.name == "qwen3-30b-a3b"


def test_an_hf_name_works_in_a_command(tmp_path, tiny_model):
    _hf_tree(tmp_path / "hub", "org/Tiny-GGUF", {"aaa": {"tiny.gguf": tiny_model}}, main="aaa")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "inspect", "org/Tiny-GGUF:tiny.gguf", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n_expert"] == 8


# -- flags every model command takes ---------------------------------------------------------


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_the_shared_flags(command):
    from typer.testing import CliRunner

    from hybrid_gguf.cli import app

    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag in ("-m", "--model", "MODEL"):
        assert flag in res.output, (command, flag)
    if command != "inspect":
        assert "-c" in res.output and "--ctx" in res.output, command
    if command in ("run", "serve", "profile", "bench"):
        assert "-t" in res.output and "--threads" in res.output, command
    if command in ("run", "serve"):
        for flag in ("--n-cpu-moe", "--cpu-moe", "--no-repack"):
            assert flag in res.output, (command, flag)


def test_model_given_twice_differently_is_one_line():
    from hybrid_gguf.commands.common import pick_model

    assert pick_model("a", None) == "a" and pick_model(None, "b") == "b" and pick_model("a", "a") == "a"
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "inspect", "synth-tiny", "-m", "synth-small"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "MODEL given twice" in res.stderr and "Traceback" not in res.stderr


def test_one_context_default(tiny_model):
    from types import SimpleNamespace

    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.limits import DEFAULT_CTX, default_ctx

    assert DEFAULT_CTX == 4096
    trained = lambda n: SimpleNamespace(arch="x", metadata={"x.context_length": n})  # noqa: E731
    assert default_ctx(trained(2048)) == 2048
    assert default_ctx(trained(131072)) == DEFAULT_CTX
    assert default_ctx(SimpleNamespace(arch="x", metadata={})) == DEFAULT_CTX
    assert default_ctx(trained(2048), 512) == 512
    assert default_ctx(read_inventory(tiny_model)) == 4096


# -- aliases in every command ----------------------------------------------------------------


@pytest.fixture()
def cli():
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from hybrid_gguf.cli import app

    def invoke(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (args, res.output, res.exception)
        return res.stdout

    return invoke


def test_aliases_in_inspect_profile_plan_bench_run(cli, tmp_path):
    fp = models.resolve_model("synth-tiny")
    assert json.loads(cli("inspect", "-m", "synth-tiny", "--json"))["path"] == str(fp.path)
    prof = json.loads(cli("profile", "synth-tiny", "--no-store", "-n", "2", "-t", "1", "-c", "256", "--json",
                          "--prompts", _prompts(tmp_path)))
    assert prof["model"] == str(fp.path)
    plan = json.loads(cli("plan", "-m", "synth-tiny", "--gpu-budget", "1MiB", "--no-measure", "--no-calibrate",
                          "--json"))
    assert plan["model"]["path"] == str(fp.path)
    assert plan["n_ctx"] == 4096  # the one default
    rows = json.loads(cli("bench", "-m", "synth-tiny", "--configs", "cpu-experts", "--reps", "1", "--pp", "16",
                          "--tg", "2", "--profile-tokens", "64", "-t", "1", "--no-calibrate", "--json"))
    assert {r["model_filename"] for r in rows} == {str(fp.path)}
    run = json.loads(cli("run", "-m", "synth-tiny", "-p", "def f(x):", "-n", "2", "-c", "256", "-t", "1",
                         "--no-record", "--json"))
    assert run["model"] == str(fp.path)


def test_serve_resolves_through_the_same_resolver(tmp_path):
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "serve", "-m", "no-such-alias"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "no model file or alias named 'no-such-alias'" in res.stderr
    assert "synth-tiny" in res.stderr  # the aliases it knows


def _prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\nimport os\n")
    return str(path)


# -- whole-layer placement by hand, --no-repack ----------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--n-cpu-moe", "1", "--cpu-moe"], "pass one"),
    (["--cpu-moe", "--hot", "0:1"], "pass one"),
    (["--n-cpu-moe", "2", "--plan", "p.yaml"], "pass one"),
    (["--n-cpu-moe", "-1"], "--n-cpu-moe"),
])
def test_placement_flags_exclude_each_other(args, message):
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", "synth-tiny", "-p", "x", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_n_cpu_moe_on_a_cpu_only_machine_says_there_is_nothing_to_place(tmp_path):
    from hybrid_gguf.llama.devices import gpu_devices

    if gpu_devices():
        pytest.skip("a GPU is present")
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", "synth-tiny", "-p", "x", "-n", "2",
                          "--n-cpu-moe", "1", "--no-record", "-t", "1", "-c", "256"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no GPU: --n-cpu-moe 1 has nothing to place" in res.stderr


def test_manual_whole_layer_placement_with_a_gpu(tiny_model_factory):
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.llama import devices
    from hybrid_gguf.header.inventory import read_inventory

    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    s = session_plan(path, inv, [gpu], 256, n_cpu_moe=3)
    assert s.placement.n_cpu_moe == 3 and not s.hot and "--n-cpu-moe 3" in s.summary.description
    s = session_plan(path, inv, [gpu], 256, n_cpu_moe=99, gpu_budget=1 << 30)  # capped; the budget is ignored, said so
    assert s.placement.n_cpu_moe == 4 and any("--gpu-budget ignored" in n for n in s.summary.notices)
    s = session_plan(path, inv, [gpu], 256, cpu_moe=True)
    assert "--cpu-moe" in s.summary.description and s.placement.n_cpu_moe is None


def test_the_whole_layer_fallback_is_the_planner_without_a_profile(tiny_model_factory):
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.llama import devices
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.placement import n_cpu_moe
    from hybrid_gguf.planning.memory import MemoryOptions, predict_memory
    from hybrid_gguf.planning.plan import DeviceBudget
    from hybrid_gguf.planning.planner import make_plan

    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    base = predict_memory(inv, n_cpu_moe(4), MemoryOptions(256), gpus=["CUDA0"]).gpu_bytes
    budget = base + int(2.5 * inv.layers[0].expert_bytes)  # room for two layers' experts
    s = session_plan(path, inv, [gpu], 256, gpu_budget=budget, auto_plan=False)
    plan = make_plan(inv, budget, 256, devices=[DeviceBudget("CUDA0", budget)])
    assert s.placement.rules == plan.placement().rules and not s.hot and plan.whole_layers(inv) == [2, 3]
    assert s.summary.mode == "whole-tensor" and "first 2 of 4 MoE layers" in s.summary.description
    assert any("no routing profile" in n for n in s.summary.notices)
    everything = session_plan(path, inv, [gpu], 256, auto_plan=False).summary  # all the GPU can give
    assert everything.mode == "gpu"


def test_no_repack_keeps_weights_in_plain_cpu_buffers(tiny_model_factory):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.model import HybridModel

    path = tiny_model_factory("qwen3moe", weight_type="Q4_K")
    with HybridModel(str(path), n_ctx=256, n_threads=1, record=False, repack=False) as hm:
        assert hm.llm.model_params.use_extra_bufts is False
        models_bufs = {k for k in hm.placement.buffers if k.startswith("model ")}
        assert models_bufs <= {"model CPU", "model CPU_Mapped"}, models_bufs
    with HybridModel(str(path), n_ctx=256, n_threads=1, record=False) as hm:
        assert hm.llm.model_params.use_extra_bufts is True


# -- stream() is an iterator -----------------------------------------------------------------


def test_stream_yields_text_pieces(tiny_model):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.model import HybridModel

    with HybridModel(str(tiny_model), n_ctx=256, n_threads=1, record=False) as hm:
        whole = hm.generate("def f(x):", max_tokens=8)
        pieces = hm.stream("def f(x):", max_tokens=8)
        got = list(pieces)
        assert all(isinstance(p, str) for p in got)
        assert "".join(got) == pieces.result.text == whole.text
        assert pieces.result.tokens == whole.tokens
        # closing early frees the model for the next call
        with hm.stream("def f(x):", max_tokens=8) as early:
            next(early)
        assert hm.generate("def f(x):", max_tokens=8).tokens == whole.tokens
        # the callback form still returns the result
        seen = []
        assert hm.stream("def f(x):", max_tokens=8, on_text=seen.append).text == "".join(seen)
        with pytest.raises(HybridError, match="exceed the context"):
            hm.stream("def f(x):", max_tokens=10_000)  # refused before the first piece


# -- small wrong outputs ---------------------------------------------------------------------


def test_gpu_prefill_pays_the_fixed_times(tiny_model):
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.calibration import Bandwidth
    from hybrid_gguf.planning.speed import predict_speed

    inv = read_inventory(tiny_model)
    bw = Bandwidth()
    every = {l.index: list(range(l.n_expert)) for l in inv.layers}
    sp = predict_speed(inv, None, every, True, bw, 4096, 512)
    assert sp.prefill_tokens_per_s <= 512 / (inv.n_layer * bw.gpu_layer_s + bw.gpu_step_s) + 1e-6


def test_plan_on_a_cpu_only_machine_says_what_runs_here(tmp_path):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.llama.devices import gpu_devices

    if gpu_devices():
        pytest.skip("a GPU is present")
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "plan", "synth-tiny", "--gpu-budget", "200MiB",
                          "--no-measure", "--no-calibrate"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "predicted on a GPU (none here" in res.stdout and "on this machine (CPU only)" in res.stdout
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "plan", "synth-tiny", "--gpu-budget", "200MiB",
                          "--no-measure", "--no-calibrate", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    here = json.loads(res.stdout)["here_cpu_only"]
    assert 0 < here["prefill_tokens_per_s"] < 1e7


def test_a_plan_with_hot_experts_on_a_cpu_only_machine_claims_no_gpu(tiny_model):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.autoplan import plan_model
    from hybrid_gguf.llama.devices import gpu_devices
    from hybrid_gguf.model import HybridModel

    if gpu_devices():
        pytest.skip("a GPU is present")
    if not hybrid_backend.capability().per_expert:
        pytest.skip(hybrid_backend.STOCK_NOTICE)
    plan = plan_model(tiny_model, 1 << 20, 256, measure=False, calibrate=False).plan
    plan.hot = {0: [1, 2], 1: [0]}
    plan.hot_device = "GPU"
    plan.backend = "per-expert"
    with HybridModel(str(tiny_model), plan=plan, n_ctx=256, n_threads=1, record=False) as hm:
        desc = hm.placement.description
        assert "3 hot experts packed on the CPU (no GPU here)" in desc and "GPU:" not in desc
        assert hm.placement.pack_device == "CPU" and hm.placement.gpu_experts == {}
        assert hm.placement.to_dict()["gpu_experts"] == 0


# -- status ----------------------------------------------------------------------------------


def test_status_lists_plan_profile_and_last_session(tmp_path):
    pytest.importorskip("llama_cpp")
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path), COLUMNS="80")

    def hg(*args):
        res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", *args], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert "no models yet" in hg("status")
    hg("run", "synth-tiny", "-p", "def f(x):", "-n", "4", "-t", "1", "-c", "256")
    hg("plan", "synth-tiny", "--gpu-budget", "1MiB", "--no-measure", "--no-calibrate",
       "--out", str(tmp_path / "plans" / "p.yaml"))
    rows = json.loads(hg("status", "--json"))
    assert len(rows) == 1
    row = rows[0]
    assert row["profile_sessions"] == 1 and row["plan"] == str(tmp_path / "plans" / "p.yaml")
    assert row["model"] == str(models.resolve_model("synth-tiny").path)
    assert row["last_session"]["prompt_selections"] > 0
    assert row["last_session"]["prompt_hit_rate"] == 0.0  # nothing in GPU memory here
    assert row["predicted_decode_tokens_per_s"] > 0 and isinstance(row["hot_experts"], dict)
    text = hg("ps")
    assert "sessions" in text and row["name"][:12] in text


# -- tables at 80 columns when piped ---------------------------------------------------------


def _narrow(args, tmp_path, model_path):
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path), COLUMNS="80")
    env.pop("FORCE_COLOR", None)
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stdout  # plain text when piped: no colour codes
    for line in res.stdout.splitlines():
        # a line may only run long to keep a path whole
        assert len(line) <= 80 or "/" in line, (args, line)
    for path in model_path:
        assert str(path) in res.stdout  # never broken mid-name
    return res.stdout


def test_tables_fit_80_columns_when_piped(tmp_path, tiny_model_factory):
    pytest.importorskip("llama_cpp")
    # a long path: it must come out whole, on a line of its own if need be
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "model-with-a-long-file-name.gguf"
    deep.parent.mkdir(parents=True)
    deep.symlink_to(tiny_model_factory("qwen3moe"))
    trace = tmp_path / "t.npz"
    _narrow(["inspect", str(deep), "--tensors"], tmp_path, [deep])
    out = _narrow(["profile", str(deep), "--no-store", "-n", "4", "-t", "1", "-c", "256", "--slots", "2,4,8",
                   "--prompts", _prompts(tmp_path), "--trace", str(trace)], tmp_path, [trace])
    assert "hit@8" in out and "100.0%" in out
    plan_out = tmp_path / "plan.yaml"
    out = _narrow(["plan", str(deep), "--gpu-budget", "2MiB", "--explain", "--replay", str(trace),
                   "--no-measure", "--no-calibrate", "--out", str(plan_out)], tmp_path, [plan_out])
    assert "oracle" in out and "memory by device" in out
    out = _narrow(["bench", str(deep), "--reps", "1", "--pp", "16", "--tg", "2", "--profile-tokens", "64",
                   "-t", "1", "--no-calibrate"], tmp_path, [])
    assert "per-expert" in out and "tg pred" in out


def test_bench_progress_bar_counts_placements_times_reps():
    import io

    from rich.console import Console

    from hybrid_gguf.commands.bench import _progress

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    bar = _progress(console, enabled=True)
    with bar as step:
        step(3 * 2, 0)   # three placements, two reps
        for _ in range(5):
            step(0, 1)
        task = bar.bar.tasks[0]
        assert (task.total, task.completed) == (6, 5)
        step(2, 0)       # a second budget adds its reps
        assert bar.bar.tasks[0].total == 8
    # off with --json, and when stderr is not a terminal
    assert _progress(console, enabled=False).__enter__()(1, 1) is None
    assert not _progress(Console(file=io.StringIO()), enabled=True).enabled
