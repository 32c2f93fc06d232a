"""Memory predictions vs the buffer sizes llama.cpp reports when it loads (CPU here), and the
GPU-side rules (CUDA padding, layer split, op-offload scratch, margins) on their own."""

from __future__ import annotations

import dataclasses

import pytest

import llama_cpp  # noqa: F401  (load libllama before numpy-heavy imports)
from hybrid_gguf.llama import hybrid as hybrid_backend
from hybrid_gguf.planning import memory as mm
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.llama.dry_run import measure_compute_bytes
from hybrid_gguf.llama.hooks import construct_llama
from hybrid_gguf.llama.log import capture_llama_log
from hybrid_gguf.llama.loader import load_llama
from hybrid_gguf.planning.placement import EXPERT_TENSOR_RE, PlacementRule, TensorPlacement, plan_text

ARCHS = ("qwen3moe", "qwen2moe", "llama", "gpt-oss", "dense")
# (n_ctx, n_ubatch, flash_attn, cache type)
CONFIGS = [(2048, 512, False, "f16"), (4096, 256, True, "f16"), (1000, 64, True, "q8_0")]


def _load(path, n_ctx, n_ubatch, fa, ctype, **kw):
    tid = mm.CACHE_TYPE_IDS[ctype]
    return load_llama(path, None, n_ctx=n_ctx, n_batch=512, n_ubatch=n_ubatch, flash_attn=fa,
                      type_k=tid, type_v=tid, n_gpu_layers=0, n_threads=1, verbose=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_load_matches_prediction_within_5pct(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    inv = read_inventory(path)
    for n_ctx, n_ubatch, fa, ctype in CONFIGS:
        measured = measure_compute_bytes(path, n_ctx, n_ubatch, fa, n_gpu_layers=0,
                                            type_k=ctype, type_v=ctype)
        loaded = _load(path, n_ctx, n_ubatch, fa, ctype)
        try:
            rep = loaded.buffers
        finally:
            loaded.llm.close()
        # the dry run is llama.cpp's own number: identical to the real allocation
        assert measured == {"CPU": sum(rep.compute.values())}
        opts = mm.MemoryOptions(n_ctx, n_ubatch, ctype, ctype, fa, compute_bytes=measured["CPU"])
        pred = mm.predict_memory(inv, None, opts, gpus=())
        cmp = {c.kind: c for c in mm.compare_with_report(pred, rep)}
        assert set(cmp) == {"model", "kv", "compute"}
        for c in cmp.values():
            assert abs(c.error) < 0.05, (arch, n_ctx, c)
        total_pred = sum(c.predicted for c in cmp.values())
        total_rep = sum(c.reported for c in cmp.values())
        assert abs(total_pred - total_rep) / total_rep < 0.05
        # printed MiB have two decimals: the KV cache is exact up to that rounding
        assert abs(cmp["kv"].predicted - cmp["kv"].reported) <= 0.006 * mm.MIB


@pytest.mark.parametrize("arch", ARCHS)
def test_analytic_compute_estimate_close(tiny_model_factory, arch):
    """Without llama.cpp the fitted estimate stands in: within 12% on the tiny models."""
    path = tiny_model_factory(arch)
    inv = read_inventory(path)
    for n_ctx, n_ubatch, fa, _ in CONFIGS:
        measured = measure_compute_bytes(path, n_ctx, n_ubatch, fa, n_gpu_layers=0)["CPU"]
        est = mm.estimate_compute_bytes(inv, n_ctx, n_ubatch, fa)
        assert abs(est - measured) / measured < 0.12, (arch, n_ctx, n_ubatch, fa, est, measured)


def test_no_mmap_model_buffer(tiny_model_factory):
    path = tiny_model_factory("qwen3moe")
    inv = read_inventory(path)
    loaded = _load(path, 1024, 512, False, "f16", use_mmap=False)
    rep = loaded.buffers
    loaded.llm.close()
    assert not any(n.endswith("_Mapped") for n in rep.model)
    pred = mm.predict_memory(inv, None, mm.MemoryOptions(1024, use_mmap=False), gpus=())
    (model,) = [c for c in mm.compare_with_report(pred, rep) if c.kind == "model"]
    assert abs(model.error) < 0.01


@pytest.mark.skipif(not hybrid_backend.capability().per_expert, reason=hybrid_backend.STOCK_NOTICE)
def test_hot_pack_bytes_match_patched_loader(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=3)
    inv = read_inventory(path)
    hot = {0: [1, 5, 2], 2: [0]}
    with capture_llama_log(forward=False) as cap:
        with hybrid_backend.pending_plan(plan_text(hot, "CPU")):
            llm = construct_llama(str(path), n_ctx=256, n_gpu_layers=0, n_threads=1, verbose=False)
    pack = hybrid_backend.pack_bytes(llm._model.model)
    llm.close()
    pred = mm.predict_memory(inv, None, mm.MemoryOptions(256), hot=hot, gpus=())
    assert abs(pred.device("CPU").hot_pack - pack) / pack < 0.05
    reported = mm.hot_pack_reported(cap.lines)
    assert reported and abs(sum(reported.values()) - pack) <= 0.006 * mm.MIB


# --- GPU-side rules, no llama.cpp needed ---------------------------------------------------


def test_kv_cells_and_types(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe"))
    assert mm.kv_cells(1) == 256 and mm.kv_cells(256) == 256 and mm.kv_cells(257) == 512
    f16 = mm.kv_cache_bytes(inv, 4096)
    assert f16 == inv.kv_bytes_per_token * 4096
    q8 = mm.kv_cache_bytes(inv, 4096, "q8_0", "q8_0")
    assert q8 == f16 * 34 // 64  # 32 f16 values (64 B) -> one 34-byte q8_0 block
    with pytest.raises(HybridError, match="unknown KV cache type"):
        mm.kv_cache_bytes(inv, 4096, "q3_k")


def test_cuda_padding_and_alignment(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", weight_type="Q8_0"))
    t = next(t for t in inv.tensors if t.kind == "expert_up")
    assert t.ggml_type == "Q8_0" and t.shape[0] == 128
    row = t.n_bytes // (t.shape[1] * t.shape[2])  # 128 elements = 4 blocks of 34 bytes
    assert row == 136
    expect = t.n_bytes + row * (512 - 128) // 128  # one row padded up to 512 elements
    assert mm.gpu_alloc_bytes(t) == (expect + 127) // 128 * 128
    f32 = next(t for t in inv.tensors if t.ggml_type == "F32" and t.kind == "norm")
    assert mm.gpu_alloc_bytes(f32) == (f32.n_bytes + 127) // 128 * 128  # no row padding


def test_layer_split_follows_llama_cpp():
    # llama.cpp: layer i on the first device whose cumulative share exceeds i / (n_layer + 1)
    assert mm.layer_devices(3, ["A", "B"]) == ["A", "A", "B", "B"]
    assert mm.layer_devices(4, ["A", "B"], [1, 4]) == ["A", "B", "B", "B", "B"]
    assert mm.layer_devices(2, []) == ["CPU"] * 3


def test_gpu_prediction_parts(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4))
    opts = mm.MemoryOptions(2048, compute_bytes=10 * mm.MIB, margin_bytes=mm.MIB, margin_fraction=0.1)
    cpu_moe = TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, "CPU"),))
    pred = mm.predict_memory(inv, cpu_moe, opts, gpus=["CUDA0"])
    gpu, cpu = pred.device("CUDA0"), pred.device("CPU")
    assert "experts" not in gpu.weights and cpu.weights["experts"] == inv.expert_bytes_total
    assert cpu.weights["embedding"] > 0 and "embedding" not in gpu.weights  # input layer stays on host
    assert gpu.kv == mm.kv_cache_bytes(inv, 2048) and gpu.compute == 10 * mm.MIB
    biggest = max(mm.gpu_alloc_bytes(t) for t in inv.tensors if t.is_expert)
    assert gpu.offload_scratch == biggest  # one full host expert tensor for op offload
    body = gpu.total - gpu.margin
    assert gpu.margin == int(mm.MIB + 0.1 * body)
    assert pred.gpu_bytes == gpu.total
    # op offload off, or a small ubatch: no scratch
    off = mm.predict_memory(inv, cpu_moe, dataclasses.replace(opts, op_offload=False), gpus=["CUDA0"])
    assert off.device("CUDA0").offload_scratch == 0
    # all on the GPU: experts there, no scratch
    allg = mm.predict_memory(inv, None, opts, gpus=["CUDA0"])
    assert allg.device("CUDA0").weights["experts"] >= inv.expert_bytes_total
    assert allg.device("CUDA0").offload_scratch == 0
    # tied output: the synthetic model has output.weight, so no duplicate
    assert allg.device("CUDA0").weights["output"] == sum(
        mm.gpu_alloc_bytes(t) for t in inv.tensors if t.name == "output.weight")


