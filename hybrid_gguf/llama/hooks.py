"""Construct a `llama_cpp.Llama` with model/context parameters it has no arguments for.

llama-cpp-python builds its `llama_model_params` / `llama_context_params` from
`llama_model_default_params()` / `llama_context_default_params()` inside `Llama.__init__`.
Wrapping those two functions for the duration of the constructor lets us set fields
such as `tensor_buft_overrides` and `cb_eval` while keeping the whole `Llama` API.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

ParamsPatch = Callable[[Any], None]

# Patching module attributes is process-global; serialize constructions.
_construct_lock = threading.Lock()


@contextlib.contextmanager
def patched_default_params(
    model_patch: Optional[ParamsPatch] = None,
    context_patch: Optional[ParamsPatch] = None,
) -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings

    orig_model = bindings.llama_model_default_params
    orig_context = bindings.llama_context_default_params

    def model_defaults():
        params = orig_model()
        if model_patch is not None:
            model_patch(params)
        return params

    def context_defaults():
        params = orig_context()
        if context_patch is not None:
            context_patch(params)
        return params

    with _construct_lock:
        bindings.llama_model_default_params = model_defaults
        bindings.llama_context_default_params = context_defaults
        try:
            yield
        finally:
            bindings.llama_model_default_params = orig_model
            bindings.llama_context_default_params = orig_context


def construct_llama(
    model_path: str,
    model_patch: Optional[ParamsPatch] = None,
    context_patch: Optional[ParamsPatch] = None,
    **llama_kwargs: Any,
):
    """Build a `Llama`, letting the patches edit the raw ctypes params first.

    Patches run before `Llama` applies its own keyword arguments, so they must
    only touch fields that `Llama` does not set (overrides, cb_eval, ...).
    """
    import llama_cpp

    with patched_default_params(model_patch, context_patch):
        return llama_cpp.Llama(model_path=model_path, **llama_kwargs)
