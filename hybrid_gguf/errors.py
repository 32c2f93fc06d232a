"""Errors that the CLI turns into one clear line and a non-zero exit."""


class HybridError(Exception):
    """A user-facing error: bad input, missing capability, or a refused request."""


class BackendForAnotherCpu(HybridError, ImportError):
    """`import llama_cpp` refused: the installed build uses instructions this CPU lacks (it
    would die of SIGILL). An ImportError, so code that copes with a missing backend copes."""


# Why experts are placed per whole tensor: said by the planner, the loader and the API alike.
STOCK_NOTICE = (
    "this llama-cpp-python build lacks the hybrid-gguf patch, so experts are placed per whole "
    "tensor (layer); run `hybrid-gguf backend install` for per-expert placement"
)