def test_hot_pack_and_multi_gpu(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4))
    opts = mm.MemoryOptions(1024, compute_bytes=mm.MIB, margin_bytes=0, margin_fraction=0)
    cpu_moe = TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, "CPU"),))
    hot = {1: [0, 3], 3: [7]}
    pred = mm.predict_memory(inv, cpu_moe, opts, hot=hot, gpus=["CUDA0", "CUDA1"], hot_device="CUDA1")
    per = inv.layers[1].per_expert_bytes
    assert pred.device("CUDA1").hot_pack == pytest.approx(3 * per + 2 * 3 * 4 * 8, abs=2 * 3 * 128 + 2 * 3 * 128)
    assert pred.device("CUDA0").hot_pack == 0
    # KV follows the layer split: 4 layers + output over 2 GPUs -> layers 0-2 on CUDA0
    kv = mm.kv_bytes_per_layer(inv, 1024)
    assert pred.device("CUDA0").kv == sum(kv[:3]) and pred.device("CUDA1").kv == kv[3]
    assert pred.device("CUDA0").compute == pred.device("CUDA1").compute == mm.MIB
    with pytest.raises(HybridError, match="no routed experts"):
        dense = read_inventory(tiny_model_factory("dense"))
        mm.predict_memory(dense, None, opts, hot={0: [1]}, gpus=["CUDA0"])


def test_options_validation():
    with pytest.raises(HybridError):
        mm.MemoryOptions(0)
    with pytest.raises(HybridError):
        mm.MemoryOptions(512, type_k="f8")
    with pytest.raises(HybridError):
        mm.MemoryOptions(512, margin_bytes=-1)
    with pytest.raises(HybridError, match="flash attention"):
        mm.MemoryOptions(512, type_k="q8_0", type_v="q8_0")
    mm.MemoryOptions(512, type_k="q8_0", type_v="q8_0", flash_attn=True)


def test_host_buffers_are_not_vram():
    from hybrid_gguf.planning.memory import device_of_buffer, is_host

    for name in ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "CUDA0_ZeroCopy"):
        assert is_host(name) and device_of_buffer(name) == "CPU", name
    for name in ("CUDA0", "CUDA1", "Vulkan0"):
        assert not is_host(name) and device_of_buffer(name) == name
