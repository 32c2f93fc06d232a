"""Errors that the CLI turns into one clear line and a non-zero exit."""


class HybridError(Exception):
    """A user-facing error: bad input, missing capability, or a refused request."""
