"""Capture llama.cpp's log during a model/context load and read the buffer sizes it reports.

llama.cpp prints one line per allocated buffer, e.g.
    load_tensors:   CPU_Mapped model buffer size =    12.34 MiB
    llama_kv_cache:        CPU KV buffer size =     1.00 MiB
    llama_context:        CPU compute buffer size =     2.50 MiB
These lines are the ground truth for where tensors ended up, whatever we asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

# enum ggml_log_level in ggml.h of this llama.cpp (llama_cpp/_logger.py's comment is older)
LOG_LEVEL_DEBUG = 1
LOG_LEVEL_INFO = 2
LOG_LEVEL_WARN = 3
LOG_LEVEL_ERROR = 4
LOG_LEVEL_CONT = 5  # continues the previous line

_BUFFER_RE = re.compile(
    r"^\s*\w+:\s+(?P<buffer>\S+)\s+(?P<kind>model|KV|compute|output|RS|LoRA)"
    r" buffer size\s*=\s*(?P<mib>[0-9.]+) MiB"
)
_OVERRIDE_RE = re.compile(r"tensor (?P<tensor>\S+) \(.*\) buffer type overridden to (?P<buft>\S+)")

MIB = 1024 * 1024


@dataclass
class BufferReport:
    """Bytes per buffer name, per kind of buffer, as llama.cpp logged them.

    Sizes are printed in MiB with two decimals, so each value is exact only to
    +-0.005 MiB (about 5 KiB). Buffers with the same name are summed.
    """

    model: dict[str, int] = field(default_factory=dict)
    kv: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    recurrent: dict[str, int] = field(default_factory=dict)
    # tensor name -> buffer type name, from the debug lines of overridden tensors
    overridden: dict[str, str] = field(default_factory=dict)

    def total(self, buffer: str) -> int:
        """All bytes of one buffer name (weights + KV + compute + output)."""
        return sum(
            kind.get(buffer, 0)
            for kind in (self.model, self.kv, self.compute, self.output, self.recurrent)
        )


_KIND_FIELD = {"model": "model", "KV": "kv", "compute": "compute", "output": "output", "RS": "recurrent"}


def parse_buffer_sizes(lines: list[str]) -> BufferReport:
    report = BufferReport()
    for line in lines:
        m = _BUFFER_RE.match(line)
        if m:
            target = _KIND_FIELD.get(m["kind"])
            if target is None:  # LoRA adapters are not part of a load
                continue
            sizes = getattr(report, target)
            sizes[m["buffer"]] = sizes.get(m["buffer"], 0) + round(float(m["mib"]) * MIB)
            continue
        m = _OVERRIDE_RE.search(line)
        if m:
            report.overridden[m["tensor"]] = m["buft"]
    return report


class LogCapture:
    """Lines collected by capture_llama_log (complete lines, newline stripped)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.levels: list[int] = []
        self._partial = ""
        self._partial_level = 0
        self._lock = threading.Lock()

    def _feed(self, level: int, text: str) -> None:
        with self._lock:
            if level != LOG_LEVEL_CONT and not self._partial:
                self._partial_level = level
            self._partial += text
            *complete, self._partial = self._partial.split("\n")
            for line in complete:
                self.lines.append(line)
                self.levels.append(self._partial_level)

    def _flush(self) -> None:
        with self._lock:
            if self._partial:
                self.lines.append(self._partial)
                self.levels.append(self._partial_level)
                self._partial = ""

    def errors(self) -> list[str]:
        return [ln.strip() for ln, lvl in zip(self.lines, self.levels) if lvl == LOG_LEVEL_ERROR and ln.strip()]

    def buffers(self) -> BufferReport:
        return parse_buffer_sizes(self.lines)


@contextlib.contextmanager
def capture_llama_log(forward: bool = True) -> Iterator[LogCapture]:
    """Collect every llama.cpp/ggml log line (all levels, DEBUG included) in the block.

    With forward=True each line also goes to the callback that was installed before
    (llama_cpp's logger, which prints only when the Llama is verbose). The previous
    callback is restored on exit. Not re-entrant across threads: the logger is global.
    """
    import llama_cpp

    capture = LogCapture()
    prev_cb = llama_cpp.llama_log_callback()
    prev_ud = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    forward_to = prev_cb if forward and ctypes.cast(prev_cb, ctypes.c_void_p).value else None

    def on_log(level: int, text: bytes, user_data) -> None:
        try:
            capture._feed(level, (text or b"").decode("utf-8", "replace"))
            if forward_to is not None:
                forward_to(level, text, prev_ud)
        except Exception:  # an exception cannot cross the C callback boundary
            pass

    global _last_capture
    c_callback = llama_cpp.llama_log_callback(on_log)  # referenced until restored below
    llama_cpp.llama_log_set(c_callback, None)
    outer, _last_capture = _last_capture, capture
    try:
        yield capture
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_ud)
        _last_capture = outer
        capture._flush()


# ---------------------------------------------------------------------------
# GGML_ASSERT / GGML_ABORT: one line instead of a silent SIGABRT

# Exit status used when llama.cpp aborts (None: return to ggml, which then calls abort()).
# The CLI sets it, so an abort that slipped past the header checks ends as one error line.
_abort_exit_status: Optional[int] = None
_abort_callback = None  # the installed ctypes callback, kept referenced
_abort_lock = threading.Lock()
_last_capture: Optional[LogCapture] = None  # the capture in progress, for its error lines


def set_abort_exit_status(status: Optional[int]) -> None:
    """Exit with `status` (without a core dump or gdb backtrace) when llama.cpp aborts."""
    global _abort_exit_status
    _abort_exit_status = status


def abort_message(raw: bytes, recent_errors: Optional[list] = None) -> str:
    """One line for a ggml abort message ("/long/path/ggml.c:123: GGML_ASSERT(x) failed")."""
    text = " ".join((raw or b"").decode("utf-8", "replace").split())
    m = re.match(r"^(?P<file>[^:\s]+):(?P<line>\d+): (?P<rest>.*)$", text)
    if m:
        text = f"{m['rest']} ({m['file'].rsplit('/', 1)[-1]}:{m['line']})"
    if recent_errors:
        text += f"; last llama.cpp error: {recent_errors[-1]}"
    return f"llama.cpp aborted: {text}"


def install_abort_handler() -> bool:
    """Route ggml's aborts through a callback that prints one line to stderr (and exits
    with the status set by set_abort_exit_status, if any). Idempotent; False when the
    loaded ggml has no ggml_set_abort_callback."""
    global _abort_callback
    import os
    import sys

    with _abort_lock:
        if _abort_callback is not None:
            return True
        try:
            from hybrid_gguf.llama.ggml_lib import libs

            base = libs().base
            setter = base.ggml_set_abort_callback
        except Exception:
            return False
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        # llama-cpp-python points fds 1 and 2 at /dev/null while it loads a model quietly:
        # keep a copy of the real stderr for the message.
        try:
            err_fd = os.dup(2)
        except OSError:
            err_fd = 2

        def on_abort(message: bytes) -> None:
            try:
                cap = _last_capture
                line = abort_message(message, cap.errors() if cap is not None else None)
                try:
                    sys.stdout.flush()
                except Exception:
                    pass
                os.write(err_fd, f"error: {line}\n".encode("utf-8", "replace"))
            except Exception:
                pass
            if _abort_exit_status is not None:
                os._exit(_abort_exit_status)

        callback = proto(on_abort)
        setter.argtypes = [proto]
        setter.restype = ctypes.c_void_p
        setter(callback)
        _abort_callback = callback
        return True
