"""hybrid-gguf: per-expert GPU/CPU placement for Mixture-of-Experts GGUF models."""

__version__ = "0.1.0"

try:
    # Load libllama before numpy: on the GPU machine's Python 3.12 the reverse order
    # made model loading segfault (../shared/llama-cpp-notes.md, seen again here).
    import llama_cpp as _llama_cpp  # noqa: F401
except (ImportError, OSError):
    # no backend yet, or a broken one: inventory, synth and `hybrid-gguf backend install`
    # still work
    pass


def __getattr__(name):
    # the API's nouns, imported on first use so `import hybrid_gguf` stays cheap
    if name == "HybridModel":
        from .model import HybridModel

        return HybridModel
    if name == "inspect":
        from .inventory import read_inventory

        return read_inventory
    if name == "plan":
        from .autoplan import plan_model

        return plan_model
    if name == "list_devices":
        from .devices import list_devices

        return list_devices
    raise AttributeError(f"module 'hybrid_gguf' has no attribute {name!r}")
