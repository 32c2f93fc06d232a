"""Routing profiles: accumulated expert-selection counts for one model, and their store.

A profile is one JSON file (human-inspectable; a 61 × 256 model is a few hundred KB):

    {
      "format": "hybrid-gguf-routing-profile", "version": 1,
      "fingerprint": "...", "arch": "qwen3moe",
      "n_layer": 48, "n_expert": 128, "n_expert_used": 8,
      "created": "2026-...Z", "updated": "2026-...Z",
      "sessions": 3, "labels": {"mixed": 2, "code": 1},
      "decay": 1.0,                       # factor applied by the latest merge
      "tokens_per_layer": {"prompt": [..n_layer..], "decode": [..]},
      "counts": {"prompt": [[..n_expert..] x n_layer], "decode": [[..]]}
    }

Counts are floats once a merge applied a decay < 1 (old sessions weigh less).

`ProfileStore(root)` keeps one file per model fingerprint, `<root>/<fp>.json`, guarded by
an exclusive `fcntl.flock` on `<root>/<fp>.lock`; writes are atomic (temp file, fsync,
os.replace), so a crashed writer leaves the previous profile intact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from hybrid_gguf.atomic import SLOW_WRITE_ENV, atomic_write, tmp_prefix  # noqa: F401  (SLOW_WRITE_ENV: tests)
from hybrid_gguf.errors import HybridError
from hybrid_gguf.readfile import FileTooLarge, read_bounded

FORMAT_NAME = "hybrid-gguf-routing-profile"
FORMAT_VERSION = 1
# Bounds on what a profile may hold: counts are exact in float64 up to 2**53, and no model
# has more than a few hundred layers or a few thousand experts per layer.
MAX_COUNT = 2**53
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_PROFILE_BYTES = 256 << 20
# Files moved aside (corrupt, or another model's) kept per profile; older ones are deleted.
KEEP_ASIDE = 3
# Test hook: seconds to sleep halfway through writing the temp file (crash tests).

PathLike = Union[str, os.PathLike]


class ProfileCorrupt(HybridError):
    """A profile file that cannot be parsed or fails validation."""


class ProfileOtherModel(HybridError):
    """A valid profile file whose fingerprint is not the one expected."""


def _whole(v, name: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be a whole number, got {v!r}"[:200])
    if not low <= v <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {v if abs(v) < 10**30 else 'a huge number'}")
    return v


def _count_array(x, shape: tuple, name: str) -> np.ndarray:
    """A JSON list (of lists) of plain non-negative numbers of `shape`, as float64."""
    rows = [x] if len(shape) == 1 else x
    if not isinstance(rows, list) or (len(shape) == 2 and len(rows) != shape[0]):
        raise ValueError(f"{name} must be a list of {shape[0]} rows")
    width = shape[-1]
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"{name}: array shape does not match {shape}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}: a count must be a number, got {v!r}"[:200])
            if not (0 <= v <= MAX_COUNT):  # also false for NaN
                raise ValueError(f"{name}: a count must be between 0 and 2**53, got "
                                 f"{v if abs(v) < 10**30 else 'a huge number'}")
    return np.asarray(x, dtype=np.float64).reshape(shape)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _number_list(a: np.ndarray) -> list:
    """Nested lists, integers where the values are whole (keeps files small and exact)."""
    if np.all(np.mod(a, 1) == 0) and np.all(np.abs(a) < 2**53):
        return a.astype(np.int64).tolist()
    return a.astype(np.float64).tolist()


@dataclass
class RoutingProfile:
    fingerprint: str
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    counts_prompt: np.ndarray  # float64 [n_layer, n_expert]
    counts_decode: np.ndarray
    tokens_prompt: np.ndarray  # float64 [n_layer]
    tokens_decode: np.ndarray
    sessions: int = 0
    labels: dict = field(default_factory=dict)  # workload label -> sessions merged
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    decay: float = 1.0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        L, E = self.n_layer, self.n_expert
        self.counts_prompt = np.asarray(self.counts_prompt, dtype=np.float64).reshape(L, E)
        self.counts_decode = np.asarray(self.counts_decode, dtype=np.float64).reshape(L, E)
        self.tokens_prompt = np.asarray(self.tokens_prompt, dtype=np.float64).reshape(L)
        self.tokens_decode = np.asarray(self.tokens_decode, dtype=np.float64).reshape(L)

    # -- views ----------------------------------------------------------------

    @property
    def counts(self) -> np.ndarray:
        """Prompt + decode selections, [n_layer, n_expert]."""
        return self.counts_prompt + self.counts_decode

    @property
    def tokens_per_layer(self) -> np.ndarray:
        return self.tokens_prompt + self.tokens_decode

    # -- construction ---------------------------------------------------------

    @classmethod
    def empty(cls, fingerprint: str, arch: str, n_layer: int, n_expert: int,
              n_expert_used: int) -> "RoutingProfile":
        z2, z1 = np.zeros((n_layer, n_expert)), np.zeros(n_layer)
        return cls(fingerprint, arch, n_layer, n_expert, n_expert_used,
                   z2, z2.copy(), z1, z1.copy())

    @classmethod
    def from_snapshot(cls, snapshot, fingerprint: str, arch: str,
                      label: Optional[str] = None) -> "RoutingProfile":
        """One session's profile from a `RoutingSnapshot`."""
        L, E = snapshot.counts_prompt.shape
        return cls(
            fingerprint, arch, L, E, snapshot.n_expert_used,
            snapshot.counts_prompt, snapshot.counts_decode,
            snapshot.tokens_prompt, snapshot.tokens_decode,
            sessions=1, labels={label: 1} if label else {},
        )

    # -- merging --------------------------------------------------------------

    def check_compatible(self, other: "RoutingProfile") -> None:
        if other.fingerprint != self.fingerprint:
            raise HybridError(
                f"routing profile is for another model (fingerprint {other.fingerprint[:16]}…, "
                f"expected {self.fingerprint[:16]}…)"
            )
        mine = (self.n_layer, self.n_expert, self.n_expert_used)
        theirs = (other.n_layer, other.n_expert, other.n_expert_used)
        if mine != theirs:
            raise HybridError(
                f"routing profile shape {theirs} (layers, experts, used) does not match {mine}"
            )

    def merged(self, delta: "RoutingProfile", decay: float = 1.0) -> "RoutingProfile":
        """self * decay + delta: decay < 1 makes the new session weigh more."""
        if not 0.0 < decay <= 1.0:
            raise HybridError(f"decay must be in (0, 1], got {decay}")
        self.check_compatible(delta)
        labels = dict(self.labels)
        for k, v in delta.labels.items():
            labels[k] = labels.get(k, 0) + v
        return RoutingProfile(
            self.fingerprint, self.arch or delta.arch, self.n_layer, self.n_expert,
            self.n_expert_used,
            self.counts_prompt * decay + delta.counts_prompt,
            self.counts_decode * decay + delta.counts_decode,
            self.tokens_prompt * decay + delta.tokens_prompt,
            self.tokens_decode * decay + delta.tokens_decode,
            sessions=self.sessions + delta.sessions, labels=labels,
            created=self.created, updated=_now(), decay=decay,
        )

    # -- (de)serialisation ----------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "arch": self.arch,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "created": self.created,
            "updated": self.updated,
            "sessions": self.sessions,
            "labels": dict(self.labels),
            "decay": self.decay,
            "tokens_per_layer": {
                "prompt": _number_list(self.tokens_prompt),
                "decode": _number_list(self.tokens_decode),
            },
            "counts": {
                "prompt": _number_list(self.counts_prompt),
                "decode": _number_list(self.counts_decode),
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingProfile":
        """Parse and validate; any problem raises ProfileCorrupt."""
        try:
            if d.get("format") != FORMAT_NAME:
                raise ValueError(f"not a routing profile (format {d.get('format')!r})")
            if d.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported profile version {d.get('version')!r}")
            L = _whole(d["n_layer"], "n_layer", 1, MAX_LAYERS)
            E = _whole(d["n_expert"], "n_expert", 1, MAX_EXPERTS)
            K = _whole(d["n_expert_used"], "n_expert_used", 1, E)
            arrays = [
                _count_array(d["counts"]["prompt"], (L, E), "counts.prompt"),
                _count_array(d["counts"]["decode"], (L, E), "counts.decode"),
                _count_array(d["tokens_per_layer"]["prompt"], (L,), "tokens_per_layer.prompt (count)"),
                _count_array(d["tokens_per_layer"]["decode"], (L,), "tokens_per_layer.decode (count)"),
            ]
            labels = d.get("labels", {})
            if not isinstance(labels, dict):
                raise ValueError("labels must be an object")
            for k, v in labels.items():
                _whole(v, f"labels[{k[:40]!r}]")
            decay = d.get("decay", 1.0)
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
                raise ValueError(f"decay must be a number in (0, 1], got {decay!r}"[:200])
            if not isinstance(d["fingerprint"], str):
                raise ValueError("fingerprint must be text")
            return cls(
                d["fingerprint"], str(d.get("arch", "")), L, E, K, *arrays,
                sessions=_whole(d.get("sessions", 0), "sessions"), labels=labels,
                created=str(d.get("created", "")), updated=str(d.get("updated", "")),
                decay=float(decay),
            )
        except ProfileCorrupt:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as exc:
            raise ProfileCorrupt(f"invalid routing profile: {exc}") from None

    def save(self, path: PathLike) -> Path:
        """Write atomically (temp file in the same directory, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, _dumps(self.to_dict()).encode())
        return path

    @classmethod
    def load(cls, path: PathLike, expected_fingerprint: Optional[str] = None) -> "RoutingProfile":
        """Read a profile file; ProfileCorrupt if unreadable, HybridError on a mismatch."""
        path = Path(path)
        try:
            # missing, a directory, a device or pipe: HybridError; too large: corrupt
            data = json.loads(read_bounded(path, "routing profile", MAX_PROFILE_BYTES))
        except FileTooLarge as exc:
            raise ProfileCorrupt(str(exc)) from None
        except RecursionError:
            raise ProfileCorrupt(f"cannot read routing profile {path}: JSON nested too deeply") from None
        except (OSError, ValueError) as exc:  # ValueError: JSON, UTF-8, ints of over 4300 digits
            raise ProfileCorrupt(f"cannot read routing profile {path}: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ProfileCorrupt(f"routing profile {path} is not a JSON object")
        try:
            prof = cls.from_dict(data)
        except ProfileCorrupt as exc:
            raise ProfileCorrupt(f"{path}: {exc}") from None
        if expected_fingerprint is not None and prof.fingerprint != expected_fingerprint:
            raise ProfileOtherModel(
                f"routing profile {path} is for another model (fingerprint "
                f"{prof.fingerprint[:16]}…, this model is {expected_fingerprint[:16]}…); "
                f"move that file aside to record a new profile for this model"
            )
        return prof


def _dumps(d: dict) -> str:
    """JSON with one line per key, and one line per layer for the count matrices."""
    compact = dict(separators=(",", ":"))
    lines = []
    for key, value in d.items():
        if key == "counts":
            phases = []
            for phase, rows in value.items():
                body = ",\n".join("   " + json.dumps(row, **compact) for row in rows)
                phases.append(f"  {json.dumps(phase)}: [\n{body}\n  ]")
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(phases) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, **compact)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def default_store_root() -> Path:
    from hybrid_gguf.paths import profiles_dir

    return profiles_dir()


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ProfileStore:
    """One routing profile per model fingerprint under `root`."""

    def __init__(self, root: Optional[PathLike] = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    def path_for(self, fingerprint: str) -> Path:
        name = fingerprint if _SAFE_NAME.match(fingerprint) else (
            "fp-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:32])
        return self.root / f"{name}.json"

    @contextmanager
    def _locked(self, fingerprint: str) -> Iterator[Path]:
        path = self.path_for(fingerprint)
        if self.root.exists() and not self.root.is_dir():
            raise HybridError(f"profile store {self.root} is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "a+b")
        except OSError as exc:
            raise HybridError(f"cannot use profile store {self.root}: {exc.strerror or exc}") from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released by the kernel if we die
            try:
                yield path
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self, path: Path, fingerprint: str) -> Optional[RoutingProfile]:
        """The stored profile, None if absent; a corrupt file is moved aside. A valid file of
        another model is not: ProfileOtherModel names it, for the user to move."""
        if not path.exists():
            return None
        try:
            return RoutingProfile.load(path, expected_fingerprint=fingerprint)
        except ProfileCorrupt as exc:
            aside = self._move_aside(path, "corrupt")
            where = f"moved it aside to {aside}" if aside else f"could not move it aside: move {path} away"
            warnings.warn(f"{exc}; {where} and starting afresh", stacklevel=3)
            return None

    def _move_aside(self, path: Path, kind: str) -> Optional[Path]:
        """Rename `path` to `<name>.<kind>-<time>`, keep the KEEP_ASIDE newest such files."""
        ns = time.time_ns()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(ns / 1e9))
        aside = path.with_name(f"{path.name}.{kind}-{stamp}-{ns % 10**9:09d}-{os.getpid()}")
        try:
            os.replace(path, aside)
            os.utime(aside)  # when it was moved aside, for pruning
        except OSError:
            return None
        old = []
        for p in path.parent.glob(f"{glob_escape(path.name)}.{kind}-*"):
            try:
                old.append((p.stat().st_mtime_ns, p.name, p))
            except OSError:
                pass
        for _, _, p in sorted(old, reverse=True)[KEEP_ASIDE:]:
            p.unlink(missing_ok=True)
        return aside

    def last_session_path(self, fingerprint: str) -> Path:
        """A small JSON record of the last session merged for `fingerprint` (`status`)."""
        return self.path_for(fingerprint).with_suffix(".last")

    def save_last_session(self, fingerprint: str, record: dict) -> None:
        """Best effort: a record that cannot be written costs only `status` its hit rate."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.last_session_path(fingerprint), (json.dumps(record) + "\n").encode())
        except OSError:
            pass

    def load_last_session(self, fingerprint: str) -> Optional[dict]:
        path = self.last_session_path(fingerprint)
        try:
            if path.stat().st_size > 1 << 16:
                return None
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def profiles(self) -> list:
        """Every readable stored profile (unreadable files are skipped, not moved)."""
        out = []
        if not self.root.is_dir():
            return out
        for path in sorted(self.root.glob("*.json")):
            try:
                out.append(RoutingProfile.load(path))
            except HybridError:
                continue
        return out

    def load(self, fingerprint: str) -> Optional[RoutingProfile]:
        """The stored profile for `fingerprint`, or None (absent, or corrupt and moved aside).

        A file whose content names another fingerprint raises HybridError.
        """
        with self._locked(fingerprint) as path:
            return self._read(path, fingerprint)

    TRACE_TOKENS = 2048  # tokens of the newest trace kept per model

    def trace_path_for(self, fingerprint: str) -> Path:
        return self.path_for(fingerprint).with_suffix(".trace.npz")

    def save_trace(self, fingerprint: str, trace) -> Path:
        """Keep `trace` (replay.Trace, time order) as the model's newest routing trace: its
        last TRACE_TOKENS tokens, written atomically; the planner replays an in-session cache
        on it (`plan --cache auto`)."""
        import io

        ids = np.asarray(trace.ids, dtype=np.int32)[-self.TRACE_TOKENS:]
        buf = io.BytesIO()
        np.savez_compressed(buf, ids=ids, n_expert=np.int64(trace.n_expert))
        with self._locked(fingerprint) as path:
            target = path.with_suffix(".trace.npz")
            atomic_write(target, buf.getvalue())
        return target

    def load_trace(self, fingerprint: str, n_layer: int, n_expert: int):
        """The model's newest stored routing trace (replay.Trace), or None when there is none
        or it does not fit the model (a warning says so)."""
        from hybrid_gguf.routing.replay import load_trace

        path = self.trace_path_for(fingerprint)
        if not path.exists():
            return None
        try:
            return load_trace(path, n_layer=n_layer, n_expert=n_expert)
        except HybridError as exc:
            warnings.warn(f"stored routing trace {path} not used: {exc}")
            return None

    def merge_session(self, delta: RoutingProfile, decay: float = 1.0) -> RoutingProfile:
        """stored * decay + delta, written back atomically under the lock; returns it."""
        with self._locked(delta.fingerprint) as path:
            # we hold the lock, so any temp file for this profile is a dead writer's
            for stale in path.parent.glob(tmp_prefix(path) + "*"):
                stale.unlink(missing_ok=True)
            current = self._read(path, delta.fingerprint)
            if current is None:
                current = RoutingProfile.empty(delta.fingerprint, delta.arch, delta.n_layer,
                                               delta.n_expert, delta.n_expert_used)
            merged = current.merged(delta, decay=decay)
            merged.save(path)
            return merged
