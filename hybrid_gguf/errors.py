"""Errors that the CLI turns into one clear line and a non-zero exit."""


class HybridError(Exception):
    """A user-facing error: bad input, missing capability, or a refused request."""


# Why experts are placed per whole tensor: said by the planner, the loader and the API alike.
STOCK_NOTICE = (
    "this llama-cpp-python build lacks the hybrid-gguf patch, so experts are placed per whole "
    "tensor (layer); run `hybrid-gguf backend install` for per-expert placement"
)
