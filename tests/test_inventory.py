"""GGUF inventory: numbers against known shapes, expert byte ranges, naming per arch, bad input."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import gguf
import numpy as np
import pytest

from hybrid_gguf import synth
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import KINDS, classify, read_inventory

from conftest import SYNTH_ARCHS, tiny_spec

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


def nb2(t: gguf.ReaderTensor) -> int:
    """Byte stride of the third dimension, computed independently from type and shape."""
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    ne0, ne1 = int(t.shape[0]), int(t.shape[1])
    return ne0 // block * size * ne1


# ---------------------------------------------------------------------------
# Synthetic models: numbers against the spec


@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_numbers_match_spec(tiny_model_factory, arch):
    spec = tiny_spec(arch)
    inv = read_inventory(tiny_model_factory(arch))
    D, E, F, L = spec.n_embd, spec.n_expert, spec.n_ff_exp, spec.n_layer
    assert (inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used) == (arch, L, E, spec.n_expert_used)
    assert inv.n_embd == D and inv.expert_ff_length == F and inv.is_moe
    per_expert = 3 * D * F * 4  # F32 gate + up + down
    if arch == "gpt-oss":
        per_expert += (F + F + D) * 4  # per-expert biases
    for layer in inv.layers:
        assert layer.is_moe and layer.n_expert == E and layer.n_expert_used == spec.n_expert_used
        assert layer.per_expert_bytes == per_expert
        assert layer.expert_bytes == E * per_expert
    assert inv.expert_bytes_total == L * E * per_expert
    assert inv.total_bytes == sum(t.n_bytes for t in inv.tensors) < inv.file_size
    assert inv.kv_bytes_per_token == L * 2 * 2 * spec.n_head_kv * spec.head_dim
    assert inv.has_shared_experts == (arch == "qwen2moe")
    assert inv.n_expert_shared == (1 if arch == "qwen2moe" else 0)
    assert inv.n_leading_dense == 0 and inv.dense_layers == []
    assert inv.sliding_window == (spec.sliding_window if arch == "gpt-oss" else None)


@pytest.mark.parametrize("arch,wtype", [("qwen3moe", "F32"), ("qwen3moe", "Q8_0"),
                                        ("qwen2moe", "F16"), ("gpt-oss", "Q8_0")])
def test_expert_byte_ranges(tiny_model_factory, arch, wtype):
    check_expert_ranges(tiny_model_factory(arch, weight_type=wtype))


@pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable")
def test_expert_byte_ranges_q4_k(tmp_path):
    spec = tiny_spec(weight_type="Q4_K", n_embd=256, n_ff_exp=256, head_dim=64)
    path = synth.write_synthetic_moe(tmp_path / "q4.gguf", spec)
    inv = check_expert_ranges(path)
    assert {inv.tensor(n).ggml_type for n in inv.layers[0].expert_tensors} >= {"Q4_K"}


def check_expert_ranges(path):
    """per_expert_bytes == nb2 and file bytes at data_offset + e*nb2 are expert e."""
    inv = read_inventory(path)
    raw = path.read_bytes()
    for rt in gguf.GGUFReader(path).tensors:
        t = inv.tensor(rt.name)
        assert (t.ggml_type, t.shape, t.n_bytes, t.data_offset) == \
            (rt.tensor_type.name, tuple(int(x) for x in rt.shape), int(rt.n_bytes), int(rt.data_offset))
        if not t.is_expert:
            assert t.n_expert == 0 and t.per_expert_bytes == 0
            continue
        n_exp = int(rt.shape[-1])
        assert t.n_expert == n_exp
        if len(rt.shape) == 3:
            assert t.per_expert_bytes == nb2(rt)
        for e in range(n_exp):
            start, end = t.expert_range(e)
            assert end - start == t.per_expert_bytes
            assert raw[start:end] == np.ascontiguousarray(rt.data[e]).tobytes()
    return inv


def test_dense_model_is_not_an_error(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("dense"))
    assert not inv.is_moe and inv.n_expert == 0 and inv.n_expert_used == 0
    assert inv.expert_bytes_total == 0 and inv.expert_ff_length is None
    assert all(not layer.is_moe and layer.per_expert_bytes == 0 for layer in inv.layers)
    assert {t.kind for t in inv.tensors if t.layer == 0} == {"attention", "norm", "dense_ffn"}


def test_to_dict_json(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("gpt-oss"))
    d = json.loads(json.dumps(inv.to_dict()))
    for key in ("arch", "n_layer", "n_expert", "n_expert_used", "expert_bytes_total", "fingerprint", "layers"):
        assert key in d
    for layer in d["layers"]:
        for key in ("index", "n_expert", "expert_bytes", "per_expert_bytes"):
            assert key in layer
    assert d["expert_bytes_total"] == inv.expert_bytes_total
    assert d["tensors"][0]["name"] == inv.tensors[0].name
    assert "tensors" not in inv.to_dict(with_tensors=False)


def test_metadata_includes_synth_keys(tiny_model_factory):
    spec = tiny_spec(zipf=0.7)
    inv = read_inventory(tiny_model_factory(zipf=0.7))
    assert inv.metadata[synth.KEY_ZIPF] == pytest.approx(0.7)
    assert inv.metadata[synth.KEY_POPULARITY] == synth.popularity(spec).reshape(-1).tolist()
    assert "tokenizer.ggml.tokens" not in inv.metadata  # vocabularies are skipped


# ---------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_is_header_only(tmp_path, tiny_model_factory):
    src = tiny_model_factory("qwen2moe")
    fp = read_inventory(src).fingerprint
    assert len(fp) == 64 and read_inventory(src).fingerprint == fp

    copy = tmp_path / "copy.gguf"
    shutil.copy(src, copy)
    assert read_inventory(copy).fingerprint == fp
    # Changing tensor data does not change it ...
    with open(copy, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\x7f" * 50)
    assert read_inventory(copy).fingerprint == fp
    # ... a zero-data file with the same header has the same fingerprint ...
    zero = synth.write_synthetic_moe(tmp_path / "zero.gguf", tiny_spec("qwen2moe"), zero_data=True)
    assert read_inventory(zero).fingerprint == fp
    # ... and any change in metadata or layout does.
    assert read_inventory(tiny_model_factory("qwen2moe", seed=5)).fingerprint != fp
    assert read_inventory(tiny_model_factory("qwen2moe", weight_type="F16")).fingerprint != fp


# ---------------------------------------------------------------------------
# Naming per architecture, on header-only files with tiny tensors

D, E, F, H, HKV, HD = 32, 4, 16, 4, 2, 8


def write_layout(path, arch, kv: dict, tensors: dict):
    """A GGUF with the given arch-relative KVs and zero-filled tensors ({name: ne})."""
    w = gguf.GGUFWriter(path, arch=arch)
    for key, value in kv.items():
        key = f"{arch}.{key}"
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, ne in tensors.items():
        w.add_tensor(name, np.zeros(tuple(reversed(ne)), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def std_attn(i, qk_norm=False, bias=False, post_norm=False):
    p = f"blk.{i}."
    t = {p + "attn_norm.weight": (D,), p + "attn_q.weight": (D, H * HD),
         p + "attn_k.weight": (D, HKV * HD), p + "attn_v.weight": (D, HKV * HD),
         p + "attn_output.weight": (H * HD, D)}
    if qk_norm:
        t.update({p + "attn_q_norm.weight": (HD,), p + "attn_k_norm.weight": (HD,)})
    if bias:
        t.update({p + "attn_q.bias": (H * HD,), p + "attn_k.bias": (HKV * HD,), p + "attn_v.bias": (HKV * HD,)})
    t[p + ("post_attention_norm.weight" if post_norm else "ffn_norm.weight")] = (D,)
    return t


def mla_attn(i):
    p = f"blk.{i}."
    return {p + "attn_norm.weight": (D,), p + "attn_q_a.weight": (D, 16), p + "attn_q_a_norm.weight": (16,),
            p + "attn_q_b.weight": (16, H * 12), p + "attn_kv_a_mqa.weight": (D, 16 + 8),
            p + "attn_kv_a_norm.weight": (16,), p + "attn_k_b.weight": (4, 16, H),
            p + "attn_v_b.weight": (16, 8, H), p + "attn_output.weight": (H * 8, D),
            p + "ffn_norm.weight": (D,)}


def moe(i, gate_up=False, probs_b=False, width=F):
    p = f"blk.{i}."
    t = {p + "ffn_gate_inp.weight": (D, E)}
    if gate_up:
        t[p + "ffn_gate_up_exps.weight"] = (D, 2 * width, E)
    else:
        t[p + "ffn_gate_exps.weight"] = (D, width, E)
        t[p + "ffn_up_exps.weight"] = (D, width, E)
    t[p + "ffn_down_exps.weight"] = (width, D, E)
    if probs_b:
        t[p + "exp_probs_b.bias"] = (E,)
    return t


def shexp(i, width=2 * F):
    p = f"blk.{i}."
    return {p + "ffn_gate_shexp.weight": (D, width), p + "ffn_up_shexp.weight": (D, width),
            p + "ffn_down_shexp.weight": (width, D)}


def dense_ffn(i, width=64):
    p = f"blk.{i}."
    return {p + "ffn_gate.weight": (D, width), p + "ffn_up.weight": (D, width), p + "ffn_down.weight": (width, D)}


def globals_():
    return {"token_embd.weight": (D, 64), "output_norm.weight": (D,), "output.weight": (D, 64)}


BASE_KV = dict(embedding_length=D, context_length=256, expert_count=E, expert_used_count=2,
               **{"attention.head_count": H, "attention.head_count_kv": HKV})


def layout(arch):
    """(kv, tensors, expectations) of a small file laid out like llama.cpp's loader expects."""
    t = globals_()
    kv = dict(BASE_KV, block_count=2, expert_feed_forward_length=F)
    expect = dict(dense_layers=[], lead=0, shared=False, n_shared=0, kv_bytes=2 * 2 * HKV * 2 * HD)
    if arch == "olmoe":
        for i in range(2):
            t.update(std_attn(i, qk_norm=True), **moe(i))
    elif arch == "granitemoe":
        kv["expert_shared_feed_forward_length"] = 2 * F
        del kv["expert_feed_forward_length"]  # granite uses feed_forward_length for experts
        kv["feed_forward_length"] = F
        for i in range(2):
            t.update(std_attn(i), **moe(i), **shexp(i))
        expect.update(shared=True, n_shared=1)
    elif arch == "glm4moe":
        # layer 0 dense, layers 1-2 MoE, layer 3 is the next-token-prediction block.
        kv.update(block_count=4, leading_dense_block_count=1, nextn_predict_layers=1, expert_shared_count=1)
        for i in range(4):
            t.update(std_attn(i, qk_norm=True, bias=True, post_norm=True))
            t.update(dense_ffn(i) if i == 0 else dict(**moe(i, probs_b=True), **shexp(i)))
        t.update({"blk.3.nextn.eh_proj.weight": (2 * D, D), "blk.3.nextn.enorm.weight": (D,),
                  "blk.3.nextn.hnorm.weight": (D,), "blk.3.nextn.shared_head_norm.weight": (D,)})
        expect.update(dense_layers=[0], lead=1, shared=True, n_shared=1, kv_bytes=4 * 2 * HKV * 2 * HD)
    elif arch == "deepseek2":
        kv.update(block_count=3, leading_dense_block_count=1, expert_shared_count=2,
                  **{"attention.head_count_kv": 1, "attention.key_length": 24, "attention.value_length": 16,
                     "attention.key_length_mla": 12, "attention.value_length_mla": 8,
                     "attention.kv_lora_rank": 16, "attention.q_lora_rank": 16, "rope.dimension_count": 8})
        for i in range(3):
            t.update(mla_attn(i))
            t.update(dense_ffn(i) if i == 0 else dict(**moe(i, probs_b=True), **shexp(i)))
        # MLA caches only the latent + rope part (24 values, one kv head), no V.
        expect.update(dense_layers=[0], lead=1, shared=True, n_shared=2, kv_bytes=3 * 2 * 24)
    else:
        raise AssertionError(arch)
    return kv, t, expect


