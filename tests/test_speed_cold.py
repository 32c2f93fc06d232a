"""The speed model's cold=gpu case: the GPU reads the host-side experts in place."""

from __future__ import annotations

from dataclasses import replace

from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning.calibration import Bandwidth
from hybrid_gguf.planning.speed import predict_speed


def _half_hot(inv):
    return {l.index: list(range(l.n_expert // 2)) for l in inv.layers if l.is_moe}


def test_cold_on_gpu_trades_hand_offs_for_link_reads(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4))
    hot = _half_hot(inv)
    bw = Bandwidth()
    cpu = predict_speed(inv, None, hot, True, bw, 512)
    gpu = predict_speed(inv, None, hot, True, bw, 512, cold_on_gpu=True)
    assert cpu.decode_ms["handoff"] > 0 and gpu.decode_ms["handoff"] == 0.0
    assert gpu.decode_ms["experts_cpu"] == 0.0
    # the same host bytes, charged at the link's rate instead of the CPU's
    ratio = gpu.decode_ms["experts_host_read"] / cpu.decode_ms["experts_cpu"]
    assert abs(ratio / (bw.cpu_bytes_per_s / bw.host_read_bytes_per_s) - 1) < 0.01  # decode_ms is rounded
    # costly hand-offs favour the link, a slow link favours the CPU
    slow_handoff = replace(bw, handoff_s=1e-3, handoff_idle_s=1e-3)
    assert (predict_speed(inv, None, hot, True, slow_handoff, 512, cold_on_gpu=True).decode_tokens_per_s >
            predict_speed(inv, None, hot, True, slow_handoff, 512).decode_tokens_per_s)
    slow_link = replace(bw, host_read_bytes_per_s=1e6, handoff_s=1e-6, handoff_idle_s=1e-6)
    assert (predict_speed(inv, None, hot, True, slow_link, 512, cold_on_gpu=True).decode_tokens_per_s <
            predict_speed(inv, None, hot, True, slow_link, 512).decode_tokens_per_s)


def test_cold_on_gpu_needs_the_dense_part_on_the_gpu(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4))
    bw = Bandwidth()
    a = predict_speed(inv, None, {}, False, bw, 512)
    b = predict_speed(inv, None, {}, False, bw, 512, cold_on_gpu=True)
    assert a.decode_tokens_per_s == b.decode_tokens_per_s  # no GPU: nothing to read the host with


def test_cache_decode_estimate_trades_misses_for_uploads():
    from hybrid_gguf.planning.speed import cache_decode_tokens_per_s

    bw = Bandwidth()
    ms = {"dense": 1.0, "experts_gpu": 1.0, "experts_cpu": 8.0, "handoff": 2.0}
    static = cache_decode_tokens_per_s(ms, 0.5, 0.5, 0.0, bw, active=False)
    assert abs(static - 1e3 / sum(ms.values())) < 1e-9  # the static plan as predicted
    same_hits = cache_decode_tokens_per_s(ms, 0.5, 0.5, 0.0, bw)
    assert abs(1e3 / same_hits - 1e3 / static - 1e3 * bw.cache_step_s) < 1e-9  # a cache's step costs host time
    uploading = cache_decode_tokens_per_s(ms, 0.5, 0.5, 0.0, bw, uploads_per_token=3.0)
    assert abs(1e3 / uploading - 1e3 / same_hits - 3e3 * bw.cache_upload_s) < 1e-9  # and each upload
    layered = cache_decode_tokens_per_s(ms, 0.5, 0.5, 0.0, bw, n_cache_layers=48)
    assert abs(1e3 / layered - 1e3 / same_hits - 48e3 * bw.cache_layer_s) < 1e-9  # and each cached layer
    better = cache_decode_tokens_per_s(ms, 0.5, 0.75, 0.0, bw)
    assert better > static  # fewer host bytes at the same hand-offs
    costly = cache_decode_tokens_per_s(ms, 0.5, 0.75, 1e9, bw)
    assert costly < static  # a gigabyte of uploads per token is not worth it
