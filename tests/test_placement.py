"""Whole-tensor placement: regexes, the ctypes override array, and where llama.cpp
really puts the tensors (read from the buffer sizes it logs)."""

import ctypes
import re

import pytest

import llama_cpp  # noqa: F401  (load libllama before numpy-heavy imports)

from hybrid_gguf.llama import devices
from hybrid_gguf.llama import ggml_lib
from hybrid_gguf.llama import hybrid
from hybrid_gguf.llama import loader as P
from hybrid_gguf.planning import placement as pl
from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.llama.log import MIB, capture_llama_log, parse_buffer_sizes

# llama.cpp prints buffer sizes in MiB with two decimals.
LOG_ROUNDING = 0.005 * MIB + 1
LOAD = dict(n_ctx=64, n_batch=32, verbose=False, seed=0)


def _matched(placement, inventory):
    return {t.name for t in inventory.tensors if placement.target_for(t.name) is not None}


def _experts(inventory, below=None):
    return {t.name for t in inventory.tensors
            if t.is_expert and (below is None or t.layer < below)}


def _no_extra_bufts(params):
    # Without extra buffer types llama.cpp's default for every weight is the plain CPU type.
    params.use_extra_bufts = False


# --- regexes ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "gpt-oss"])
def test_cpu_moe_selects_exactly_the_routed_experts(tiny_model_factory, arch):
    inv = read_inventory(tiny_model_factory(arch))
    assert _matched(pl.cpu_moe(), inv) == _experts(inv)
    if arch == "gpt-oss":  # per-expert biases move with their weights
        assert any(t.kind == "expert_bias" for t in inv.tensors if t.name in _experts(inv))
    if arch == "qwen2moe":  # shared experts stay with the layer
        assert not any("shexp" in name for name in _matched(pl.cpu_moe(), inv))


def test_n_cpu_moe_regex_selects_layers_below_n(tiny_model_factory):
    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=12))
    for n in range(0, 13):
        placement = pl.n_cpu_moe(n)
        assert len(placement.rules) <= 1  # one alternation, not one pattern per layer
        assert _matched(placement, inv) == _experts(inv, below=n), n
    # "1" must not select layers 10 and 11 (anchored on the dots around the index)
    assert _matched(pl.n_cpu_moe(2), inv) == _experts(inv, below=2)
    with pytest.raises(HybridError):
        pl.n_cpu_moe(-1)


@pytest.mark.parametrize("pattern, message", [
    ("blk.(0|1", "malformed"), ("ffn_[up", "malformed"), ("*exps", "malformed"),
    ("(?i)ffn", "Python-only"), ("(?P<x>ffn)", "Python-only"), (r"\Ablk", "Python-only"),
    ("", "non-empty"), ("blk\u00e9", "ASCII"),
])
def test_malformed_patterns_raise(pattern, message):
    with pytest.raises(HybridError, match=message):
        pl.TensorPlacement([(pattern, "CPU")])


def test_unknown_targets_raise():
    with pytest.raises(HybridError, match="unknown placement target"):
        P.build_overrides(pl.TensorPlacement([("exps", "TPU0")]))
    # repack buffers abort on types they cannot repack: only on explicit request
    with pytest.raises(HybridError):
        P.build_overrides(pl.TensorPlacement([("exps", "CPU_REPACK")]))
    if not devices.has_cuda():
        with pytest.raises(HybridError, match="CUDA"):
            P.build_overrides(pl.TensorPlacement([("exps", "CUDA0")]))


def test_override_array_layout():
    placement = pl.TensorPlacement([(r"\.ffn_up_exps", "CPU"), (r"\.ffn_down_exps", "cpu")])
    array, keep = P.build_overrides(placement)
    assert keep is not None and len(array) == 3
    assert ctypes.sizeof(P.TensorBuftOverride) == 2 * ctypes.sizeof(ctypes.c_void_p)
    assert [array[i].pattern for i in range(2)] == [rb"\.ffn_up_exps", rb"\.ffn_down_exps"]
    assert array[0].buft == array[1].buft == ggml_lib.cpu_buffer_type()
    assert array[2].pattern is None and array[2].buft is None
    assert P.build_overrides(pl.all_on_gpu()) == (None, None)


# --- what llama.cpp does with the overrides -------------------------------------------