EXPECTED_KIND = {
    "attn_norm": "norm", "attn_q": "attention", "attn_k": "attention", "attn_v": "attention",
    "attn_output": "attention", "attn_q_norm": "norm", "attn_k_norm": "norm", "attn_sinks": "attention",
    "attn_q_a": "attention", "attn_q_a_norm": "norm", "attn_q_b": "attention", "attn_kv_a_mqa": "attention",
    "attn_kv_a_norm": "norm", "attn_k_b": "attention", "attn_v_b": "attention",
    "ffn_norm": "norm", "post_attention_norm": "norm",
    "ffn_gate_inp": "router", "exp_probs_b": "router",
    "ffn_gate_exps": "expert_gate", "ffn_up_exps": "expert_up", "ffn_down_exps": "expert_down",
    "ffn_gate_up_exps": "expert_gate_up",
    "ffn_gate_shexp": "shared_expert", "ffn_up_shexp": "shared_expert", "ffn_down_shexp": "shared_expert",
    "ffn_gate_inp_shexp": "shared_expert",
    "ffn_gate": "dense_ffn", "ffn_up": "dense_ffn", "ffn_down": "dense_ffn",
    "nextn.eh_proj": "other", "nextn.enorm": "norm", "nextn.hnorm": "norm", "nextn.shared_head_norm": "norm",
}


