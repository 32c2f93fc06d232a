"""Loading llama.cpp with a placement: `load_llama` is the package's one way in. It applies
both parts of a placement (planning/placement.py: whole-tensor rules, and the per-expert
hot set handed to the hybrid patch), a bench model's routing trace, and the routing recorder.

Whole-tensor placement works on stock llama.cpp through `tensor_buft_overrides`.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.placement import TensorPlacement, plan_text, validate_rules


# --- ctypes overrides -------------------------------------------------------------------


class TensorBuftOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def buffer_type_for(target: str, allow_extra_bufts: bool = False) -> int:
    """ggml buffer-type pointer for a rule target.

    CPU extra buffer types (CPU_REPACK) are refused unless allow_extra_bufts: the repack
    buffer aborts on a tensor type it cannot repack, and "CPU" already lets llama.cpp
    choose them per tensor where they apply.
    """
    from hybrid_gguf.llama import devices
    from hybrid_gguf.llama import ggml_lib

    wanted = target.strip()
    low = wanted.lower()
    if low == "cpu":
        # The one pointer llama.cpp treats as "host memory, best CPU buffer type".
        return ggml_lib.cpu_buffer_type()
    if low == "gpu":
        dev = devices.resolve_device("gpu")
        return ggml_lib.dev_buffer_type(ggml_lib.dev_get(dev.index))
    candidates: dict[str, int] = {}
    for dev in devices.list_devices():
        handle = ggml_lib.dev_get(dev.index)
        candidates[dev.name.lower()] = (
            ggml_lib.cpu_buffer_type() if dev.type == "cpu" else ggml_lib.dev_buffer_type(handle)
        )
        host = ggml_lib.dev_host_buffer_type(handle)
        if host:
            candidates.setdefault(ggml_lib.buft_name(host).lower(), host)
    if allow_extra_bufts:
        for buft in ggml_lib.cpu_extra_buffer_types():
            candidates.setdefault(ggml_lib.buft_name(buft).lower(), buft)
    if low in candidates:
        return candidates[low]
    if low.startswith("cuda") and not devices.has_cuda():
        raise HybridError(f"placement target {target!r} needs CUDA, but this llama.cpp has no CUDA device")
    known = ", ".join(sorted({"CPU", "GPU", *(k.upper() for k in candidates)}))
    raise HybridError(f"unknown placement target {target!r}; known: {known}")


def build_overrides(placement: TensorPlacement, allow_extra_bufts: bool = False):
    """(NULL-terminated ctypes array, keepalive); (None, None) when there are no rules.

    Keep `keepalive` referenced as long as the model params may be read.
    """
    import llama_cpp

    validate_rules(placement.rules)
    if not placement.rules:
        return None, None
    limit = int(llama_cpp.llama_max_tensor_buft_overrides())
    if len(placement.rules) >= limit:
        raise HybridError(f"too many placement rules ({len(placement.rules)}); llama.cpp allows {limit - 1}")
    patterns = [rule.pattern.encode("ascii") for rule in placement.rules]
    array = (TensorBuftOverride * (len(patterns) + 1))()
    for i, (rule, pattern) in enumerate(zip(placement.rules, patterns)):
        array[i].pattern = pattern
        array[i].buft = buffer_type_for(rule.device, allow_extra_bufts)
    array[len(patterns)].pattern = None  # terminator
    array[len(patterns)].buft = None
    return array, (array, patterns)


def model_patch_for(placement: TensorPlacement, allow_extra_bufts: bool = False) -> Callable[[Any], None]:
    """A construct_llama model_patch that installs the overrides.

    `Llama.__init__` overwrites `n_gpu_layers` after the patch runs, so also pass
    `**llama_kwargs_for(placement)` (load_llama does both). The patch holds the
    override array in `patch.keepalive`; keep the patch (or that) alive with the Llama.
    """
    array, keepalive = build_overrides(placement, allow_extra_bufts)

    def patch(params) -> None:
        params.tensor_buft_overrides = ctypes.addressof(array) if array is not None else None
        params.n_gpu_layers = placement.n_gpu_layers

    patch.keepalive = keepalive  # type: ignore[attr-defined]
    return patch


def llama_kwargs_for(placement: TensorPlacement) -> dict:
    return {"n_gpu_layers": placement.n_gpu_layers}


@dataclass
class LoadedLlama:
    llm: Any
    placement: Optional[TensorPlacement]
    buffers: Any  # llama_log.BufferReport
    log: list = field(default_factory=list)
    hot: dict = field(default_factory=dict)  # {layer: [expert, ...]} the patch packed
    recorder: Any = None  # the RoutingRecorder on the context, when recording
    decode_sampler: Any = None  # its DecodeSampler, when it observes some decoded tokens only

    def close(self) -> None:
        """Free the context, then the recorder its callback points at."""
        self.llm.close()
        if self.recorder is not None:
            self.recorder.close()


def load_llama(model_path, placement: Optional[TensorPlacement] = None, *,
               hot: Optional[Mapping[int, Sequence[int]]] = None,
               pack_device: Union[None, str, Mapping[int, str]] = None,
               cold_on_gpu: bool = False, cache=None, worker: bool = False, gpu_cold=None, record=None, route_trace=None,
               model_patch: Optional[Callable[[Any], None]] = None,
               allow_extra_bufts: bool = False, inventory=None, **llama_kwargs) -> LoadedLlama:
    """Construct a Llama with a placement and report where llama.cpp put the buffers.

    The placement comes in two parts: `placement`, the whole-tensor rules (and n_gpu_layers),
    and `hot` ({layer: [expert, ...]}), the experts the hybrid patch copies into hot packs on
    `pack_device` (None or "GPU": the first GPU; "auto": each layer's own GPU; {layer: device}:
    per layer, the rest on the first GPU), handed to it for this load only.
    `cold_on_gpu`: that GPU also computes the cold experts, reading them from pinned host
    memory (placement.plan_text), instead of a CPU hand-off per split layer.
    `worker`: decode steps hand the split layers' cold experts to a CPU worker thread
    (placement.plan_text) instead of a graph split per layer.
    `gpu_cold` ({layer: [cold expert, ...]}, patch version 10): the GPU reads those cold experts
    in place while the CPU worker computes the rest of the layer's cold ones (implies `worker`).
    `cache` (placement.CacheOptions): the hot packs become an in-session cache whose slots
    adapt between ubatches (the hot set gives the slots and their first residents).
    `record` (recorder.Recording): attach a routing recorder to the context; it is
    LoadedLlama.recorder, freed by LoadedLlama.close(). Without it, a `context_patch`
    keyword may set the context's cb_eval instead.
    `route_trace` ([n_rows, n_layer, n_used] expert ids): a bench model's routing, replayed
    by token position instead of the router's choice (routing_process.model_trace).
    `model_patch` (optional) runs after the placement patch, for other raw params.
    Thread counts, context and batch sizes are checked first (limits.check_llama_kwargs;
    with `inventory`, the context's memory too), so llama.cpp never sees absurd ones.
    llama.cpp's load failure (ValueError) becomes a HybridError carrying its last error line.
    """
    from hybrid_gguf.limits import check_llama_kwargs
    from hybrid_gguf.llama import hybrid
    from hybrid_gguf.llama.hooks import construct_llama
    from hybrid_gguf.llama.log import capture_llama_log, install_abort_handler

    check_llama_kwargs(llama_kwargs, inventory)
    hot = {int(l): [int(e) for e in es] for l, es in (hot or {}).items() if len(es)}

    place_patch = model_patch_for(placement, allow_extra_bufts) if placement is not None else None

    def patch(params) -> None:
        if place_patch is not None:
            place_patch(params)
        if model_patch is not None:
            model_patch(params)

    kwargs = dict(llama_kwargs)
    if placement is not None:
        for key, value in llama_kwargs_for(placement).items():
            kwargs.setdefault(key, value)  # an explicit caller argument wins
    recorder = _new_recorder(model_path, inventory, record) if record is not None else None
    if recorder is not None:
        if "context_patch" in kwargs:
            recorder.close()
            raise HybridError("a recorder and a context_patch both want the context's cb_eval; pass one")
        kwargs["context_patch"] = recorder.attach()
    install_abort_handler()  # a GGML_ASSERT that slips past the header checks prints one line
    try:
        with contextlib.ExitStack() as handed_over, capture_llama_log() as cap:
            if hot:
                per_layer = isinstance(pack_device, Mapping)
                text = plan_text(hot, None if per_layer else pack_device, cold_on_gpu=cold_on_gpu,
                                 layer_buffer_types=pack_device if per_layer else None,
                                 cache=cache if cache is not None and cache.active else None, worker=worker,
                                 gpu_cold=gpu_cold)
                handed_over.enter_context(hybrid.pending_plan(text))
            if route_trace is not None:
                handed_over.enter_context(hybrid.pending_route_trace(route_trace))
            try:
                llm = construct_llama(str(model_path), model_patch=patch, **kwargs)
            except ValueError as exc:
                detail = load_error_detail(cap.errors(), str(exc))
                raise HybridError(f"llama.cpp could not load {model_path}: {detail}") from None
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    # The array is only read during loading, but keep it as long as the Llama lives.
    llm._hybrid_placement_keepalive = getattr(place_patch, "keepalive", None)
    llm._hybrid_gguf_recorder = recorder  # the C callback points at it
    loaded = LoadedLlama(llm=llm, placement=placement, buffers=cap.buffers(), log=cap.lines, hot=hot,
                         recorder=recorder)
    if hot and hybrid.pack_bytes(llm._model.model) == 0:
        loaded.close()
        raise HybridError("llama.cpp loaded the model but built no hot packs")
    if recorder is not None and record.decode_stride > 1:
        loaded.decode_sampler = _sample_decodes(llm, recorder, record.decode_stride)
    return loaded


def _new_recorder(model_path, inventory, record):
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.llama.recorder import RoutingRecorder

    inv = inventory if inventory is not None else read_inventory(model_path)
    return RoutingRecorder(inv.n_layer, inv.n_expert, inv.n_expert_used, trace_capacity=record.trace_records)


def _sample_decodes(llm, recorder, stride: int):
    """Observe prompts and 1 decoded token in `stride` (in bursts): the sampler is told
    before each eval (Llama.generate calls eval once per prompt and once per token)."""
    sampler = recorder.decode_sampler(llm._ctx.ctx, stride)
    if sampler.switches_callback:
        llm_eval = llm.eval

        def eval_sampled(tokens):
            sampler.before_decode(len(tokens))
            return llm_eval(tokens)

        llm.eval = eval_sampled
    return sampler


# Error lines llama.cpp logs after the cause, saying only that loading failed.
_GENERIC_LOAD_ERROR = re.compile(
    r"failed to (load|read) (model|tensor data|tensor info|key-value pairs)\b"
    r"|failed to load model from|error loading model: llama_model_loader: failed to load")


def load_error_detail(errors: list, fallback: str, keep: int = 2) -> str:
    """The last specific llama.cpp error lines of a failed load, joined into one line.

    llama.cpp logs the cause first ("gguf_init_from_reader: tensor 'x' has offset ...")
    and then generic lines ("failed to read tensor data", "failed to load model");
    those are left out unless nothing else was logged."""
    lines = [" ".join(e.split()) for e in errors if e.strip()]
    specific = [e for e in lines if not _GENERIC_LOAD_ERROR.search(e)]
    chosen = []
    for line in reversed(specific or lines[-1:]):
        if line not in chosen:
            chosen.insert(0, line)
        if len(chosen) == keep:
            break
    return "; ".join(chosen) if chosen else (" ".join(fallback.split()) or "unknown error")


def tokenizer_for(model_path) -> Callable[[str], list[int]]:
    """The model's tokenizer alone (a vocab-only load): text -> token ids, no BOS."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)
