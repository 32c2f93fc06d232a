"""`hybrid-gguf profile`: JSON output, the store, heatmap, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import llama_cpp  # noqa: F401  (load libllama first)
from hybrid_gguf.commands import profile as profile_cmd
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile
from hybrid_gguf.llama.recorder import recorder_status
from hybrid_gguf.routing.workload import builtin_workload, chunk_text, load_prompts_file

ok, why = recorder_status()


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _group() -> None:  # keep "profile" a subcommand even when it is the only one
        pass

    profile_cmd.register(app)
    return app


def invoke(*args):
    # wide terminal: the per-layer table must not squeeze its columns away
    # one thread: spin-waiting llama.cpp threads crawl on a shared 2-core box
    return CliRunner().invoke(make_app(), ["profile", "--threads", "1", *map(str, args)],
                              env={"COLUMNS": "200"})


@pytest.mark.skipif(not ok, reason=why)
def test_json_counts_store_and_files(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3moe", n_layer=3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n\nsecond prompt, a bit longer than the first\n")
    store = tmp_path / "store"
    res = invoke(path, "--prompts", prompts, "-n", 5, "--ctx", 128, "--json",
                 "--store", store, "--out", tmp_path / "out.json",
                 "--heatmap", tmp_path / "h.png", "--label", "unit")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    counts = np.array(data["counts"])
    tokens = np.array(data["tokens_per_layer"])
    assert counts.shape == (3, 8) and data["n_expert_used"] == 2
    np.testing.assert_array_equal(counts.sum(1), tokens * 2)
    assert tokens[0] == tokens[1] > 10 and data["tokens_decode"] == [10, 10, 10]
    assert len(data["summaries"]["layers"]) == 3 and data["label"] == "unit"
    fp = read_inventory(path).fingerprint
    stored = ProfileStore(store).load(fp)
    np.testing.assert_array_equal(stored.counts, counts)
    assert stored.labels == {"unit": 1} and data["store_sessions"] == 1
    out = RoutingProfile.load(tmp_path / "out.json", expected_fingerprint=fp)
    np.testing.assert_array_equal(out.counts, counts)
    assert (tmp_path / "h.png").stat().st_size > 1000
    # a second session merges into the store
    res = invoke(path, "--prompts", prompts, "-n", 5, "--ctx", 128, "--json",
                 "--store", store, "--label", "unit")
    assert res.exit_code == 0, res.output
    assert ProfileStore(store).load(fp).sessions == 2


def test_sampled_decode_records_other_routes_than_greedy(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3moe", n_layer=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")

    def decode_counts(*extra):
        res = invoke(path, "--prompts", prompts, "-n", 24, "--ctx", 128, "--json", "--no-store", *extra)
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout.strip().splitlines()[-1])
        assert data["tokens_decode"] == [24, 24]
        return np.array(data["counts_decode"])

    greedy = decode_counts()
    np.testing.assert_array_equal(greedy, decode_counts("--temp", "0"))  # greedy is deterministic
    sampled = decode_counts("--temp", "1.5", "--seed", "3")
    assert not np.array_equal(sampled, greedy)
    assert invoke(path, "--prompts", prompts, "--temp", "-1").exit_code != 0


@pytest.mark.skipif(not ok, reason=why)
def test_table_output(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3moe")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "line one\nline two", "label": "x"}) + "\n")
    res = invoke(path, "--prompts", prompts, "-n", 3, "--ctx", 64, "--no-store",
                 "--slots", "2,4")
    assert res.exit_code == 0, res.output
    assert "entropy" in res.output and "hit@4" in res.output
    assert not list(tmp_path.glob("**/*.lock"))


def test_dense_model_has_nothing_to_record(tiny_model_factory):
    res = invoke(tiny_model_factory("dense"), "--json", "--no-store")
    assert res.exit_code == 0
    assert "nothing to record" in json.loads(res.stdout)["message"]


def test_missing_and_empty_prompts(tiny_model, tmp_path):
    res = invoke(tiny_model, "--prompts", tmp_path / "nope.txt")
    assert isinstance(res.exception, HybridError) and "does not exist" in str(res.exception)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    res = invoke(tiny_model, "--prompts", empty)
    assert isinstance(res.exception, HybridError) and "no prompts" in str(res.exception)
    res = invoke(tiny_model, "--text", empty)
    assert isinstance(res.exception, HybridError) and "empty" in str(res.exception)
    res = invoke(tmp_path / "missing.gguf")
    assert isinstance(res.exception, HybridError)


def test_workload_parsing(tmp_path):
    w = builtin_workload()
    assert len(w.prompts) >= 20 and w.label == "mixed"
    assert len({p.label for p in w.prompts}) >= 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(HybridError, match="bad.jsonl:1"):
        load_prompts_file(bad)
    text = "para one.\n\n" + "word " * 300 + "\n\nlast"
    chunks = chunk_text(text, 200)
    assert "".join(chunks) == text and all(len(c) <= 200 for c in chunks)


@pytest.mark.skipif(not ok, reason=why)
def test_profile_reads_the_header_once(tiny_model_factory, tmp_path, monkeypatch):
    from hybrid_gguf import model as model_mod
    from hybrid_gguf.header import inventory as inventory_mod

    path = tiny_model_factory("qwen3moe", n_layer=2)
    read = []

    def counted(p, *args, **kwargs):
        read.append(p)
        return real(p, *args, **kwargs)

    real = inventory_mod.read_inventory
    monkeypatch.setattr(inventory_mod, "read_inventory", counted)
    monkeypatch.setattr(model_mod, "read_inventory", counted)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")
    res = invoke(path, "--prompts", prompts, "-n", 3, "--ctx", 128, "--json", "--no-store")
    assert res.exit_code == 0, res.output
    assert len(read) == 1


@pytest.mark.skipif(not ok, reason=why)
def test_a_profiling_session_records_every_token_and_stores_nothing(tiny_model_factory, tmp_path, monkeypatch):
    from hybrid_gguf.model import HybridModel

    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    path = tiny_model_factory("qwen3moe", n_layer=2)
    hm = HybridModel(path, n_ctx=256, n_threads=1, profiling=True, auto_plan=False)
    res = hm.generate(list(range(3, 20)), max_tokens=100)
    snap = hm.recorder.snapshot()
    hm.close()
    # every generated token but the last was decoded, and each decode was observed
    decoded = len(res.tokens) - (res.finish_reason == "length")
    assert decoded > 64 and snap.tokens_decode.tolist() == [decoded, decoded]
    assert len(snap.trace.token) > 0
    assert ProfileStore().load(read_inventory(path).fingerprint) is None  # the caller stores it


def test_cpu_only_places_nothing_on_a_gpu(tiny_model_factory, monkeypatch):
    from hybrid_gguf.llama import devices
    from hybrid_gguf.model import HybridModel

    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    monkeypatch.setattr(devices, "gpu_devices", lambda: [gpu])
    hm = HybridModel(tiny_model_factory("qwen3moe", n_layer=2), n_ctx=128, n_threads=1, record=False,
                     cpu_only=True)
    try:
        assert hm.placement.mode == "cpu" and hm.placement.n_gpu_layers == 0
    finally:
        hm.close()
