"""Every directory and file hybrid-gguf reads or writes outside the package.

Two roots:

- the data directory holds what the user would lose work without: learned routing
  profiles (`profiles/`) and the plans `run` made from them (`plans/`).
  Default: platformdirs' user data dir (`~/.local/share/hybrid-gguf` on Linux).
- the cache directory holds what can be rebuilt: backend wheels and the llama-cpp-python
  sdist (`wheels/`, `sdist/`), synthetic and probe models (`synth/`), the compiled routing
  recorder (`native/`) and the measured bandwidth calibration (`calibration.json`).
  Default: platformdirs' user cache dir (`~/.cache/hybrid-gguf` on Linux).

Environment:

- `HYBRID_GGUF_HOME=DIR` moves the data to DIR and, unless HYBRID_GGUF_CACHE is also set,
  the cache to DIR/cache: one variable gives a self-contained installation (tests use it).
- `HYBRID_GGUF_CACHE=DIR` moves only the cache.

The package's own files (bundled models, models.yaml, the llama.cpp patch, the ggml
headers) are found next to the code; see `package_file`.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "hybrid-gguf"
HOME_ENV = "HYBRID_GGUF_HOME"
CACHE_ENV = "HYBRID_GGUF_CACHE"
PACKAGE_DIR = Path(__file__).resolve().parent


def _env_dir(name: str):
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def _platform_dir(kind: str) -> Path:
    try:
        import platformdirs
    except ImportError:
        # `python -m hybrid_gguf.backend` runs before the package's dependencies are
        # installed (make setup); the XDG defaults are what platformdirs gives on Linux
        env, default = {"data": ("XDG_DATA_HOME", "~/.local/share"),
                        "cache": ("XDG_CACHE_HOME", "~/.cache")}[kind]
        return Path(os.environ.get(env) or default).expanduser() / APP_NAME
    fn = platformdirs.user_data_dir if kind == "data" else platformdirs.user_cache_dir
    return Path(fn(APP_NAME, appauthor=False))


def data_dir() -> Path:
    home = _env_dir(HOME_ENV)
    if home is not None:
        return home
    return _platform_dir("data")


def cache_dir() -> Path:
    cache = _env_dir(CACHE_ENV)
    if cache is not None:
        return cache
    home = _env_dir(HOME_ENV)
    if home is not None:
        return home / "cache"
    return _platform_dir("cache")


# --- user data ------------------------------------------------------------------------

def profiles_dir() -> Path:
    return data_dir() / "profiles"


def plans_dir() -> Path:
    return data_dir() / "plans"


# --- cache ----------------------------------------------------------------------------

def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def sdist_dir() -> Path:
    return cache_dir() / "sdist"


def synth_dir() -> Path:
    return cache_dir() / "synth"


def native_dir() -> Path:
    return cache_dir() / "native"


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def chat_history_path() -> Path:
    """readline history of `run`'s chat: user data."""
    return data_dir() / "chat_history"


def legacy_data_dirs() -> list:
    """Where versions before the data directory kept profiles and plans (the cache root),
    when those directories still exist and are not the current ones."""
    out = []
    for name, current in (("profiles", profiles_dir()), ("plans", plans_dir())):
        old = cache_dir() / name
        if old.is_dir() and old.resolve() != current.resolve():
            out.append(old)
    return out


# --- files shipped with the package ---------------------------------------------------

def package_file(*parts: str) -> Path:
    """A file shipped inside the hybrid_gguf package (data/models.yaml, native/include/ggml.h...)."""
    return PACKAGE_DIR.joinpath(*parts)


def all_paths() -> dict:
    """{label: path} of every location hybrid-gguf uses, for `doctor`."""
    return {
        "data": data_dir(),
        "profiles": profiles_dir(),
        "plans": plans_dir(),
        "cache": cache_dir(),
        "wheels": wheels_dir(),
        "sdist": sdist_dir(),
        "synth": synth_dir(),
        "native": native_dir(),
        "calibration": calibration_path(),
    }


def tree_size(path: Path) -> int:
    """Bytes under path (a file's size, or the sum over a directory; 0 when absent)."""
    try:
        if path.is_file():
            return path.stat().st_size
        total = 0
        for root, _dirs, files in os.walk(path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total
    except OSError:
        return 0
