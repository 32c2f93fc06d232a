"""The bundled tiny MoE: llama.cpp agrees with the numpy reference forward.

Logits of fixed sequences must match within float tolerance (with the reference following
llama.cpp's routing, see test_logits_and_routing_match_reference), and every layer's top-k
expert selection must be the same set, seen two ways: a Python cb_eval callback that
reads `ffn_moe_topk-<il>` and (where it builds) the native routing recorder's trace.
A selection may differ only where the reference itself calls it a near-tie, because
llama.cpp rounds activations to F16 in its F16 matmuls and its KV cache.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hybrid_gguf.llama import ggml_lib  # noqa: E402
from scripts.tiny_moe import corpus
from scripts.tiny_moe import reference as ref
from scripts.tiny_moe.export import read_train_info

MODEL = Path(os.environ.get(
    "HYBRID_GGUF_TINY_MOE",
    Path(__file__).resolve().parents[1] / "hybrid_gguf" / "data" / "tiny-moe-stdlib.gguf"))
SIDECAR = MODEL.with_suffix(".json")

# Fixed texts (not read from this machine's stdlib, which varies between Pythons).
TEXTS = [
    "import os\n\ndef read_config(path, default=None):\n"
    "    \"\"\"Return the parsed config, or default when missing.\"\"\"\n"
    "    if not os.path.exists(path):\n        return default\n"
    "    with open(path) as f:\n        return json.load(f)\n",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self._items = []\n"
    "        self.maxsize = maxsize\n\n    async def put(self, item):\n"
    "        while self.full():\n            await self._wait()\n        self._items.append(item)\n",
    "The with statement is used to wrap the execution of a block with methods defined "
    "by a context manager. This allows common try/except/finally usage patterns to be "
    "encapsulated for convenient reuse. Caf\u00e9 \u2014 na\u00efve \u00fcber.",
]
LOGIT_ATOL = 0.03  # llama.cpp rounds activations to F16 in F16 matmuls and the KV cache (seen: 0.012)
NEAR_TIE = 2e-3  # router prob gap below which a top-k swap is rounding, not a bug


GgmlTensor = ggml_lib.GgmlTensor


class TopkCallback:
    """cb_eval that copies each `ffn_moe_topk-<il>` (I32 [k, n_tokens], a strided view)."""

    PREFIX = b"ffn_moe_topk-"

    def __init__(self):
        import llama_cpp.llama_cpp as bindings

        self.rows = {}  # layer -> list of (n_tokens, k) arrays, in graph order
        # Keep the ctypes callback object alive as long as the context can call it.
        self.c_callback = bindings.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t_ptr, ask, _user_data):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        if not t.name.startswith(self.PREFIX):
            return False if ask else True
        if ask:
            return True
        il = int(t.name[len(self.PREFIX):].split()[0])
        k, n_tok = t.ne[0], t.ne[1]
        out = np.empty((n_tok, k), dtype=np.int32)
        for j in range(n_tok):  # CPU buffer: data is a host pointer; rows are nb[1] apart
            out[j] = np.ctypeslib.as_array((ctypes.c_int32 * k).from_address(t.data + j * t.nb[1]))
        self.rows.setdefault(il, []).append(out)
        return True

    def patch(self, params):
        params.cb_eval = self.c_callback
        params.cb_eval_user_data = None

    def topk(self, il):
        return np.concatenate(self.rows[il])


@pytest.fixture(scope="module")
def model():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} not built")
    return ref.load(str(MODEL))


@pytest.fixture(scope="module")
def sequences(model):
    return [[corpus.BOS_ID] + corpus.encode(t).tolist() for t in TEXTS]


@pytest.fixture(scope="module")
def reference(model, sequences):
    return [ref.forward(model, s) for s in sequences]


def _llama(extra_patch=None, **kw):
    from hybrid_gguf.llama.hooks import construct_llama

    return construct_llama(
        str(MODEL), context_patch=extra_patch, n_ctx=256, n_batch=256, n_ubatch=256,
        logits_all=True, n_threads=2, verbose=False, seed=0, **kw,
    )


def _eval(llm, seq):
    llm.reset()
    llm.eval(seq)
    return np.array(llm.scores[: len(seq)], dtype=np.float32)


def _check_routing(name, got, want, probs, k):
    """Top-k sets equal, except at near-ties of the reference router."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    differ = (np.sort(got, -1) != np.sort(want, -1)).any(-1)
    margin = ref.topk_margin(probs, k)
    bad = differ & (margin >= NEAR_TIE)
    assert not bad.any(), f"{name}: top-k differs at tokens {np.nonzero(bad)[0][:10]} (margins {margin[bad][:5]})"
    assert differ.mean() <= 0.01, f"{name}: {differ.sum()} of {len(differ)} selections differ"
    return int(differ.sum())


