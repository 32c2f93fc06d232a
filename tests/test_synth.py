"""Synthetic MoE GGUFs: layout, metadata, determinism, skew, and real llama.cpp loading."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from hybrid_gguf import synth
from hybrid_gguf.errors import HybridError

from conftest import SYNTH_ARCHS, tiny_spec

ROOT = Path(__file__).resolve().parent.parent

try:
    import llama_cpp
except ImportError:  # the CPU wheel may not be installed in a bare checkout
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable")


def tensor_map(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def ne(t) -> tuple:
    return tuple(int(x) for x in t.shape)


# ---------------------------------------------------------------------------
# Layout per architecture


@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_expert_layout_matches_llama_cpp_shapes(tiny_model_factory, arch):
    spec = tiny_spec(arch)
    ts = tensor_map(tiny_model_factory(arch))
    D, E, F, V = spec.n_embd, spec.n_expert, spec.n_ff_exp, synth.VOCAB_SIZE
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        assert ne(ts[p + "ffn_gate_inp.weight"]) == (D, E)
        assert ne(ts[p + "ffn_gate_exps.weight"]) == (D, F, E)
        assert ne(ts[p + "ffn_up_exps.weight"]) == (D, F, E)
        assert ne(ts[p + "ffn_down_exps.weight"]) == (F, D, E)
        assert ts[p + "ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ne(ts["token_embd.weight"]) == (D, V)
    assert ne(ts["output.weight"]) == (D, V)


def test_arch_specific_tensors(tiny_model_factory):
    q3 = tensor_map(tiny_model_factory("qwen3moe"))
    assert "blk.0.attn_q_norm.weight" in q3 and "blk.0.attn_k_norm.weight" in q3

    spec = tiny_spec("qwen2moe")
    q2 = tensor_map(tiny_model_factory("qwen2moe"))
    assert ne(q2["blk.1.ffn_gate_inp_shexp.weight"]) == (spec.n_embd,)
    assert ne(q2["blk.1.ffn_up_shexp.weight"]) == (spec.n_embd, spec.shared_ff)
    assert ne(q2["blk.1.ffn_down_shexp.weight"]) == (spec.shared_ff, spec.n_embd)
    assert "blk.0.attn_q.bias" in q2

    spec = tiny_spec("gpt-oss")
    oss = tensor_map(tiny_model_factory("gpt-oss"))
    E, F, D = spec.n_expert, spec.n_ff_exp, spec.n_embd
    assert ne(oss["blk.0.attn_sinks.weight"]) == (spec.n_head,)
    assert ne(oss["blk.0.ffn_gate_inp.bias"]) == (E,)
    assert ne(oss["blk.0.ffn_gate_exps.bias"]) == (F, E)
    assert ne(oss["blk.0.ffn_up_exps.bias"]) == (F, E)
    assert ne(oss["blk.0.ffn_down_exps.bias"]) == (D, E)
    assert "blk.0.post_attention_norm.weight" in oss and "blk.0.ffn_norm.weight" not in oss

    dense = tensor_map(tiny_model_factory("dense"))
    assert not any("exps" in n or "gate_inp" in n for n in dense)
    assert "blk.0.ffn_gate.weight" in dense


@pytest.mark.parametrize("wtype,expected", [("F16", "F16"), ("Q8_0", "Q8_0")])
def test_weight_types(tiny_model_factory, wtype, expected):
    ts = tensor_map(tiny_model_factory("qwen3moe", weight_type=wtype))
    assert ts["blk.0.ffn_up_exps.weight"].tensor_type.name == expected
    assert ts["token_embd.weight"].tensor_type.name == expected
    assert ts["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # router stays exact
    assert ts["blk.0.attn_norm.weight"].tensor_type.name == "F32"


# ---------------------------------------------------------------------------
# Metadata, determinism, caching, atomicity


def test_metadata_keys(tiny_model_factory):
    spec = tiny_spec("qwen3moe", zipf=1.5, seed=7)
    path = tiny_model_factory("qwen3moe", zipf=1.5, seed=7)
    fields = gguf.GGUFReader(path).fields
    assert fields[synth.KEY_ZIPF].contents() == pytest.approx(1.5)
    assert fields[synth.KEY_SEED].contents() == 7
    assert fields[synth.KEY_VERSION].contents() == synth.SYNTH_VERSION
    assert json.loads(fields[synth.KEY_SPEC].contents()) == spec.to_dict()
    pop = synth.read_popularity(path)
    assert pop.shape == (spec.n_layer, spec.n_expert)
    for row in pop:  # each layer's row is a permutation of the experts
        assert sorted(row.tolist()) == list(range(spec.n_expert))
    assert np.array_equal(pop, synth.popularity(spec))
    assert not np.array_equal(pop[0], pop[1]) or spec.n_expert < 3  # per-layer permutations


def test_deterministic_and_seed_sensitive(tmp_path):
    spec = tiny_spec("qwen2moe")
    a = synth.write_synthetic_moe(tmp_path / "a.gguf", spec)
    b = synth.write_synthetic_moe(tmp_path / "b.gguf", spec)
    c = synth.write_synthetic_moe(tmp_path / "c.gguf", dataclasses.replace(spec, seed=1))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def boom(path, spec, zero_data):
        Path(path).write_bytes(b"GGUF partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_gguf", boom)
    target = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        synth.write_synthetic_moe(target, tiny_spec())
    assert list(tmp_path.iterdir()) == []


def test_ensure_synthetic_builds_once(tmp_path):
    spec = tiny_spec()
    p1 = synth.ensure_synthetic(spec, tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = synth.ensure_synthetic(spec, tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    p3 = synth.ensure_synthetic(dataclasses.replace(spec, zipf=0.0), tmp_path)
    assert p3 != p1 and spec.key() != dataclasses.replace(spec, zipf=0.0).key()


@pytest.mark.parametrize("bad", [
    dict(arch="mamba"), dict(weight_type="Q2_K"), dict(n_expert_used=9),
    dict(n_head=3), dict(arch="qwen3moe", n_expert=0, n_expert_used=0),
    dict(arch="qwen2moe", head_dim=16), dict(zipf=-1.0),
])
def test_invalid_specs_raise_hybrid_error(tmp_path, bad):
    with pytest.raises(HybridError):
        synth.write_synthetic_moe(tmp_path / "x.gguf", dataclasses.replace(tiny_spec(), **bad))
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset():
    with pytest.raises(HybridError, match="unknown synthetic preset"):
        synth.preset("huge")


def test_presets_are_valid():
    for name, spec in synth.PRESETS.items():
        spec.validate()
    big = synth.PRESETS["qwen3-30b-a3b-like"]
    assert (big.n_layer, big.n_expert, big.n_expert_used, big.n_embd, big.n_ff_exp) == (48, 128, 8, 2048, 768)


def test_zero_data_has_the_real_header(tmp_path, tiny_model_factory):
    spec = tiny_spec("gpt-oss")
    real = tiny_model_factory("gpt-oss")
    zero = synth.write_synthetic_moe(tmp_path / "z.gguf", spec, zero_data=True)
    assert zero.stat().st_size == real.stat().st_size
    r_real, r_zero = gguf.GGUFReader(real), gguf.GGUFReader(zero)
    assert r_real.data_offset == r_zero.data_offset
    assert zero.read_bytes()[: r_zero.data_offset] == real.read_bytes()[: r_real.data_offset]
    assert not np.any(r_zero.tensors[-1].data)


def test_script_cli(tmp_path):
    out = tmp_path / "cli.gguf"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_synthetic_moe.py"), str(out),
         "--arch", "qwen2moe", "--n-expert", "4", "--zipf", "0", "--type", "F16", "--seed", "3"],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    spec = json.loads(gguf.GGUFReader(out).fields[synth.KEY_SPEC].contents())
    assert (spec["arch"], spec["n_expert"], spec["zipf"], spec["weight_type"], spec["seed"]) == \
        ("qwen2moe", 4, 0.0, "F16", 3)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_moe.py"),
                          str(tmp_path / "bad.gguf"), "--n-expert-used", "99"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------
# Designed routing skew, checked with numpy on the stored weights


def router_selection_by_rank(path) -> np.ndarray:
    """(n_layer, n_expert) selection counts of every token embedding, columns in designed rank order."""
    ts = tensor_map(path)
    spec = synth.SynthSpec(**json.loads(gguf.GGUFReader(path).fields[synth.KEY_SPEC].contents()))
    x = np.asarray(ts["token_embd.weight"].data, dtype=np.float64)  # (vocab, n_embd)
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True))  # RMS norm (ffn_norm weight is 1)
    pop = synth.read_popularity(path)
    out = np.zeros((spec.n_layer, spec.n_expert))
    for layer in range(spec.n_layer):
        w = np.asarray(ts[f"blk.{layer}.ffn_gate_inp.weight"].data, dtype=np.float64)
        top = np.argsort(-(x @ w.T), axis=1)[:, : spec.n_expert_used]
        counts = np.bincount(top.ravel(), minlength=spec.n_expert)
        out[layer] = counts[pop[layer]]
    return out


def test_zipf_skew_follows_designed_popularity(tiny_model_factory):
    kw = dict(n_layer=3, n_expert=16, n_expert_used=2)
    skewed = router_selection_by_rank(tiny_model_factory("qwen3moe", zipf=1.2, **kw))
    flat = router_selection_by_rank(tiny_model_factory("qwen3moe", zipf=0.0, **kw))
    for layer in range(3):
        s, f = skewed[layer], flat[layer]
        # Strong skew: the top 4 designed experts take most selections, the bottom 4 almost none.
        assert s[:4].sum() > 0.6 * s.sum()
        assert s[:4].sum() > 5 * s[-4:].sum()
        assert np.corrcoef(np.arange(16), s)[0, 1] < -0.7
        # zipf 0: no designed preference.
        assert f[:4].sum() < 0.45 * f.sum()
        assert abs(np.corrcoef(np.arange(16), f)[0, 1]) < 0.6


def test_skew_strength_is_monotone(tiny_model_factory):
    kw = dict(n_layer=2, n_expert=16, n_expert_used=2)
    shares = []
    for s in (0.0, 0.5, 1.0, 2.0):
        c = router_selection_by_rank(tiny_model_factory("qwen3moe", zipf=s, **kw)).sum(axis=0)
        shares.append(c[:2].sum() / c.sum())  # share of the two designed favourites
    assert shares == sorted(shares) and shares[-1] > 2 * shares[0]


# ---------------------------------------------------------------------------
# Real llama.cpp


def generate_tokens(path, n: int = 6, **kw) -> list:
    # One thread: tiny models gain nothing from more, and spinning threads crawl on a busy machine.
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, n_threads_batch=1, seed=1, verbose=False, **kw)
    try:
        prompt = llm.tokenize(b"Hello, world")
        out = []
        for tok in llm.generate(prompt, temp=0.8, top_k=40, top_p=0.95):
            out.append(tok)
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


@needs_llama
@pytest.mark.parametrize("arch", SYNTH_ARCHS + ("dense",))
def test_llama_cpp_loads_and_generates(tiny_model_factory, arch):
    toks = generate_tokens(tiny_model_factory(arch))
    assert len(toks) == 6
    assert all(t >= 3 for t in toks)  # special tokens are designed out of reach


@needs_llama
@pytest.mark.parametrize("wtype", ["F16", "Q8_0"])
def test_llama_cpp_loads_quantized(tiny_model_factory, wtype):
    assert len(generate_tokens(tiny_model_factory("gpt-oss", weight_type=wtype))) == 6


@needs_llama
@pytest.mark.parametrize("source", ["F16", "Q8_0"])
def test_q4_k_through_llama_cpp_quantizer(tmp_path, monkeypatch, source):
    # Big models quantize from a Q8_0 source (disk); force that path on a tiny one.
    if source == "Q8_0":
        monkeypatch.setattr(synth, "_F16_SOURCE_LIMIT", 0)
    # Rows of 256 so the K-quant is really used (narrower rows fall back to Q5_0/Q8_0).
    spec = tiny_spec("qwen3moe", weight_type="Q4_K", n_embd=256, n_ff_exp=256, head_dim=64, zipf=1.3)
    path = synth.write_synthetic_moe(tmp_path / "q4.gguf", spec)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert reader.fields[synth.KEY_ZIPF].contents() == pytest.approx(1.3)  # metadata survives
    assert np.array_equal(synth.read_popularity(path), synth.popularity(spec))
    assert [p.name for p in tmp_path.iterdir()] == ["q4.gguf"]  # F16 intermediate removed
    assert len(generate_tokens(path)) == 6
