"""Native (C) parts of hybrid-gguf, built on demand by `build.py`."""