def expected_kind(name):
    if name == "token_embd.weight":
        return "embedding"
    if name == "output.weight":
        return "output"
    if name == "output_norm.weight":
        return "norm"
    stem, suffix = name.split(".", 2)[2].rsplit(".", 1)
    if stem.endswith("_exps") and suffix == "bias":
        return "expert_bias"
    return EXPECTED_KIND[stem]


@pytest.mark.parametrize("arch", ["olmoe", "granitemoe", "glm4moe", "deepseek2"])
def test_header_only_arch_naming(tmp_path, arch):
    kv, tensors, expect = layout(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known archs must not warn
        inv = read_inventory(write_layout(tmp_path / f"{arch}.gguf", arch, kv, tensors))
    for t in inv.tensors:
        assert t.kind == expected_kind(t.name), t.name
    assert inv.arch == arch and inv.n_layer == kv["block_count"] and inv.n_expert == E
    assert inv.dense_layers == expect["dense_layers"] and inv.n_leading_dense == expect["lead"]
    assert inv.has_shared_experts == expect["shared"] and inv.n_expert_shared == expect["n_shared"]
    assert inv.expert_ff_length == F
    assert inv.kv_bytes_per_token == expect["kv_bytes"]
    per_expert = 3 * D * F * 4
    for layer in inv.layers:
        moe_layer = layer.index not in expect["dense_layers"]
        assert layer.is_moe == moe_layer
        assert layer.per_expert_bytes == (per_expert if moe_layer else 0)
        assert layer.has_shared_expert == (expect["shared"] and moe_layer)
    assert inv.expert_bytes_total == E * per_expert * (inv.n_layer - len(expect["dense_layers"]))


@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_synthetic_arch_naming(tiny_model_factory, arch):
    inv = read_inventory(tiny_model_factory(arch))
    for t in inv.tensors:
        assert t.kind == expected_kind(t.name), t.name
    if arch == "gpt-oss":
        assert inv.tensor("blk.0.ffn_gate_inp.bias").kind == "router"
        assert inv.tensor("blk.0.ffn_down_exps.bias").per_expert_bytes == inv.n_embd * 4


def test_merged_gate_up_and_per_layer_arrays(tmp_path):
    # deepseek2-style merged gate_up experts, per-layer expert_used_count and head_count_kv,
    # no expert_feed_forward_length key: the width comes from the tensor shape.
    kv = dict(BASE_KV, block_count=2, expert_used_count=[2, 3], **{"attention.head_count_kv": [2, 1]})
    t = globals_()
    for i in range(2):
        t.update(std_attn(i), **moe(i, gate_up=True, width=F + 8 * i))
    inv = read_inventory(write_layout(tmp_path / "m.gguf", "deepseek2", kv, t))
    assert inv.tensor("blk.0.ffn_gate_up_exps.weight").kind == "expert_gate_up"
    assert inv.expert_ff_length == [F, F + 8]
    assert inv.n_expert_used == 3 and inv.n_expert_used_per_layer == [2, 3]
    assert [layer.n_expert_used for layer in inv.layers] == [2, 3]
    assert inv.n_head_kv == [2, 1]
    assert inv.kv_bytes_per_token == 2 * 2 * HD * (2 + 1)
    for i, layer in enumerate(inv.layers):
        w = F + 8 * i
        assert layer.per_expert_bytes == (2 * D * w + w * D) * 4


def test_expert_ff_length_array_key(tmp_path):
    kv = dict(BASE_KV, block_count=2, expert_feed_forward_length=[F, 2 * F])
    t = globals_()
    for i in range(2):
        t.update(std_attn(i), **moe(i, width=F * (i + 1)))
    assert read_inventory(write_layout(tmp_path / "a.gguf", "qwen3moe", kv, t)).expert_ff_length == [F, 2 * F]
    kv["expert_feed_forward_length"] = [F, F]
    t = globals_()
    for i in range(2):
        t.update(std_attn(i), **moe(i))
    assert read_inventory(write_layout(tmp_path / "b.gguf", "qwen3moe", kv, t)).expert_ff_length == F


def test_unknown_moe_arch_falls_back_with_warning(tmp_path):
    t = globals_()
    for i in range(2):
        t.update(std_attn(i), **moe(i))
    path = write_layout(tmp_path / "u.gguf", "futuremoe", dict(BASE_KV, block_count=2), t)
    with pytest.warns(UserWarning, match="futuremoe"):
        inv = read_inventory(path)
    assert inv.n_expert == E and inv.layers[1].per_expert_bytes == 3 * D * F * 4


def test_unknown_dense_arch_is_quiet(tmp_path):
    t = globals_()
    t.update(std_attn(0), **dense_ffn(0))
    path = write_layout(tmp_path / "d.gguf", "futuredense", dict(embedding_length=D, block_count=1), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = read_inventory(path)
    assert not inv.is_moe and inv.n_layer == 1


def test_classify_table():
    assert classify("blk.12.ffn_up_exps.weight") == (12, "expert_up")
    assert classify("blk.3.ffn_gate_up_exps.weight") == (3, "expert_gate_up")
    assert classify("blk.3.ffn_down_exps.scale") == (3, "expert_bias")
    assert classify("blk.0.attn_sinks.weight") == (0, "attention")
    assert classify("rope_freqs.weight") == (None, "other")
    assert classify("token_embd_norm.weight") == (None, "norm")
    assert all(classify(n)[1] in KINDS for n in ("blk.1.foo.weight", "x", "blk.2.ssm_in.weight"))


# ---------------------------------------------------------------------------
# Bad input: one clear line each


def one_line_error(path, match):
    with pytest.raises(HybridError, match=match) as info:
        read_inventory(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "nope.gguf", "not found")


def test_directory(tmp_path):
    one_line_error(tmp_path, "is a directory")


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model\n")
    one_line_error(p, "not a GGUF file")
    e = tmp_path / "empty.gguf"
    e.write_bytes(b"")
    one_line_error(e, "empty file")


def test_truncated_tensor_data(tmp_path, tiny_model_factory):
    p = tmp_path / "cut.gguf"
    data = tiny_model_factory("qwen3moe").read_bytes()
    p.write_bytes(data[: len(data) - 4096])
    one_line_error(p, "truncated: tensor output.weight")


@pytest.mark.parametrize("keep", [6, 40, 300, 2000])
def test_truncated_header(tmp_path, tiny_model_factory, keep):
    # Cuts inside the counts, the KVs, the vocabulary and the tensor table.
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_model_factory("qwen3moe").read_bytes()[:keep])
    one_line_error(p, "truncated")


def test_truncated_inside_long_string_array(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "v.gguf", arch="qwen3moe")
    w.add_token_list([f"tok{i}" for i in range(10000)])  # long: takes the fast skipping path
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data = (tmp_path / "v.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    one_line_error(p, "truncated")
    assert read_inventory(tmp_path / "v.gguf").n_expert == 0


# ---------------------------------------------------------------------------
# Speed: header only, at real size


def test_inspect_big_model_is_fast(tmp_path):
    # qwen3-30b-a3b-like layout (48 layers, 128 experts, 16 GiB of Q4_K) with zero,
    # sparse data, plus a real-sized BPE vocabulary (151,936 tokens, 151,387 merges).
    spec = synth.preset("qwen3-30b-a3b-like", weight_type="Q4_K")
    layout_file = synth.write_synthetic_moe(tmp_path / "layout.gguf", spec, zero_data=True)
    ref = read_inventory(layout_file)
    w = gguf.GGUFWriter(tmp_path / "big.gguf", arch="qwen3moe")
    for key, value in ref.metadata.items():
        if key.startswith("qwen3moe.") and isinstance(value, int):
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(151936)])
    w.add_token_types([1] * 151936)
    w.add_token_merges([f"a{i} b{i}" for i in range(151387)])
    for t in ref.tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    f.write(b"\0" * ((-f.tell()) % 32))
    f.truncate(f.tell() + ref.file_size)  # enough room for every tensor's data
    w.close()

    for path in (layout_file, tmp_path / "big.gguf"):
        elapsed = []
        for _ in range(3):  # best of three: the machine may be busy
            start = time.perf_counter()
            inv = read_inventory(path)
            elapsed.append(time.perf_counter() - start)
        assert min(elapsed) < 0.5, f"{path.name}: {min(elapsed):.2f} s"
        assert (inv.n_layer, inv.n_expert, inv.n_expert_used, inv.expert_ff_length) == (48, 128, 8, 768)
        assert inv.expert_bytes_total == ref.expert_bytes_total > 15 * 2**30
        assert inv.layers[0].per_expert_bytes == 3 * 2048 * 768 // 256 * 144


