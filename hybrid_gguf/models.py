"""Resolve a MODEL argument: a path, a bundled alias, or a public model listed in models.yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from hybrid_gguf.errors import HybridError
from hybrid_gguf.readfile import read_bounded_text

# a list of aliases: a few KB
MAX_MODELS_YAML_BYTES = 1 << 20
_MODEL_TEXT_KEYS = ("file", "synthetic", "fallback_synthetic", "path", "repo")
PACKAGE_DIR = Path(__file__).resolve().parent
# bundled `file:` entries are relative to the directory that holds the package (the
# checkout, or site-packages for an installed wheel)
REPO_ROOT = PACKAGE_DIR.parent


def models_yaml_path() -> Path:
    """$HYBRID_GGUF_MODELS_YAML, else the models.yaml shipped in the package (in a checkout
    hybrid_gguf/data/models.yaml is a symlink to the top-level models.yaml)."""
    env = os.environ.get("HYBRID_GGUF_MODELS_YAML")
    if env:
        return Path(env).expanduser()
    from hybrid_gguf.paths import package_file

    return package_file("data", "models.yaml")


def load_models_yaml() -> dict:
    path = models_yaml_path()
    if not path.exists():
        # without it every alias, the default model included, would be "unknown"
        where = "HYBRID_GGUF_MODELS_YAML names" if os.environ.get("HYBRID_GGUF_MODELS_YAML") else \
            "this hybrid-gguf installation lacks"
        raise HybridError(f"{where} a models.yaml that does not exist: {path}")
    try:
        data = yaml.safe_load(read_bounded_text(path, "models file", MAX_MODELS_YAML_BYTES)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise HybridError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise HybridError(f"{path} is nested too deeply to be a models file") from None
    if not isinstance(data, dict):
        raise HybridError(f"{path}: a models file is a mapping with `bundled` and `public` tables")
    for section in ("bundled", "public"):
        table = data.get(section) or {}
        if not isinstance(table, dict):
            raise HybridError(f"{path}: `{section}` must map model names to their entries")
        for name, entry in table.items():
            if not isinstance(name, str) or not isinstance(entry, dict) or not all(
                    isinstance(v, str) for k, v in entry.items() if k in _MODEL_TEXT_KEYS):
                raise HybridError(f"{path}: `{section}` entry {str(name)[:60]!r} must be a mapping whose "
                                  f"{', '.join(_MODEL_TEXT_KEYS)} are text")
        data[section] = table
    if not isinstance(data.get("default", ""), (str, type(None))):
        raise HybridError(f"{path}: `default` must be a model name")
    return data


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    source: str  # "path", "bundled", "synthetic" or "hf-cache"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (huggingface_hub's own order; $XDG_CACHE_HOME moves the last)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hf_name(model: str) -> Optional[tuple[str, str]]:
    """"org/repo:file.gguf" -> ("org/repo", "file.gguf"); None for anything else."""
    repo, sep, file = model.partition(":")
    if not sep or not file or repo.count("/") != 1 or not all(repo.split("/")):
        return None
    if Path(model).expanduser().exists():
        return None  # an existing file whose name happens to hold a colon
    return repo, file


def resolve_hf_cache(repo: str, file: str, cache: Optional[Path] = None) -> Path:
    """`file` of `repo` in the local hub cache (models--org--repo/snapshots/<rev>/file): the
    snapshot refs/main names if it holds the file, else the newest that does. Nothing is
    downloaded; a miss is a HybridError that says where it looked."""
    cache = hf_hub_cache() if cache is None else cache
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshots = root / "snapshots"
    candidates: list[Path] = []
    ref = root / "refs" / "main"
    if ref.is_file():
        try:  # a commit hash; anything else (or unreadable) is no ref
            rev = read_bounded_text(ref, "Hugging Face ref", 4096).strip()
        except HybridError:
            rev = ""
        if rev and "/" not in rev and len(rev) <= 255 and rev not in (".", ".."):
            candidates.append(snapshots / rev)
    if snapshots.is_dir():
        others = [d for d in snapshots.iterdir() if d.is_dir() and d not in candidates]
        candidates += sorted(others, key=lambda d: d.stat().st_mtime, reverse=True)
    for snap in candidates:
        path = snap / file
        if path.is_file():
            return path
    where = f"{snapshots}/*/{file}"
    if not root.exists():
        why = f"{repo} is not in the Hugging Face cache {cache}"
    elif not candidates:
        why = f"{root} has no snapshots"
    else:
        why = f"no snapshot of {repo} holds {file}"
    raise HybridError(f"{why} (looked for {where}; set HF_HUB_CACHE or HF_HOME to look elsewhere); "
                      "hybrid-gguf downloads nothing: fetch it with `huggingface-cli download "
                      f"{repo} {file}` first")


def _bundled(name: str, entry: dict) -> ResolvedModel:
    if "file" in entry:
        path = REPO_ROOT / entry["file"]
        if path.exists():
            return ResolvedModel(path, name, "bundled")
        if "fallback_synthetic" not in entry:
            raise HybridError(f"bundled model {name!r} is missing its file {path}")
    preset_name = entry.get("synthetic") or entry.get("fallback_synthetic")
    from hybrid_gguf.synth import ensure_synthetic, preset

    return ResolvedModel(ensure_synthetic(preset(preset_name)), name, "synthetic")


def resolve_model(model: Optional[str]) -> ResolvedModel:
    """A path to an existing GGUF file, a file in the Hugging Face cache (`org/repo:file.gguf`),
    or an alias from models.yaml (None: the default)."""
    data = load_models_yaml()
    if model is None:
        model = data.get("default") or "synth-tiny"
        if model in data["bundled"] and "file" in data["bundled"][model]:
            if not (REPO_ROOT / data["bundled"][model]["file"]).exists():
                model = "synth-small"  # the trained default is not built yet
    hf = _hf_name(model)
    if hf is not None:
        path = resolve_hf_cache(*hf)
        return ResolvedModel(path, f"{hf[0]}:{hf[1]}", "hf-cache")
    candidate = Path(model).expanduser()
    if candidate.exists() or os.sep in model or model.endswith(".gguf"):
        if not candidate.exists():
            raise HybridError(f"model file not found: {candidate}")
        if candidate.is_dir():
            raise HybridError(f"{candidate} is a directory; pass a .gguf file")
        return ResolvedModel(candidate, candidate.name, "path")
    if model in data["bundled"]:
        return _bundled(model, data["bundled"][model])
    if model in data["public"]:
        entry = data["public"][model]
        if entry.get("path") and Path(entry["path"]).expanduser().exists():
            return ResolvedModel(Path(entry["path"]).expanduser(), model, "path")
        if entry.get("repo") and entry.get("file"):
            try:
                return ResolvedModel(resolve_hf_cache(entry["repo"], entry["file"]), model, "hf-cache")
            except HybridError:
                pass  # not downloaded: say so below
        raise HybridError(
            f"{model} is a public model ({entry.get('repo')}, file {entry.get('file')}); "
            f"not in the Hugging Face cache {hf_hub_cache()} either; "
            "hybrid-gguf downloads nothing: fetch the file and pass its path, "
            f"or set `path:` for it in a copy of {models_yaml_path()} named by HYBRID_GGUF_MODELS_YAML"
        )
    known = ", ".join(sorted(list(data["bundled"]) + list(data["public"])))
    raise HybridError(f"no model file or alias named {model!r} (aliases: {known})")
