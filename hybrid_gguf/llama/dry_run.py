"""llama.cpp's own compute-buffer size for a model and context: a no-alloc dry run.

The one memory number the pure model (planning/memory.py) cannot compute exactly; it is
measured here and handed to the planner as MemoryOptions.compute_bytes.
"""

from __future__ import annotations

from typing import Optional

from hybrid_gguf.errors import HybridError
from hybrid_gguf.llama.loader import model_patch_for
from hybrid_gguf.planning.memory import CACHE_TYPE_IDS, device_of_buffer
from hybrid_gguf.planning.placement import TensorPlacement


def measure_compute_bytes(model_path, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = False,
                          placement: Optional[TensorPlacement] = None, n_gpu_layers: int = -1,
                          type_k: str = "f16", type_v: str = "f16") -> dict:
    """Compute-buffer bytes per device, from llama.cpp itself: a no-alloc dry run.

    llama.cpp loads only the header (`no_alloc`, load mode "none"), builds the graphs a
    context would reserve and logs the compute buffer sizes it would allocate; nothing is
    read or allocated. Exact for this machine's backends and the given placement
    (host-expert placements include the op-offload scratch copies). Returns
    {device: bytes}, e.g. {"CUDA0": ..., "CPU": ...}; raises HybridError if llama.cpp fails.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as b

    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.limits import check_context_memory
    from hybrid_gguf.llama.log import capture_llama_log

    # even with no_alloc, llama.cpp keeps host bookkeeping per KV cell: a context that cannot
    # fit here is not dry-run (HybridError: the caller estimates instead)
    check_context_memory(read_inventory(model_path), int(n_ctx), int(n_ubatch), flash_attn, type_k, type_v,
                         name="the dry run's context")

    llama_cpp.llama_backend_init()
    patch = model_patch_for(placement) if placement is not None and placement.rules else None
    with capture_llama_log(forward=False) as cap:
        mp = b.llama_model_default_params()
        if patch is not None:
            patch(mp)
        mp.n_gpu_layers = n_gpu_layers
        mp.no_alloc = True
        mp.load_mode = 0  # no mmap: the dry run refuses mapped buffers
        model = b.llama_model_load_from_file(str(model_path).encode(), mp)
        if not model:
            raise HybridError(f"llama.cpp could not read {model_path} for a dry run: "
                              + "; ".join(cap.errors()[-2:]))
        try:
            cp = b.llama_context_default_params()
            cp.n_ctx = int(n_ctx)
            cp.n_batch = max(int(n_ubatch), 1)
            cp.n_ubatch = max(int(n_ubatch), 1)
            cp.flash_attn_type = 1 if flash_attn else 0
            cp.type_k = CACHE_TYPE_IDS[type_k.lower()]
            cp.type_v = CACHE_TYPE_IDS[type_v.lower()]
            ctx = b.llama_init_from_model(model, cp)
            if not ctx:
                raise HybridError("llama.cpp could not build a context in the dry run: "
                                  + "; ".join(cap.errors()[-2:]))
            b.llama_free(ctx)
        finally:
            b.llama_model_free(model)
    out: dict = {}
    for name, n in cap.buffers().compute.items():
        dev = device_of_buffer(name)
        out[dev] = out.get(dev, 0) + n
    return out