def test_llama_cpp_applies_n_cpu_moe_to_exactly_those_tensors(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    for n in (0, 1, 3):
        loaded = P.load_llama(path, pl.n_cpu_moe(n), **LOAD)
        overridden = loaded.buffers.overridden  # from llama.cpp's own debug lines
        assert set(overridden) == _experts(inv, below=n)
        assert set(overridden.values()) <= {"CPU", "CPU_REPACK"}
        del loaded


def test_llama_cpp_moves_gpt_oss_expert_biases(tiny_model_factory):
    path = tiny_model_factory("gpt-oss")
    inv = read_inventory(path)
    loaded = P.load_llama(path, pl.cpu_moe(), **LOAD)
    assert set(loaded.buffers.overridden) == _experts(inv)
    assert any(name.endswith(".bias") for name in loaded.buffers.overridden)


def _has_avx2():
    with open("/proc/cpuinfo") as fh:
        return " avx2" in fh.read()


def test_override_moves_expert_bytes_into_another_buffer(tiny_model_factory):
    """CPU-observable: with extra buffer types off, every weight defaults to the plain
    CPU type (mmap: "CPU_Mapped"). Overriding the Q4_K expert tensors to the CPU_REPACK
    buffer type must create a CPU_REPACK buffer of exactly their bytes."""
    if "CPU_REPACK" not in [ggml_lib.buft_name(b) for b in ggml_lib.cpu_extra_buffer_types()]:
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")
    if not _has_avx2():
        pytest.skip("Q4_K repacking needs AVX2")
    path = tiny_model_factory("qwen3moe", weight_type="Q4_K", n_layer=3, n_embd=256, n_ff_exp=256)
    inv = read_inventory(path)
    # Q4_K_M keeps some ffn_down in Q6_K, which x86 cannot repack: pick the Q4_K ones.
    moved = [t for t in inv.tensors if t.is_expert and t.ggml_type == "Q4_K"]
    assert len(moved) >= 6
    pattern = "^(" + "|".join(re.escape(t.name) for t in moved) + ")$"
    expected = sum(t.n_bytes for t in moved)

    base = P.load_llama(path, pl.all_on_gpu(), model_patch=_no_extra_bufts, **LOAD)
    assert "CPU_REPACK" not in base.buffers.model
    assert base.buffers.overridden == {}
    del base

    placement = pl.TensorPlacement([(pattern, "CPU_REPACK")], "Q4_K experts repacked")
    loaded = P.load_llama(path, placement, model_patch=_no_extra_bufts, allow_extra_bufts=True, **LOAD)
    buffers = loaded.buffers
    assert set(buffers.overridden) == {t.name for t in moved}
    assert set(buffers.overridden.values()) == {"CPU_REPACK"}
    assert abs(buffers.model["CPU_REPACK"] - expected) <= LOG_ROUNDING
    assert expected > 100 * LOG_ROUNDING  # the check above means something
    # and the model still runs with its experts in the other buffer
    tokens = loaded.llm.tokenize(b"abc")
    assert len(list(_greedy(loaded.llm, tokens, 4))) == 4


@pytest.mark.skipif(not devices.has_cuda(), reason="needs a CUDA build and GPU")
def test_cpu_moe_moves_expert_bytes_off_the_gpu(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    gpu = devices.resolve_device("gpu").name
    on_gpu = P.load_llama(path, pl.all_on_gpu(), **LOAD).buffers
    split = P.load_llama(path, pl.cpu_moe(), **LOAD).buffers
    moved = on_gpu.model[gpu] - split.model[gpu]
    assert abs(moved - inv.expert_bytes_total) <= LOG_ROUNDING * 2 + 256 * len(_experts(inv))
    from hybrid_gguf.planning.memory import MemoryOptions, predict_memory

    predicted = predict_memory(inv, pl.all_on_gpu(), MemoryOptions(64), gpus=[gpu]).devices[gpu].weight_bytes
    assert abs(on_gpu.model[gpu] - predicted) <= LOG_ROUNDING + 256 * len(inv.tensors)


def _greedy(llm, tokens, n):
    llm.reset()
    for i, tok in enumerate(llm.generate(tokens, temp=0.0, top_k=1, reset=True)):
        if i >= n:
            break
        yield tok


def test_placement_generates_the_same_greedy_tokens(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=4)
    plain = P.load_llama(path, None, n_gpu_layers=-1, **LOAD).llm
    prompt = plain.tokenize(b"The quick brown fox")
    want = list(_greedy(plain, prompt, 12))
    del plain
    for placement in (pl.cpu_moe(), pl.n_cpu_moe(2)):
        llm = P.load_llama(path, placement, **LOAD).llm
        assert list(_greedy(llm, prompt, 12)) == want, placement.description
        del llm


def test_load_failure_from_llama_cpp_is_a_hybrid_error(tiny_model_factory, monkeypatch):
    # A regex Python accepts but std::regex rejects reaches llama.cpp's loader.
    monkeypatch.setattr(P, "validate_rules", lambda rules: None)
    placement = pl.n_cpu_moe(1)
    object.__setattr__(placement, "rules", (pl.PlacementRule("blk[", "CPU"),))
    with pytest.raises(HybridError, match="regular expression|regex"):
        P.load_llama(tiny_model_factory("qwen3moe"), placement, **LOAD)


def _recorder_ok():
    from hybrid_gguf.llama.recorder import recorder_status

    return recorder_status()[0]


@pytest.mark.skipif(not hybrid.capability().per_expert, reason=hybrid.STOCK_NOTICE)
@pytest.mark.skipif(not _recorder_ok(), reason="routing recorder unavailable")
def test_load_llama_hands_over_the_hot_set_and_owns_the_recorder(tiny_model_factory):
    from hybrid_gguf.llama.recorder import Recording

    path = tiny_model_factory("qwen3moe", n_layer=3)
    hot = {0: [1, 5], 2: [0]}
    loaded = P.load_llama(path, None, hot=hot, pack_device="CPU", record=Recording(trace_records=64),
                          n_gpu_layers=0, **LOAD)
    try:
        model = loaded.llm._model.model
        assert [hybrid.n_hot(model, l) for l in range(3)] == [2, 0, 1] and loaded.hot == hot
        loaded.llm.eval(loaded.llm.tokenize(b"hello there"))
        snap = loaded.recorder.snapshot()
        assert snap.counts_prompt.sum() > 0 and len(snap.trace.token) > 0
    finally:
        loaded.close()
    with pytest.raises(HybridError, match="closed"):
        loaded.recorder.snapshot()  # freed with the context
    plain = P.load_llama(path, None, n_gpu_layers=0, **LOAD)  # the hot set was for that load only
    assert hybrid.pack_bytes(plain.llm._model.model) == 0 and plain.recorder is None
    plain.close()


@pytest.mark.skipif(not hybrid.capability().per_expert, reason=hybrid.STOCK_NOTICE)
def test_load_llama_refuses_a_load_without_the_hot_packs_it_asked_for(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(hybrid, "pack_bytes", lambda model: 0)
    with pytest.raises(HybridError, match="no hot packs"):
        P.load_llama(tiny_model_factory("qwen3moe"), None, hot={0: [1]}, pack_device="CPU", n_gpu_layers=0, **LOAD)


def test_cold_experts_on_the_gpu_need_patch_version_4(monkeypatch):
    text = pl.plan_text({0: [1, 2]}, "CUDA0", cold_on_gpu=True)
    assert text == "buft=CUDA0;cold=gpu;0:1,2"  # the text itself is pure; handing it over checks the build
    monkeypatch.setattr(hybrid, "capability", lambda: hybrid.Capability(True, 3, "older patch"))
    with pytest.raises(HybridError, match="version 4"):
        with hybrid.pending_plan(text):
            pass


def test_load_llama_takes_a_recorder_or_a_context_patch(tiny_model_factory):
    from hybrid_gguf.llama.recorder import Recording

    if not _recorder_ok():
        pytest.skip("routing recorder unavailable")
    with pytest.raises(HybridError, match="cb_eval"):
        P.load_llama(tiny_model_factory("qwen3moe"), None, record=Recording(), context_patch=lambda p: None,
                     n_gpu_layers=0, **LOAD)


# --- the log parser -------------------------------------------------------------------


def test_parse_buffer_sizes():
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =   100.50 MiB",
        "load_tensors:        CUDA0 model buffer size =  2048.00 MiB",
        "load_tensors:   CPU_Mapped model buffer size =     1.50 MiB",
        "llama_context:  CUDA_Host  output buffer size =     0.58 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   384.00 MiB",
        "sched_reserve:      CUDA0 compute buffer size =   300.75 MiB",
        "tensor blk.0.ffn_up_exps.weight (12 MiB q8_0) buffer type overridden to CUDA_Host",
        "unrelated line = 3 MiB",
    ]
    r = parse_buffer_sizes(lines)
    assert r.model == {"CPU_Mapped": 102 * MIB, "CUDA0": 2048 * MIB}
    assert r.kv == {"CUDA0": 384 * MIB} and r.compute == {"CUDA0": round(300.75 * MIB)}
    assert r.output == {"CUDA_Host": round(0.58 * MIB)}
    assert r.overridden == {"blk.0.ffn_up_exps.weight": "CUDA_Host"}
    assert r.total("CUDA0") == (2048 + 384) * MIB + round(300.75 * MIB)


def test_capture_restores_the_previous_logger(tiny_model):
    def current():
        cb, ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
        return ctypes.cast(cb, ctypes.c_void_p).value, ud.value

    before = current()
    with capture_llama_log() as cap:
        llm = llama_cpp.Llama(str(tiny_model), **LOAD)
        assert current() != before
    assert current() == before
    assert "CPU_Mapped" in cap.buffers().model and cap.buffers().kv
    del llm
