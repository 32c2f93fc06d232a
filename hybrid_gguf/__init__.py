"""hybrid-gguf: per-expert GPU/CPU placement for Mixture-of-Experts GGUF models."""

__version__ = "0.1.0"

try:
    # Load libllama before numpy: on the GPU machine's Python 3.12 the reverse order
    # made model loading segfault (../shared/llama-cpp-notes.md, seen again here).
    import llama_cpp as _llama_cpp  # noqa: F401
except ImportError:  # the backend is not built yet; inventory and synth still work
    pass