def write_typed_tensor(path, type_id: int, ne: tuple, n_bytes: int):
    """A GGUF whose only tensor claims ggml type `type_id` (zero data of n_bytes)."""
    w = gguf.GGUFWriter(path, arch="qwen3moe")
    w.add_expert_count(ne[-1])  # a model with expert tensors must say how many (llama.cpp asserts)
    w.add_expert_used_count(1)
    w.add_tensor_info("blk.0.ffn_up_exps.weight", tuple(reversed(ne)), np.dtype(np.float32), n_bytes,
                      raw_dtype=type_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    f.write(b"\0" * ((-f.tell()) % 32 + n_bytes))
    w.close()
    return path


def test_types_newer_than_gguf_py(tmp_path):
    # NVFP4 (id 40): 64 weights in 36 bytes; llama.cpp knows it, gguf-py 0.19 does not.
    ne = (128, 4, 2)
    inv = read_inventory(write_typed_tensor(tmp_path / "nv.gguf", 40, ne, 128 // 64 * 36 * 4 * 2))
    t = inv.tensors[0]
    assert t.ggml_type == "NVFP4" and t.per_expert_bytes == 2 * 36 * 4 and t.n_expert == 2


def test_unknown_tensor_type(tmp_path):
    one_line_error(write_typed_tensor(tmp_path / "u.gguf", 99, (32, 1, 1), 64), "unknown ggml type 99")


def test_read_popularity_of_a_non_synthetic_file(tmp_path):
    t = globals_()
    t.update(std_attn(0), **moe(0))
    path = write_layout(tmp_path / "n.gguf", "olmoe", dict(BASE_KV, block_count=1), t)
    assert synth.read_popularity(path) is None


def test_unsupported_version(tmp_path):
    p = tmp_path / "v1.gguf"
    p.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(64))
    one_line_error(p, "GGUF version 1")


def test_split_shard_warns(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "s.gguf", arch="qwen3moe")
    w.add_uint16("split.no", 0)
    w.add_uint16("split.count", 3)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="shard 1 of 3"):
        read_inventory(tmp_path / "s.gguf")
