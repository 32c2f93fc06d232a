"""A placement plan: what lives where for one model, budget and context, and what that is
predicted to buy. Stored as YAML that people can read and edit; every load re-validates it
and points at the offending line.

Two things are authoritative: `placement` (whole-tensor regex rules, first match wins, as
llama.cpp applies them) and `hot` (layer -> expert ids copied into that layer's GPU hot
pack, slot order = list order). Everything under `predicted` and `profile` is a record of
how the plan was made.

In memory a Plan holds typed values (MemoryOptions, the calibration as a Bandwidth); they
become YAML/JSON only in to_dict and are typed again when a file is parsed.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from hybrid_gguf.atomic import atomic_write
from hybrid_gguf.errors import HybridError
from hybrid_gguf.readfile import read_bounded_text
from hybrid_gguf.planning.placement import (PACK_AUTO, CacheOptions, PlacementRule, TensorPlacement, plan_text,
                                            validate_rules)
from hybrid_gguf.planning.memory import CACHE_TYPES, MemoryOptions
from hybrid_gguf.planning.calibration import Bandwidth
from hybrid_gguf.sizes import format_size

PLAN_FORMAT = "hybrid-gguf-plan"
PLAN_VERSION = 1
BACKENDS = ("per-expert", "whole-tensor", "cpu")
_CACHE_TYPES = tuple(CACHE_TYPES)
# MemoryOptions fields a plan file records (n_ctx is the plan's own; use_mmap and
# compute_factor do not change what a plan predicts once compute_bytes is known)
_MEMORY_FIELDS = ("n_ubatch", "type_k", "type_v", "flash_attn", "op_offload", "compute_bytes", "margin_bytes",
                  "margin_fraction")
# the speed model's terms, written next to the calibration under predicted.bandwidth
_SPEED_TERMS = ("decode_ms", "prefill_ms", "decode_handoffs")

# A plan is read whole and checked before it is composed. The largest real hot set
# (61 layers x 384 experts, every one listed) is ~120 KB of YAML, so these leave ample room
# while a hostile file (an alias bomb, /dev/zero, a million ids, 10,000 nested lists) is
# refused in well under a second.
MAX_PLAN_BYTES = 1 << 20
MAX_PLAN_DEPTH = 32
MAX_PLAN_VALUES = 200_000
MAX_UBATCH = 65536


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DeviceBudget:
    name: str  # llama.cpp device name ("CUDA0"), or "GPU" for the first GPU
    budget_bytes: int
    free_bytes: Optional[int] = None  # what the device reported free when planning

    def to_dict(self) -> dict:
        d = {"name": self.name, "budget_bytes": int(self.budget_bytes)}
        if self.free_bytes is not None:
            d["free_bytes"] = int(self.free_bytes)
        return d


@dataclass
class Predicted:
    hit_rate: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    gpu_bytes: int = 0
    memory: dict = field(default_factory=dict)  # device -> {weights, hot_pack, kv, ...}
    bandwidth: Optional[Bandwidth] = None  # the calibration the speeds rest on
    speed_terms: dict = field(default_factory=dict)  # decode_ms, prefill_ms, decode_handoffs

    def to_dict(self) -> dict:
        bandwidth = self.bandwidth.to_dict() if self.bandwidth is not None else {}
        return {"hit_rate": round(float(self.hit_rate), 6),
                "decode_tokens_per_s": round(float(self.decode_tokens_per_s), 3),
                "prefill_tokens_per_s": round(float(self.prefill_tokens_per_s), 3),
                "gpu_bytes": int(self.gpu_bytes), "memory": self.memory,
                "bandwidth": {**bandwidth, **self.speed_terms}}


@dataclass
class ProfileSource:
    sessions: int = 0
    tokens: int = 0  # routed tokens per layer (mean over MoE layers)
    updated: str = ""
    labels: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sessions": int(self.sessions), "tokens": int(self.tokens),
                "updated": self.updated, "labels": dict(self.labels)}


@dataclass
class Plan:
    fingerprint: str
    model_path: str
    model_name: str
    arch: str
    n_layer: int
    n_expert: int
    budget_bytes: int
    n_ctx: int
    devices: list = field(default_factory=list)  # [DeviceBudget]
    backend: str = "per-expert"
    n_gpu_layers: int = -1
    tensor_split: Optional[list] = None
    rules: list = field(default_factory=list)  # [PlacementRule]
    hot: dict = field(default_factory=dict)  # layer -> [expert ids]
    # where the packs live: a device name, None/"GPU" (the first GPU), or "auto" (PACK_AUTO:
    # each layer's pack on the GPU of its layer, the plans for several GPUs)
    hot_device: Optional[str] = None
    # the pack's GPU also computes the cold experts, reading them from pinned host memory
    # (patch v4) instead of handing each split layer to the CPU; YAML `cold: gpu`
    cold_on_gpu: bool = False
    # with cold experts on the CPU: each split layer's decode hand-off goes to the CPU worker
    # (patch v8) instead of cutting the graph there; YAML `handoff: worker` (else `scheduler`)
    worker: bool = False
    # the in-session cache the runs of this plan use by default (`run --cache` overrides);
    # YAML `cache: {policy: lru, quota: 4, pinned: 0.5}`
    cache: CacheOptions = field(default_factory=CacheOptions)
    memory: Optional[MemoryOptions] = None  # what the memory prediction assumed; None: the defaults
    predicted: Predicted = field(default_factory=Predicted)
    profile: Optional[ProfileSource] = None
    notes: list = field(default_factory=list)
    created: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = MemoryOptions(self.n_ctx)
        elif self.memory.n_ctx != self.n_ctx:
            self.memory = replace(self.memory, n_ctx=self.n_ctx)

    # -- what llama.cpp gets -------------------------------------------------------------

    def placement(self) -> TensorPlacement:
        desc = f"plan: {sum(len(v) for v in self.hot.values())} hot experts, {len(self.rules)} rules"
        return TensorPlacement(tuple(self.rules), desc, n_gpu_layers=self.n_gpu_layers)

    def llama_kwargs(self) -> dict:
        """llama_cpp.Llama keyword arguments the plan was made for (context and KV cache);
        pass them with the placement so the memory prediction holds."""
        from hybrid_gguf.planning.memory import batch_kwargs, cache_kwargs

        m = self.memory
        kw = {"n_ctx": int(self.n_ctx), "n_gpu_layers": int(self.n_gpu_layers),
              **batch_kwargs(m.n_ubatch, m.flash_attn), **cache_kwargs(m.type_k, m.type_v)}
        if not m.op_offload:
            kw["op_offload"] = False
        if self.tensor_split:
            kw["tensor_split"] = [float(x) for x in self.tensor_split]
        return kw

    def hybrid_plan_text(self) -> str:
        """The hot packs as the patched llama.cpp's plan text ("" when there are none)."""
        if not any(self.hot.values()):
            return ""
        return plan_text(self.hot, self.hot_device, cold_on_gpu=self.cold_on_gpu, worker=self.worker)

    # -- devices ---------------------------------------------------------------------------

    def device_names(self) -> list:
        return [d.name for d in self.devices] or ["GPU"]

    def layer_devices(self) -> list:
        """The device of each layer (index n_layer: the output layer) under the plan's layer
        split, as llama.cpp splits layers over the GPUs."""
        from hybrid_gguf.planning.memory import CPU, layer_devices

        if self.n_gpu_layers == 0:
            return [CPU] * (self.n_layer + 1)
        return layer_devices(self.n_layer, self.device_names(), self.tensor_split)

    def pack_devices(self) -> dict:
        """{layer: the device of its hot pack}."""
        ldev = self.layer_devices() if self.hot_device == PACK_AUTO else None
        named = self.hot_device if self.hot_device and self.hot_device.upper() != "GPU" else None
        default = named or self.device_names()[0]
        return {int(l): ldev[int(l)] if ldev else default for l, v in self.hot.items() if v}

    def per_device(self, inv=None) -> list:
        """Per planned GPU: its budget, predicted bytes, layers, hot experts and (with the
        inventory) the layers whose experts are all in its memory."""
        from hybrid_gguf.planning.memory import is_host

        ldev = self.layer_devices()
        packs = self.pack_devices()
        whole: dict = {}
        if inv is not None and self.n_gpu_layers != 0:
            placement = self.placement()
            for l in self.whole_layers(inv):
                target = placement.target_for(inv.layers[l].expert_tensors[0])
                if target is None:
                    whole[l] = ldev[l]
                elif not is_host(target):
                    whole[l] = self.device_names()[0] if target.upper() == "GPU" else target
        out = []
        for name in self.device_names():
            budget = next((d.budget_bytes for d in self.devices if d.name == name), self.budget_bytes)
            hot = {l: list(self.hot[l]) for l in sorted(packs) if packs[l] == name}
            out.append({"name": name, "budget_bytes": int(budget),
                        "bytes": int((self.predicted.memory.get(name) or {}).get("total", 0)),
                        "layers": [l for l in range(self.n_layer) if ldev[l] == name],
                        "hot_experts": sum(len(v) for v in hot.values()),
                        "hot": {str(l): v for l, v in hot.items()},
                        **({"whole_layers": sorted(l for l, d in whole.items() if d == name)} if inv is not None else {})})
        return out

    def check_devices(self, here) -> None:
        """Refuse to run where the plan's GPUs are not: `here` is [(name, total bytes)] of this
        machine's GPUs. A plan for the stand-in "GPU" runs on the first GPU of any machine."""
        names = [d.name for d in self.devices]
        if self.n_gpu_layers == 0 or not names or names == ["GPU"] or not here:
            return
        have = {str(n).upper(): total for n, total in here}
        missing = [n for n in names if n.upper() not in have]
        small = [d for d in self.devices if have.get(d.name.upper()) and d.budget_bytes > have[d.name.upper()]]
        if missing or small:
            why = (f"{', '.join(missing)} not found" if missing else
                   "; ".join(f"{d.name} has {format_size(have[d.name.upper()])} in all, the plan gives it "
                             f"{format_size(d.budget_bytes)}" for d in small))
            planned = ", ".join(f"{d.name} {format_size(d.budget_bytes)}" for d in self.devices)
            found = ", ".join(f"{n} ({format_size(t)})" for n, t in here)
            raise HybridError(f"the plan is for other GPUs ({planned}); this machine has {found}: {why}; "
                              "re-plan here with `hybrid-gguf plan MODEL --gpu-budget SIZE`")

    def tensor_split_here(self, here: list) -> Optional[list]:
        """llama.cpp's tensor_split for this machine's GPUs (names, registry order): the plan's
        layer split, 0 for the GPUs the plan does not use; None on a machine with one GPU."""
        if len(here) <= 1:
            return [float(x) for x in self.tensor_split] if self.tensor_split else None
        names = self.device_names()
        if names == ["GPU"]:
            names = [here[0]]
        shares = self.tensor_split or [1.0] * len(names)
        by_name = {n.upper(): float(x) for n, x in zip(names, shares)}
        return [by_name.get(str(h).upper(), 0.0) for h in here]

    def gpu_experts(self, inv) -> dict:
        """{layer: expert ids in GPU memory}: hot packs plus layers whose expert tensors
        the rules leave on (or send to) a GPU."""
        from hybrid_gguf.planning.memory import is_host

        out = {int(l): list(v) for l, v in self.hot.items() if v}
        if self.n_gpu_layers == 0:
            return out
        placement = self.placement()
        for layer in inv.layers:
            if not layer.is_moe:
                continue
            targets = [placement.target_for(n) for n in layer.expert_tensors]
            if all(t is None or not is_host(t) for t in targets):
                out[layer.index] = list(range(layer.n_expert))
        return out

    def whole_layers(self, inv) -> list:
        return sorted(l for l, es in self.gpu_experts(inv).items()
                      if len(es) == inv.layers[l].n_expert and l not in {int(k) for k, v in self.hot.items() if v})

    def check_model(self, inv) -> None:
        """Refuse a plan made for another model; check every layer/expert exists."""
        if self.fingerprint != inv.fingerprint:
            raise HybridError(
                f"plan was made for another model (fingerprint {self.fingerprint[:16]}…, "
                f"{self.model_name or self.model_path}); this model is {inv.fingerprint[:16]}… — "
                "re-plan with `hybrid-gguf plan`")
        for layer, experts in self.hot.items():
            if not 0 <= layer < inv.n_layer:
                raise HybridError(f"plan hot set names layer {layer}; the model has layers 0..{inv.n_layer - 1}")
            info = inv.layers[layer]
            if not info.is_moe and experts:
                raise HybridError(f"plan hot set names layer {layer}, which has no routed experts")
            for e in experts:
                if not 0 <= e < info.n_expert:
                    raise HybridError(f"plan hot set names expert {e} in layer {layer}, "
                                      f"which has experts 0..{info.n_expert - 1}")

    # -- YAML ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _plain({
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"name": self.model_name, "path": self.model_path, "fingerprint": self.fingerprint,
                      "arch": self.arch, "n_layer": int(self.n_layer), "n_expert": int(self.n_expert)},
            "created": self.created,
            "budget_bytes": int(self.budget_bytes),
            "devices": [d.to_dict() for d in self.devices],
            "n_ctx": int(self.n_ctx),
            "memory": {k: getattr(self.memory, k) for k in _MEMORY_FIELDS},
            "backend": self.backend,
            "placement": {"n_gpu_layers": int(self.n_gpu_layers), "tensor_split": self.tensor_split,
                          "rules": [{"pattern": r.pattern, "device": r.device} for r in self.rules]},
            "hot_device": self.hot_device,
            "cold": "gpu" if self.cold_on_gpu else "cpu",
            "handoff": "worker" if self.worker else "scheduler",
            "cache": {"policy": self.cache.policy, "quota": int(self.cache.quota), "pinned": float(self.cache.pinned)},
            "hot": {int(l): [int(e) for e in v] for l, v in sorted(self.hot.items())},
            "predicted": self.predicted.to_dict(),
            "profile": self.profile.to_dict() if self.profile else None,
            "notes": [str(n) for n in self.notes],
        })

    def to_json_dict(self) -> dict:
        d = self.to_dict()
        d["created"] = str(d["created"])
        d["hot"] = {str(l): v for l, v in d["hot"].items()}
        d["predicted_hit_rate"] = d["predicted"]["hit_rate"]
        d["predicted_decode_tokens_per_s"] = d["predicted"]["decode_tokens_per_s"]
        d["predicted_prefill_tokens_per_s"] = d["predicted"]["prefill_tokens_per_s"]
        d["gpu_bytes"] = d["predicted"]["gpu_bytes"]
        d["predicted_cache"] = self.predicted_cache()
        return d

    def predicted_cache(self) -> Optional[dict]:
        """The replay's row for this plan's in-session cache (policy, quota, hit_rate,
        uploads_per_token, upload_bytes_per_token, predicted_decode_tokens_per_s), where the
        planner chose it by replay (`plan --cache auto`); else None."""
        if not self.cache.active:
            return None
        rows = (self.predicted.speed_terms or {}).get("cache_replay") or {}
        return rows.get(f"{self.cache.policy} q{int(self.cache.quota)}")

    def to_yaml(self) -> str:
        import yaml

        d = self.to_dict()
        d["devices"] = [_Flow(x) for x in d["devices"]]
        d["placement"]["rules"] = [_Flow(x) for x in d["placement"]["rules"]]
        d["cache"] = _Flow(d["cache"])
        bwd = d["predicted"].get("bandwidth") or {}
        for key in ("decode_ms", "prefill_ms", "decode_handoffs"):
            if isinstance(bwd.get(key), dict):
                bwd[key] = _Flow(bwd[key])
        for dev, mem in (d["predicted"].get("memory") or {}).items():
            if isinstance(mem, dict) and isinstance(mem.get("weights"), dict):
                mem["weights"] = _Flow(mem["weights"])
        body = yaml.dump(d, Dumper=_dumper(), sort_keys=False, width=100, allow_unicode=True)
        lines = []
        for line in body.splitlines():
            m = re.match(r"^(\s*)(budget_bytes|gpu_bytes): (\d+)$", line)
            if m:
                line += f"  # {format_size(int(m.group(3)))}"
            lines.append(line)
        header = [
            "# hybrid-gguf placement plan. Edit `hot` (layer: [expert ids], slot order) or the",
            "# placement rules (regex -> device, first match wins) by hand; every load checks the",
            "# model fingerprint and that each layer/expert exists. `predicted` is informational.",
        ]
        return "\n".join(header + lines) + "\n"

    @classmethod
    def from_yaml(cls, text: str, inventory=None, source: str = "<plan>") -> "Plan":
        return _parse(text, source, inventory)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_yaml().encode())  # two sessions may save the same plan
        return path

    @classmethod
    def load(cls, path, inventory=None) -> "Plan":
        path = Path(path)
        return _parse(read_plan_text(path), str(path), inventory)