def test_metadata_and_sidecar(model):
    info = read_train_info(str(MODEL))
    assert info["corpus"] == "python-stdlib-source"
    assert set(info["heldout_packages"]).isdisjoint(info["train_packages"])
    assert info["heldout_bits_per_byte"] < info["heldout_unigram_bits_per_byte"] - 1.0
    side = json.loads(SIDECAR.read_text())
    assert side["train"]["heldout_packages"] == list(info["heldout_packages"])
    cfg = model.cfg
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_layer) == (16, 4, 4)


def test_tokenizer_matches_llama_cpp(sequences):
    llm = _llama()
    for text, seq in zip(TEXTS, sequences):
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == seq
        assert llm.detokenize(seq[1:]).decode("utf-8") == text


def test_logits_and_routing_match_reference(model, sequences, reference):
    cb = TopkCallback()
    llm = _llama(cb.patch)
    cfg = model.cfg
    swaps = 0
    for seq, want in zip(sequences, reference):
        cb.rows.clear()
        got = _eval(llm, seq)
        seen = [cb.topk(il) for il in range(cfg.n_layer)]
        for il in range(cfg.n_layer):
            swaps += _check_routing(f"callback layer {il}", seen[il], want.topk[il],
                                    want.probs[il], cfg.n_expert_used)
        # Arithmetic: the reference following llama.cpp's routing matches it tightly.
        # (A flipped near-tie moves its token's logits by far more than rounding does.)
        forced = ref.forward(model, seq, force_topk=seen)
        err = np.abs(got - forced.logits)
        assert err.max() < LOGIT_ATOL, f"max |dlogit| {err.max():.4f} with llama.cpp's routing"
        # Own routing: same predictions, small average difference.
        assert (got.argmax(-1) == want.logits.argmax(-1)).mean() > 0.98
        assert np.abs(got - want.logits).mean() < 0.01
    assert swaps <= 0.01 * sum(len(s) for s in sequences) * cfg.n_layer


def test_native_recorder_trace_matches_reference(model, sequences, reference):
    from hybrid_gguf.llama.recorder import RecorderUnavailable, RoutingRecorder

    cfg = model.cfg
    try:
        rec = RoutingRecorder(cfg.n_layer, cfg.n_expert, cfg.n_expert_used,
                              trace_capacity=cfg.n_layer * cfg.n_ctx)
    except RecorderUnavailable as exc:
        pytest.skip(str(exc))
    llm = _llama(rec.attach())
    for seq, want in zip(sequences, reference):
        rec.reset()
        start = rec.snapshot(trace=False).stats["tokens_seen"]
        _eval(llm, seq)
        tr = rec.snapshot().trace
        assert tr is not None and tr.written == cfg.n_layer * len(seq)
        for il in range(cfg.n_layer):
            mine = tr.layer == il
            order = np.argsort(tr.token[mine], kind="stable")
            assert np.array_equal(tr.token[mine][order] - start, np.arange(len(seq)))
            _check_routing(f"recorder layer {il}", tr.ids[mine][order], want.topk[il],
                           want.probs[il], cfg.n_expert_used)
