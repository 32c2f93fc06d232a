"""hybrid-gguf: per-expert GPU/CPU placement for Mixture-of-Experts GGUF models."""

__version__ = "0.1.0"