def read_plan_text(path: Path) -> str:
    """The text of a plan file: a regular file of at most MAX_PLAN_BYTES, UTF-8."""
    return read_bounded_text(path, "plan file", MAX_PLAN_BYTES, "; a plan is a few KB")


class _Flow(dict):
    """A mapping written on one line."""


def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def seq(dumper, data):
        flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, seq)
    Dumper.add_representer(_Flow, lambda d, x: d.represent_mapping("tag:yaml.org,2002:map", dict(x),
                                                                   flow_style=True))
    Dumper.add_representer(dict, lambda d, x: d.represent_mapping("tag:yaml.org,2002:map", x,
                                                                  flow_style=False))
    return Dumper


def _plain(x):
    """Plain Python containers and numbers (numpy scalars would not serialize)."""
    if isinstance(x, dict):
        return {(_plain(k) if not isinstance(k, str) else k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


# --- parsing with line numbers ---------------------------------------------------------------


class _N:
    """A YAML node with its path, for errors that point at the line."""

    def __init__(self, node, path: str, source: str) -> None:
        self.node, self.path, self.source = node, path, source

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def error(self, msg: str) -> HybridError:
        return HybridError(f"{self.source}:{self.line}: {self.path}: {msg}")

    def value(self) -> Any:
        import yaml

        try:
            return _constructor().construct_document(self.node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or self.node.start_mark
            _constructor().__init__()  # drop the half-built state
            raise HybridError(f"{self.source}:{mark.line + 1}: {self.path or 'plan'}: "
                              f"{getattr(exc, 'problem', None) or exc}") from None

    def mapping(self, allowed: Optional[tuple] = None, required: tuple = ()) -> dict:
        import yaml

        if not isinstance(self.node, yaml.MappingNode):
            raise self.error("expected a mapping (key: value lines)")
        out: dict = {}
        for k, v in self.node.value:
            key = _N(k, self.path, self.source).value()
            try:
                hash(key)
            except TypeError:
                raise _N(k, self.path, self.source).error(
                    f"a key must be text or a number, not a {type(key).__name__}") from None
            child = _N(v, f"{self.path}.{key}" if self.path else str(key), self.source)
            if key in out:
                raise _N(k, child.path, self.source).error("listed twice")
            if allowed is not None and key not in allowed:
                raise _N(k, child.path, self.source).error(
                    f"unknown key {key!r} (known: {', '.join(allowed)})")
            out[key] = child
        for key in required:
            if key not in out:
                raise self.error(f"missing key {key!r}")
        return out

    def seq(self) -> list:
        import yaml

        if isinstance(self.node, yaml.ScalarNode) and self.value() is None:
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error("expected a list")
        return [_N(v, f"{self.path}[{i}]", self.source) for i, v in enumerate(self.node.value)]

    def int(self, minimum: Optional[int] = 0, allow_none: bool = False,
            maximum: Optional[int] = None) -> Optional[int]:
        v = self.value()
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected a whole number, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.error(f"must be >= {minimum}, got {v}" if minimum else f"must not be negative, got {v}")
        if maximum is not None and v > maximum:
            raise self.error(f"must be at most {maximum}, got {v}")
        return v

    def num(self, minimum: float = 0.0, maximum: Optional[float] = None) -> float:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(f"expected a number, got {v!r}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise self.error(f"expected a finite number, got {v!r}" if len(repr(v)) <= 40 else
                             "expected a finite number, got one too large")
        if f < minimum:
            raise self.error(f"must be >= {minimum:g}, got {f:g}" if minimum else f"must not be negative, got {f:g}")
        if maximum is not None and f > maximum:
            raise self.error(f"must be at most {maximum:g}, got {f:g}")
        return f

    def str(self, allow_none: bool = False) -> Optional[str]:
        v = self.value()
        if v is None and allow_none:
            return None
        if not isinstance(v, str):
            raise self.error(f"expected text, got {v!r}")
        return v

    def bool(self) -> bool:
        v = self.value()
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {v!r}")
        return v


_TOP = ("format", "version", "model", "created", "budget_bytes", "devices", "n_ctx", "memory", "backend",
        "placement", "hot_device", "cold", "handoff", "cache", "hot", "predicted", "profile", "notes")
_MEMORY = ("n_ubatch", "type_k", "type_v", "flash_attn", "op_offload", "compute_bytes",
           "compute_measured", "margin_bytes", "margin_fraction")


_local = threading.local()


def _constructor():
    """One SafeConstructor per thread, reused for every value (building a loader per
    value made a plan with many expert ids take seconds)."""
    import yaml

    c = getattr(_local, "constructor", None)
    if c is None:
        c = _local.constructor = yaml.constructor.SafeConstructor()
    return c


def _loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str, source: str) -> None:
    """Walk the YAML event stream (no nodes built yet) and refuse what a plan never needs:
    aliases and anchors (an alias bomb grows to gigabytes), tags (unknown types), deep
    nesting (the composer recurses) and more values than any real plan has."""
    import yaml

    def where(event) -> str:
        mark = getattr(event, "start_mark", None)
        return f"{source}:{mark.line + 1}" if mark is not None else source

    depth = values = 0
    for event in yaml.parse(text, Loader=_loader()):
        if isinstance(event, yaml.AliasEvent):
            raise HybridError(f"{where(event)}: YAML aliases and anchors (*{event.anchor}) are not allowed "
                              "in a plan")
        if isinstance(event, yaml.NodeEvent):
            if event.anchor is not None:
                raise HybridError(f"{where(event)}: YAML anchors and aliases (&{event.anchor}) are not "
                                  "allowed in a plan")
            values += 1
            if values > MAX_PLAN_VALUES:
                raise HybridError(f"{where(event)}: the plan has more than {MAX_PLAN_VALUES} values")
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)) and event.tag is not None:
            raise HybridError(f"{where(event)}: YAML tags ({event.tag}) are not allowed in a plan")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_PLAN_DEPTH:
                raise HybridError(f"{where(event)}: nested more than {MAX_PLAN_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1



def _predicted_memory(node) -> dict:
    """The prediction's bytes per device: {device: {field: bytes or {part: bytes}, "device": name}}."""
    import yaml

    out = {}
    for dev, entry in node.mapping().items() if node.value() is not None else ():
        fields_ = {}
        for key, v in entry.mapping().items():
            if isinstance(v.node, yaml.MappingNode):
                fields_[key] = {k: part.int(0) for k, part in v.mapping().items()}
            elif key == "device":
                fields_[key] = v.str()
            else:
                fields_[key] = v.int(0)
        out[str(dev)] = fields_
    return out


def _cache(node) -> CacheOptions:
    m = node.mapping(("policy", "quota", "pinned"))
    try:
        return CacheOptions(policy=m["policy"].str() if "policy" in m else "static",
                            quota=m["quota"].int(0, maximum=4096) if "quota" in m else CacheOptions.quota,
                            pinned=m["pinned"].num(maximum=1.0) if "pinned" in m else 0.5)
    except HybridError as exc:
        raise node.error(str(exc)) from None


def _cold_on_gpu(node) -> bool:
    """`cold: cpu` (the CPU computes the experts left in host memory) or `cold: gpu` (the
    packs' GPU reads them there)."""
    value = node.str()
    if value not in ("cpu", "gpu"):
        raise node.error(f"cold must be cpu or gpu, got {value!r}")
    return value == "gpu"


def _worker(node) -> bool:
    """`handoff: scheduler` (the graph is cut at each split layer) or `handoff: worker` (the
    CPU worker answers the GPU's posts)."""
    value = node.str()
    if value not in ("scheduler", "worker"):
        raise node.error(f"handoff must be scheduler or worker, got {value!r}")
    return value == "worker"

def _parse(text: str, source: str, inv) -> Plan:
    import yaml

    if len(text) > MAX_PLAN_BYTES:
        raise HybridError(f"{source}: the plan is larger than {MAX_PLAN_BYTES >> 20} MiB; a plan is a few KB")
    try:
        _check_events(text, source)
        root = yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise HybridError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        raise HybridError(f"{source}: the plan file is empty")
    top = _N(root, "", source).mapping(_TOP, ("format", "model", "n_ctx", "budget_bytes", "hot"))
    if top["format"].value() != PLAN_FORMAT:
        raise top["format"].error(f"not a hybrid-gguf plan (expected format: {PLAN_FORMAT})")
    if "version" in top and top["version"].value() != PLAN_VERSION:
        raise top["version"].error(f"unsupported plan version {top['version'].value()!r}")

    model = top["model"].mapping(("name", "path", "fingerprint", "arch", "n_layer", "n_expert"),
                                 ("fingerprint",))
    fingerprint = model["fingerprint"].str()
    if inv is not None and fingerprint != inv.fingerprint:
        raise model["fingerprint"].error(
            f"plan was made for another model (fingerprint {fingerprint[:16]}…); this model is "
            f"{inv.fingerprint[:16]}… — refusing to apply it; re-plan with `hybrid-gguf plan`")
    n_layer = model["n_layer"].int(1) if "n_layer" in model else (inv.n_layer if inv else 0)
    n_expert = model["n_expert"].int(0) if "n_expert" in model else (inv.n_expert if inv else 0)
    if inv is not None:
        n_layer, n_expert = inv.n_layer, inv.n_expert

    devices = []
    for d in top["devices"].seq() if "devices" in top else []:
        m = d.mapping(("name", "budget_bytes", "free_bytes"), ("name", "budget_bytes"))
        devices.append(DeviceBudget(m["name"].str(), m["budget_bytes"].int(0),
                                    m["free_bytes"].int(0, allow_none=True) if "free_bytes" in m else None))
    if len({d.name for d in devices}) != len(devices):
        raise top["devices"].error("a device is listed twice")

    memory, mem = {}, {}
    if "memory" in top and top["memory"].value() is not None:
        mem = top["memory"].mapping(_MEMORY)
        for key, node in mem.items():
            if key in ("n_ubatch",):
                memory[key] = node.int(1, maximum=MAX_UBATCH)
            elif key in ("compute_bytes", "margin_bytes"):
                memory[key] = node.int(0, allow_none=True)
            elif key == "margin_fraction":
                memory[key] = node.num(maximum=1.0)
            elif key in ("flash_attn", "op_offload", "compute_measured"):
                memory[key] = node.bool()
            else:
                v = node.str().lower()
                if v not in _CACHE_TYPES:
                    raise node.error(f"unknown KV cache type {v!r} (known: {', '.join(_CACHE_TYPES)})")
                memory[key] = v
    n_ctx = top["n_ctx"].int(1, maximum=2**31 - 1)
    try:
        # compute_measured: written by earlier versions, implied by compute_bytes
        memory_options = MemoryOptions(n_ctx, **{k: v for k, v in memory.items()
                                                 if k in _MEMORY_FIELDS and v is not None})
    except HybridError as exc:
        # each field is checked above; what is left is a quantized V cache without flash attention
        raise mem.get("type_v", top.get("memory", top["n_ctx"])).error(str(exc)) from None

    backend = top["backend"].str() if "backend" in top else "per-expert"
    if backend not in BACKENDS:
        raise top["backend"].error(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")

    n_gpu_layers, tensor_split, rules = -1, None, []
    if "placement" in top:
        pl = top["placement"].mapping(("n_gpu_layers", "tensor_split", "rules"))
        if "n_gpu_layers" in pl:
            n_gpu_layers = pl["n_gpu_layers"].int(-1)
        if "tensor_split" in pl and pl["tensor_split"].value() is not None:
            tensor_split = [n.num() for n in pl["tensor_split"].seq()]
            if devices and len(tensor_split) != len(devices):
                raise pl["tensor_split"].error(f"has {len(tensor_split)} shares for {len(devices)} devices")
        for r in pl["rules"].seq() if "rules" in pl else []:
            m = r.mapping(("pattern", "device"), ("pattern", "device"))
            rule = PlacementRule(m["pattern"].str(), m["device"].str())
            try:
                validate_rules([rule])
            except HybridError as exc:
                raise r.error(str(exc)) from None
            rules.append(rule)

    hot: dict = {}
    hot_node = top["hot"]
    if hot_node.value() is not None:
        for key, node in hot_node.mapping().items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise node.error(f"layer must be a whole number, got {key!r}")
            if key < 0 or (n_layer and key >= n_layer):
                raise node.error(f"layer {key} does not exist (the model has layers 0..{n_layer - 1})")
            layer_experts = inv.layers[key].n_expert if inv is not None else n_expert
            if inv is not None and not inv.layers[key].is_moe:
                raise node.error(f"layer {key} has no routed experts")
            items = node.seq()
            if layer_experts and len(items) > layer_experts:
                raise node.error(f"lists {len(items)} expert ids, but layer {key} has {layer_experts} experts")
            seen: set = set()
            ids = []
            for item in items:
                e = item.int(None)
                if e < 0:
                    raise item.error(f"expert ids must not be negative, got {e}")
                if layer_experts and e >= layer_experts:
                    raise item.error(f"expert {e} does not exist (layer {key} has experts 0..{layer_experts - 1})")
                if e in seen:
                    raise item.error(f"expert {e} is listed twice in layer {key}")
                seen.add(e)
                ids.append(e)
            hot[key] = ids

    predicted = Predicted()
    if "predicted" in top and top["predicted"].value() is not None:
        pr = top["predicted"].mapping()
        predicted = Predicted(
            hit_rate=pr["hit_rate"].num(maximum=1.0) if "hit_rate" in pr else 0.0,
            decode_tokens_per_s=pr["decode_tokens_per_s"].num() if "decode_tokens_per_s" in pr else 0.0,
            prefill_tokens_per_s=pr["prefill_tokens_per_s"].num() if "prefill_tokens_per_s" in pr else 0.0,
            gpu_bytes=pr["gpu_bytes"].int(0) if "gpu_bytes" in pr else 0,
            memory=_predicted_memory(pr["memory"]) if "memory" in pr else {},
        )
        if "bandwidth" in pr and pr["bandwidth"].value():
            bw = pr["bandwidth"].value()
            if not isinstance(bw, dict):
                raise pr["bandwidth"].error("expected a mapping (key: value lines)")
            predicted.speed_terms = {k: bw[k] for k in _SPEED_TERMS if k in bw}
            known = {f.name for f in fields(Bandwidth)}
            try:
                predicted.bandwidth = Bandwidth.from_dict({k: v for k, v in bw.items() if k in known})
            except (HybridError, TypeError, ValueError) as exc:
                raise pr["bandwidth"].error(str(exc)) from None

    profile = None
    if "profile" in top and top["profile"].value() is not None:
        pm = top["profile"].mapping(("sessions", "tokens", "updated", "labels"))
        profile = ProfileSource(
            sessions=pm["sessions"].int(0) if "sessions" in pm else 0,
            tokens=pm["tokens"].int(0) if "tokens" in pm else 0,
            updated=pm["updated"].str(allow_none=True) or "" if "updated" in pm else "",
            labels={str(k): v.int(0) for k, v in pm["labels"].mapping().items()} if "labels" in pm else {},
        )

    notes = [n.str() for n in top["notes"].seq()] if "notes" in top else []
    created = top["created"].value() if "created" in top else ""
    cold_on_gpu = _cold_on_gpu(top["cold"]) if "cold" in top else False
    worker = _worker(top["handoff"]) if "handoff" in top else False
    if worker and cold_on_gpu:
        raise top["handoff"].error("handoff: worker hands cold experts to the CPU; it needs cold: cpu")
    return Plan(
        fingerprint=fingerprint,
        model_path=(model["path"].str(allow_none=True) or "") if "path" in model else "",
        model_name=(model["name"].str(allow_none=True) or "") if "name" in model else "",
        arch=(model["arch"].str(allow_none=True) or "") if "arch" in model else "",
        n_layer=n_layer, n_expert=n_expert,
        budget_bytes=top["budget_bytes"].int(0), n_ctx=n_ctx,
        devices=devices, backend=backend, n_gpu_layers=n_gpu_layers, tensor_split=tensor_split,
        rules=rules, hot=hot,
        hot_device=top["hot_device"].str(allow_none=True) if "hot_device" in top else None,
        cold_on_gpu=cold_on_gpu, worker=worker,
        cache=_cache(top["cache"]) if "cache" in top else CacheOptions(),
        memory=memory_options, predicted=predicted, profile=profile, notes=notes, created=str(created or ""),
    )
