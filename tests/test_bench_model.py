"""Bench models: random quant-block experts, everything else exactly synth.py's."""

from __future__ import annotations

try:  # load libllama before numpy-heavy work (docs/backend-patch.md, "Import order")
    import llama_cpp
except ImportError:  # the CPU wheel may not be installed in a bare checkout
    llama_cpp = None

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from hybrid_gguf.bench import model_maker as bm
from hybrid_gguf import synth
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory

ROOT = Path(__file__).resolve().parent.parent
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable")
EXPERT_TYPES = ("Q4_K", "Q8_0")


def tiny(weight_type: str, **kw) -> synth.SynthSpec:
    # n_embd = n_ff_exp = 256: rows of whole Q4_K blocks, so Q4_K is really used.
    kw = {"n_layer": 2, "n_expert": 8, **kw}
    return bm.bench_spec("tiny-q4k", weight_type, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """weight type -> (spec, path) of a 2-layer, 8-expert bench model."""
    d = tmp_path_factory.mktemp("bench")
    out = {}
    for wt in EXPERT_TYPES:
        spec = tiny(wt, zipf=1.2)
        out[wt] = (spec, bm.write_bench_model(d / f"{wt}.gguf", spec, workers=1).path)
    return out


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------------------
# Block formats


@pytest.mark.parametrize("qtype", EXPERT_TYPES)
@pytest.mark.parametrize("std", [1 / np.sqrt(2048), 0.1 / np.sqrt(768)])
def test_random_blocks_dequantize_to_the_target_std(qtype, std):
    fmt = bm.block_format(qtype, std)
    raw = np.random.default_rng(0).integers(0, 256, (2048, fmt.block_bytes), dtype=np.uint8)
    raw[:, :len(fmt.header)] = np.frombuffer(fmt.header, dtype=np.uint8)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert w.size == 2048 * fmt.block_size
    assert w.std() == pytest.approx(std, rel=0.02)
    assert abs(w.mean()) < 0.02 * std


def test_q4_k_scale_packing_matches_ggml():
    sc, m = [1, 5, 17, 33, 63, 2, 40, 9], [0, 63, 7, 20, 31, 45, 12, 60]
    block = np.full((1, 144), 0x11, dtype=np.uint8)  # every 4-bit quant = 1
    block[0, :16] = np.frombuffer(np.array([1.0, 0.5], "<f2").tobytes()
                                  + bm.pack_q4_k_scales(sc, m), dtype=np.uint8)
    w = gguf.quants.dequantize(block, gguf.GGMLQuantizationType.Q4_K).reshape(8, 32)
    expected = np.array(sc) * 1.0 - 0.5 * np.array(m)  # d*sc*q - dmin*m
    np.testing.assert_array_equal(w, np.repeat(expected[:, None], 32, axis=1))


# ---------------------------------------------------------------------------
# Layout, metadata, content


@pytest.mark.parametrize("wt", EXPERT_TYPES)
def test_inventory_sees_expert_shapes_and_types(models, wt):
    spec, path = models[wt]
    inv = read_inventory(path)
    D, F, E, L = spec.n_embd, spec.n_ff_exp, spec.n_expert, spec.n_layer
    assert (inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used) == ("qwen3moe", L, E, 2)
    assert inv.n_embd == D and inv.expert_ff_length == F
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wt]]
    per_expert = 3 * D * F // block * size
    for i in range(L):
        p = f"blk.{i}."
        for name, shape in (("ffn_gate_exps", (D, F, E)), ("ffn_up_exps", (D, F, E)),
                            ("ffn_down_exps", (F, D, E))):
            t = inv.tensor(p + name + ".weight")
            assert (t.ggml_type, t.shape, t.n_expert) == (wt, shape, E)
        assert inv.tensor(p + "ffn_gate_inp.weight").ggml_type == "F32"
        assert inv.tensor(p + "attn_q.weight").ggml_type == bm.DENSE_TYPE
        assert inv.layers[i].per_expert_bytes == per_expert
    assert inv.expert_bytes_total == L * E * per_expert
    # Offsets the generator wrote to agree with the header gguf-py wrote.
    by_name = tensors(path)
    for t in inv.tensors:
        assert t.data_offset == by_name[t.name].data_offset
    assert inv.total_bytes <= inv.file_size == path.stat().st_size


@pytest.mark.parametrize("wt", EXPERT_TYPES)
def test_metadata_matches_synth(models, wt):
    spec, path = models[wt]
    assert np.array_equal(synth.read_popularity(path), synth.popularity(spec))
    f = gguf.GGUFReader(path).fields
    assert json.loads(f[synth.KEY_SPEC].contents()) == spec.to_dict()
    assert f[synth.KEY_ZIPF].contents() == pytest.approx(1.2)
    assert f[bm.KEY_EXPERT_TYPE].contents() == wt
    assert f[bm.KEY_BENCH_VERSION].contents() == bm.BENCH_VERSION


@pytest.mark.parametrize("wt", EXPERT_TYPES)
def test_non_expert_tensors_are_synths_bytes(models, tmp_path, wt):
    # synth.py writes the same spec with Q8_0 matrices: router, embeddings,
    # attention and norms must be byte-identical; only routed experts differ.
    spec, path = models[wt]
    ref = tensors(synth.write_synthetic_moe(tmp_path / "ref.gguf", tiny("Q8_0", zipf=1.2)))
    ours = tensors(path)
    assert list(ours) == list(ref)
    for name, t in ours.items():
        if not name.endswith("_exps.weight"):
            assert t.tensor_type == ref[name].tensor_type, name
            assert np.array_equal(np.asarray(t.data), np.asarray(ref[name].data)), name


