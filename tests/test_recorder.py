"""The native routing recorder: counts are right, not just present."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import llama_cpp  # noqa: F401  (load libllama before numpy-heavy work: docs/backend-patch.md)
from hybrid_gguf.llama import ggml_lib  # noqa: E402
from hybrid_gguf import synth
from hybrid_gguf.llama.hooks import construct_llama
from hybrid_gguf.llama.recorder import RoutingRecorder, recorder_status

ok, why = recorder_status()
pytestmark = pytest.mark.skipif(not ok, reason=why)

PROMPT = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs."


# -- helpers ---------------------------------------------------------------------


GgmlTensor = ggml_lib.GgmlTensor


GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


def read_2d(t: GgmlTensor, dtype) -> np.ndarray:
    """[ne1, ne0] array of a host tensor, honouring its byte strides."""
    itemsize = np.dtype(dtype).itemsize
    span = (t.ne[0] - 1) * t.nb[0] + (t.ne[1] - 1) * t.nb[1] + itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
    return np.ndarray(shape=(t.ne[1], t.ne[0]), dtype=dtype, buffer=raw,
                      strides=(t.nb[1], t.nb[0])).copy()


class PyObserver:
    """Test-only Python cb_eval: records router logits and top-k ids per layer."""

    def __init__(self):
        self.logits: dict = {}
        self.topk: dict = {}
        import llama_cpp.llama_cpp as b

        self.cb = b.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, tp, ask, _ud):
        try:
            t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
            name = t.name.decode()
            for prefix, store, dtype in (("ffn_moe_logits-", self.logits, np.float32),
                                         ("ffn_moe_topk-", self.topk, np.int32)):
                if name.startswith(prefix) and name[len(prefix):].isdigit():
                    if ask:
                        return True
                    store.setdefault(int(name[len(prefix):]), []).append(read_2d(t, dtype))
                    return True
            return not ask
        except Exception:  # never abort the graph from a test hook
            return not ask

    def attach(self):
        def patch(params):
            params.cb_eval = self.cb
            params.cb_eval_user_data = None

        return patch


def make_llama(path, patch=None, n_batch=512, n_ctx=512, **kw):
    return construct_llama(str(path), context_patch=patch, n_ctx=n_ctx, n_batch=n_batch,
                           n_gpu_layers=0, n_threads=1, verbose=False, **kw)


def greedy(llm, n_tokens: int, prompt: bytes = PROMPT):
    """Prefill, then n greedy tokens; returns (prompt tokens, generated, logits rows)."""
    tokens = llm.tokenize(prompt)
    llm.reset()
    llm.eval(tokens)
    out, rows = [], []
    for _ in range(n_tokens):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
        tok = int(np.argmax(row))
        out.append(tok)
        rows.append(row)
        llm.eval([tok])
    return tokens, out, np.array(rows)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def recorder_for(spec, **kw) -> RoutingRecorder:
    return RoutingRecorder(spec.n_layer, spec.n_expert, spec.n_expert_used, **kw)


# -- tests -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "gpt-oss"])
def test_counts_equal_tokens_times_experts_used(tiny_model_factory, arch):
    spec = tiny_model_factory.spec(arch, n_layer=3)
    rec = recorder_for(spec)
    llm = make_llama(tiny_model_factory(arch, n_layer=3), rec.attach())
    prompt, gen, _ = greedy(llm, 12)
    snap = rec.snapshot()
    P, G, K, L = len(prompt), len(gen), spec.n_expert_used, spec.n_layer
    # decode: every layer routes every generated token
    assert snap.tokens_decode.tolist() == [G] * L
    # prompt: all layers but the last route every token; the last only the output row
    assert snap.tokens_prompt[:-1].tolist() == [P] * (L - 1)
    assert snap.tokens_prompt[-1] in (1, P)
    np.testing.assert_array_equal(snap.counts_prompt.sum(1), snap.tokens_prompt * K)
    np.testing.assert_array_equal(snap.counts_decode.sum(1), snap.tokens_decode * K)
    assert snap.stats["anomalies"] == 0 and snap.stats["bad_ids"] == 0
    assert snap.stats["tokens_seen"] == P + G
    llm.close()


def test_multiple_ubatches_and_last_layer_rows(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe", n_layer=3)
    rec = recorder_for(spec)
    llm = make_llama(tiny_model_factory("qwen3moe", n_layer=3), rec.attach(), n_batch=16)
    tokens = llm.tokenize(PROMPT * 2)[:40]  # 16 + 16 + 8: three prompt graphs
    llm.eval(tokens)
    snap = rec.snapshot()
    assert snap.stats["graphs"] == 3
    assert snap.tokens_prompt.tolist() == [40, 40, 3]  # last layer: one output per chunk
    assert snap.tokens_decode.sum() == 0
    llm.close()


def test_trace_ids_distinct_and_consistent_with_counts(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe", n_layer=3)
    rec = recorder_for(spec, trace_capacity=10_000)
    llm = make_llama(tiny_model_factory("qwen3moe", n_layer=3), rec.attach())
    prompt, gen, _ = greedy(llm, 10)
    snap = rec.snapshot()
    tr = snap.trace
    assert tr.written == len(tr.token) == int(snap.tokens_per_layer.sum())
    assert all(len(set(row)) == spec.n_expert_used for row in tr.ids.tolist())
    for layer in range(spec.n_layer):
        ids = tr.ids[tr.layer == layer].ravel()
        np.testing.assert_array_equal(np.bincount(ids, minlength=spec.n_expert),
                                      snap.counts[layer])
    n = len(prompt) + len(gen)
    assert tr.token[tr.layer == 0].tolist() == list(range(n))
    # the last layer saw the prompt's final token, then each generated one
    assert tr.token[tr.layer == 2].tolist() == list(range(len(prompt) - 1, n))
    llm.close()


def test_trace_ring_keeps_newest(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe")
    rec = recorder_for(spec, trace_capacity=7)
    llm = make_llama(tiny_model_factory("qwen3moe"), rec.attach())
    greedy(llm, 5)
    full = recorder_for(spec, trace_capacity=10_000)
    llm2 = make_llama(tiny_model_factory("qwen3moe"), full.attach())
    greedy(llm2, 5)
    small, big = rec.snapshot().trace, full.snapshot().trace
    assert small.written == big.written > 7 and len(small.token) == 7
    np.testing.assert_array_equal(small.ids, big.ids[-7:])
    np.testing.assert_array_equal(small.token, big.token[-7:])
    llm.close()
    llm2.close()


def test_selected_experts_are_topk_of_router_logits(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe", n_layer=3, n_expert=16, n_expert_used=4)
    path = tiny_model_factory("qwen3moe", n_layer=3, n_expert=16, n_expert_used=4)
    obs = PyObserver()
    llm = make_llama(path, obs.attach())
    prompt, gen_py, _ = greedy(llm, 8)
    llm.close()
    K = spec.n_expert_used
    for layer in range(spec.n_layer):
        logits = np.concatenate(obs.logits[layer])  # [tokens, n_expert]
        topk = np.concatenate(obs.topk[layer])  # [tokens, K]
        want = np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :K], axis=1)
        np.testing.assert_array_equal(np.sort(topk, axis=1), want)

    rec = recorder_for(spec, trace_capacity=10_000)
    llm = make_llama(path, rec.attach())
    _, gen_c, _ = greedy(llm, 8)
    llm.close()
    assert gen_c == gen_py
    tr = rec.snapshot().trace
    for layer in range(spec.n_layer):
        ours = np.sort(tr.ids[tr.layer == layer], axis=1)
        theirs = np.sort(np.concatenate(obs.topk[layer]), axis=1)
        np.testing.assert_array_equal(ours, theirs)


def test_weight_mass_matches_softmax_of_logits(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe", n_layer=2, n_expert=16, n_expert_used=4)
    path = tiny_model_factory("qwen3moe", n_layer=2, n_expert=16, n_expert_used=4)
    obs = PyObserver()
    llm = make_llama(path, obs.attach())
    greedy(llm, 6)
    llm.close()
    rec = recorder_for(spec, weight_mass=True, coactivation=True)
    llm = make_llama(path, rec.attach())
    greedy(llm, 6)
    llm.close()
    snap = rec.snapshot()
    K = spec.n_expert_used
    for layer in range(spec.n_layer):
        logits = np.concatenate(obs.logits[layer]).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mass = np.sort(p, axis=1)[:, -K:].sum(1)
        n_prompt = int(snap.tokens_prompt[layer])
        np.testing.assert_allclose(snap.weight_mass_prompt[layer], mass[:n_prompt].mean()
                                   if layer < spec.n_layer - 1 else mass[n_prompt - 1],
                                   rtol=1e-4)
        np.testing.assert_allclose(snap.weight_mass_decode[layer], mass[-6:].mean(), rtol=1e-4)
        co = snap.coactivation[layer].astype(np.int64)
        np.testing.assert_array_equal(co, co.T)
        np.testing.assert_array_equal(np.diag(co), snap.counts[layer])
        off = co.sum() - np.trace(co)
        assert off == snap.tokens_per_layer[layer] * K * (K - 1)


def test_designed_skew_shows_as_rank_correlation(tiny_model_factory):
    kw = dict(n_layer=3, n_expert=16, n_expert_used=2, zipf=1.5)
    spec = tiny_model_factory.spec("qwen3moe", **kw)
    path = tiny_model_factory("qwen3moe", **kw)
    rec = recorder_for(spec)
    # logits_all: the last layer then routes every prompt row too (more data)
    llm = make_llama(path, rec.attach(), n_ctx=1024, logits_all=True)
    text = bytes(range(32, 127)) * 5 + PROMPT * 3
    greedy(llm, 8, prompt=text)
    llm.close()
    snap = rec.snapshot()
    assert snap.tokens_prompt[-1] == snap.tokens_prompt[0]  # logits_all: all rows routed
    counts = snap.counts
    pop = synth.read_popularity(path)
    rhos = []
    for layer in range(spec.n_layer):
        designed_rank = np.empty(spec.n_expert)
        designed_rank[pop[layer]] = np.arange(spec.n_expert)  # 0 = most popular
        rho = np.corrcoef(designed_rank, average_ranks(-counts[layer]))[0, 1]  # Spearman
        rhos.append(rho)
        assert rho > 0.7, (layer, rho, counts[layer])
        assert counts[layer].argmax() in pop[layer][:3]  # the designed favourite is near the top
    assert np.mean(rhos) > 0.8, rhos


def test_generation_identical_with_and_without_recording(tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=3)
    spec = tiny_model_factory.spec("qwen3moe", n_layer=3)
    llm = make_llama(path)
    _, plain, plain_logits = greedy(llm, 16)
    llm.close()
    rec = recorder_for(spec, trace_capacity=1000, coactivation=True, weight_mass=True)
    llm = make_llama(path, rec.attach())
    _, recorded, rec_logits = greedy(llm, 16)
    llm.close()
    assert recorded == plain
    np.testing.assert_array_equal(rec_logits, plain_logits)  # bitwise
    assert rec.snapshot().counts.sum() > 0


def test_snapshot_and_reset_while_decoding(tiny_model_factory):
    spec = tiny_model_factory.spec("qwen3moe")
    rec = recorder_for(spec, trace_capacity=64, coactivation=True)
    llm = make_llama(tiny_model_factory("qwen3moe"), rec.attach())
    stop = threading.Event()
    seen = []

    def poll():
        while not stop.is_set():
            s = rec.snapshot()
            # each snapshot is consistent: sums match the tokens of the same instant
            seen.append(bool(np.all(s.counts.sum(1) == s.tokens_per_layer * spec.n_expert_used)))

    th = threading.Thread(target=poll)
    th.start()
    try:
        greedy(llm, 20)
    finally:
        stop.set()
        th.join()
    assert seen and all(seen)
    rec.reset()
    s = rec.snapshot()
    assert s.counts.sum() == 0 and s.tokens_per_layer.sum() == 0 and len(s.trace.token) == 0
    rec.set_enabled(False)
    llm.eval([5, 6, 7])
    assert rec.snapshot().counts.sum() == 0
    rec.set_enabled(True)
    llm.eval([8])
    s = rec.snapshot()
    assert s.tokens_decode.tolist() == [1] * spec.n_layer
    llm.close()


# -- the C callback on hand-made tensors --------------------------------------------


def fake_tensor(name: bytes, arr: np.ndarray, ttype: int, ne, nb) -> GgmlTensor:
    t = GgmlTensor()
    t.type = ttype
    t.name = name
    t.data = arr.ctypes.data
    for i in range(4):
        t.ne[i] = ne[i] if i < len(ne) else 1
        t.nb[i] = nb[i] if i < len(nb) else nb[-1] * (ne[-1] if i == len(ne) else 1)
    return t


def call(rec, t, ask):
    return rec._lib.hg_rec_cb(ctypes.byref(t), ask, rec._handle)


def setup_cb(rec):
    rec._lib.hg_rec_cb.restype = ctypes.c_bool
    rec._lib.hg_rec_cb.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]


def test_callback_name_matching_and_strided_read():
    E, K, T = 8, 3, 4
    rec = RoutingRecorder(2, E, K)
    setup_cb(rec)
    # an argsort result [E, T] whose first K columns form the view (nb1 = 4 * E)
    argsort = np.stack([np.roll(np.arange(E), -t) for t in range(T)]).astype(np.int32)
    for name, want in [(b"ffn_moe_topk-1", True), (b"ffn_moe_group_topk-1", False),
                       (b"ffn_moe_topk-", False), (b"ffn_moe_topk-1 (view)", False),
                       (b"ffn_moe_topk-x", False), (b"ffn_moe_topkx-1", False),
                       (b"ffn_moe_weights-1", False), (b"attn_norm-0", False)]:
        t = fake_tensor(name, argsort, GGML_TYPE_I32, (K, T), (4, 4 * E))
        assert call(rec, t, True) is want, name
    t = fake_tensor(b"ffn_moe_topk-0", argsort, GGML_TYPE_I32, (K, T), (4, 4 * E))
    assert call(rec, t, False) is True
    s = rec.snapshot()
    want = np.bincount(argsort[:, :K].ravel(), minlength=E)
    np.testing.assert_array_equal(s.counts_prompt[0], want)
    assert s.tokens_prompt.tolist() == [T, 0]
    # bad layer / wrong k / wrong type: skipped and counted, but never abort
    for bad in [fake_tensor(b"ffn_moe_topk-9", argsort, GGML_TYPE_I32, (K, T), (4, 4 * E)),
                fake_tensor(b"ffn_moe_topk-1", argsort, GGML_TYPE_I32, (K + 1, T), (4, 4 * E)),
                fake_tensor(b"ffn_moe_topk-1", argsort, GGML_TYPE_F32, (K, T), (4, 4 * E))]:
        assert call(rec, bad, False) is True
    assert rec.snapshot().stats["anomalies"] == 3
    out_of_range = np.full((T, E), 99, dtype=np.int32)
    t = fake_tensor(b"ffn_moe_topk-1", out_of_range, GGML_TYPE_I32, (K, T), (4, 4 * E))
    assert call(rec, t, False) is True
    assert rec.snapshot().stats["bad_ids"] == T
    rec.close()


def test_unavailable_without_compiler(tmp_path, monkeypatch):
    from hybrid_gguf.llama.native import build

    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="no C compiler"):
        build.build_recorder()


def test_build_is_cached_and_loads_one_libggml_base(tmp_path, monkeypatch):
    from hybrid_gguf.llama.native import build

    first = build.build_recorder()
    assert build.build_recorder().path == first.path  # cache hit
    assert first.path.parent.parent == build.cache_root() / "native"
    with open("/proc/self/maps") as fh:
        mapped = {ln.split()[-1] for ln in fh if "libggml-base" in ln}
    assert len(mapped) == 1, mapped


def test_headers_ship_with_the_package(tmp_path, monkeypatch):
    from hybrid_gguf.llama.native import build

    monkeypatch.delenv("HYBRID_GGUF_GGML_INCLUDE", raising=False)
    inc = build.find_include_dir(build.HEADERS_VERSION + "+hybrid.2")
    assert inc == build.INCLUDE_DIR and all((inc / h).is_file() for h in build.HEADERS)
    assert (inc / "LICENSE").read_text().startswith("MIT License")
    # other llama-cpp-python versions may lay out ggml's structs differently
    with pytest.raises(build.BuildError, match="HYBRID_GGUF_GGML_INCLUDE"):
        build.find_include_dir("0.3.99")
    for h in build.HEADERS:
        (tmp_path / h).write_text("/* */\n")
    monkeypatch.setenv("HYBRID_GGUF_GGML_INCLUDE", str(tmp_path))
    assert build.find_include_dir("0.3.99") == tmp_path
