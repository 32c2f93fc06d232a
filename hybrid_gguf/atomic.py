"""Atomic file writes: a crash or a second writer never leaves a half-written file."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Crash tests set this to pause a writer half-way, then kill it.
SLOW_WRITE_ENV = "HYBRID_GGUF_TEST_SLOW_WRITE"


def tmp_prefix(path: Path) -> str:
    """Prefix of the temporary files of `path` (a dead writer's can be found and removed)."""
    return f".{path.name}.tmp-"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a unique temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            slow = os.environ.get(SLOW_WRITE_ENV)
            if slow:  # crash tests kill the writer here
                fh.flush()
                time.sleep(float(slow))
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temp file (from tempfile.mkstemp, mode 0600) over `path`, with the
    mode a plain open() would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int) -> Path:
    """A matplotlib figure written atomically; a name without a suffix gets ".png" (as
    savefig would add). Returns the file written."""
    import io

    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower(), dpi=dpi)
    atomic_write(path, buf.getvalue())
    return path