@pytest.mark.parametrize("wt", EXPERT_TYPES)
def test_experts_are_random_blocks_with_synths_std(models, wt):
    spec, path = models[wt]
    ts = tensors(path)
    qt = gguf.GGMLQuantizationType[wt]
    for name, std in (("blk.1.ffn_up_exps.weight", 1 / np.sqrt(spec.n_embd)),
                      ("blk.1.ffn_down_exps.weight", synth._OUT_SCALE / np.sqrt(spec.n_ff_exp))):
        raw = np.asarray(ts[name].data)  # (E, rows, row bytes)
        w = gguf.quants.dequantize(raw, qt)
        assert np.isfinite(w).all()
        assert w.std() == pytest.approx(std, rel=0.05)
        assert not np.array_equal(raw[0], raw[1])  # experts differ
    assert not np.array_equal(np.asarray(ts["blk.0.ffn_up_exps.weight"].data),
                              np.asarray(ts["blk.1.ffn_up_exps.weight"].data))


def test_designed_skew_survives(tmp_path):
    # numpy proxy of the first router: RMS-normed embeddings x router rows, top-k counts.
    spec = tiny("Q4_K", n_layer=1, n_expert=16, zipf=1.2)
    ts = tensors(bm.write_bench_model(tmp_path / "skew.gguf", spec).path)
    x = gguf.quants.dequantize(np.asarray(ts["token_embd.weight"].data),
                               ts["token_embd.weight"].tensor_type).astype(np.float64)
    x /= np.sqrt((x * x).mean(axis=1, keepdims=True))
    w = np.asarray(ts["blk.0.ffn_gate_inp.weight"].data, dtype=np.float64)
    top = np.argsort(-(x @ w.T), axis=1)[:, :spec.n_expert_used]
    by_rank = np.bincount(top.ravel(), minlength=16)[synth.popularity(spec)[0]]
    assert by_rank[:4].sum() > 0.6 * by_rank.sum()
    assert np.corrcoef(np.arange(16), by_rank)[0, 1] < -0.7


# ---------------------------------------------------------------------------
# Writing


def test_output_does_not_depend_on_worker_count(tmp_path):
    spec = tiny("Q4_K", seed=3)
    one = bm.write_bench_model(tmp_path / "one.gguf", spec, workers=1)
    two = bm.write_bench_model(tmp_path / "two.gguf", spec, workers=2)
    assert two.workers == 2
    assert one.path.read_bytes() == two.path.read_bytes()
    other = bm.write_bench_model(tmp_path / "seed.gguf", tiny("Q4_K", seed=4), workers=1)
    assert other.path.read_bytes() != one.path.read_bytes()


def test_failure_leaves_no_files(tmp_path, monkeypatch):
    def boom(self, task):
        raise RuntimeError("boom")

    monkeypatch.setattr(bm._Writer, "run", boom)
    with pytest.raises(RuntimeError):
        bm.write_bench_model(tmp_path / "x.gguf", tiny("Q8_0"), workers=1)
    assert list(tmp_path.iterdir()) == []


def test_worker_failure_is_a_hybrid_error(tmp_path):
    spec = tiny("Q8_0")
    with pytest.raises(HybridError, match="worker failed"):
        bm._run_parallel(tmp_path / "missing" / "x.gguf", spec, 4096,
                         bm._tasks(bm.layout(spec)), 2, None)


def test_bad_requests_raise_hybrid_error():
    with pytest.raises(HybridError):
        bm.bench_spec("tiny", "F16")
    with pytest.raises(HybridError):
        bm.bench_spec("tiny-dense", "Q8_0")
    with pytest.raises(HybridError):
        bm.bench_spec("no-such-preset", "Q8_0")


def test_full_preset_layout():
    spec = bm.bench_spec("qwen3-30b-a3b-like", "Q4_K")
    assert (spec.n_layer, spec.n_expert, spec.n_expert_used, spec.n_ff_exp) == (48, 128, 8, 768)
    ts = bm.layout(spec)
    experts = [t for t in ts if t.expert]
    assert len(experts) == 48 * 3 and {t.qtype for t in experts} == {"Q4_K"}
    assert sum(t.n_bytes for t in experts) == 48 * 3 * 128 * 2048 * 768 // 256 * 144
    assert 16e9 < ts[-1].offset + ts[-1].n_bytes < 18e9


def test_script_cli(tmp_path):
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/make_bench_model.py"), "--preset", "tiny-q4k",
                        "--weight-type", "Q8_0", "--n-layer", "1", "--zipf", "0.5", "--seed", "7",
                        "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stdout
    spec = json.loads(gguf.GGUFReader(out).fields[synth.KEY_SPEC].contents())
    assert (spec["n_layer"], spec["zipf"], spec["seed"], spec["weight_type"]) == (1, 0.5, 7, "Q8_0")


# ---------------------------------------------------------------------------
# llama.cpp


@needs_llama
@pytest.mark.parametrize("wt", EXPERT_TYPES)
def test_llama_cpp_generates_finite_logits(models, wt):
    from greedy import greedy

    _, path = models[wt]
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, n_gpu_layers=0, verbose=False)
    try:
        run = greedy(llm, llm.tokenize(b"Hello, world"), 4)
    finally:
        llm.close()
    assert np.isfinite(run.logits).all()
    assert run.logits.std() > 0.1
    assert all(t >= 3 for t in run.tokens)  # special tokens are designed out of reach
