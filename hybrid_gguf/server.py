"""`hybrid-gguf serve`: an OpenAI-compatible HTTP server that records routing while it serves.

A small FastAPI app (run by uvicorn) in front of one HybridModel. llama-cpp-python's own
server builds its Llama from settings; this one keeps hybrid-gguf's placement and recorder.

* One model, one worker thread: every request (and every profile merge) runs on a
  single-thread executor, so requests queue and are served one at a time, and the recorder
  is never read while the model runs. Streams are produced on that thread and handed to the
  event loop chunk by chunk; a client that goes away stops its generation.
* The routing recorded while serving is merged into the profile store every `save_every`
  seconds and at shutdown. The store writes atomically, so a kill -9 loses at most the last
  interval. One server run counts as one session of the profile, however many merges.
* Errors are OpenAI-shaped JSON: a prompt longer than the context is a 400
  (`context_length_exceeded`), a full queue a 503.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

log = logging.getLogger("hybrid_gguf.server")

SERVE_LABEL = "serve"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _context_error(exc: Exception, n_ctx: int, kind: str) -> Optional[APIError]:
    """llama-cpp-python's ValueError for a prompt longer than the context, as a 400."""
    text = str(exc)
    if "exceed context window" in text:
        return APIError(400, f"{text}: the prompt does not fit the model's context of {n_ctx} tokens; "
                             "send a shorter prompt or start the server with a larger --ctx",
                        code="context_length_exceeded", param="messages" if kind == "chat" else "prompt")
    return None


@dataclass
class _Meter:
    """Tokens of the request being served, seen through Llama.generate; its cancel event."""
    prompt: int = 0
    completion: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Routing:
    """Selections recorded and those served from GPU memory, per phase; layer-0 tokens."""
    prompt_selections: int = 0
    prompt_hits: int = 0
    decode_selections: int = 0
    decode_hits: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0

    def __add__(self, other: "_Routing") -> "_Routing":
        return _Routing(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple:
        return (self.prompt_selections, self.prompt_hits, self.decode_selections, self.decode_hits,
                self.prompt_tokens, self.decode_tokens)


@dataclass
class _Stats:
    requests: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    saves: int = 0
    last_save: Optional[float] = None
    last_save_error: Optional[str] = None
    profile_sessions: Optional[int] = None
    saved: _Routing = field(default_factory=_Routing)    # merged into the store already
    pending: _Routing = field(default_factory=_Routing)  # recorded since the last merge


class ModelService:
    """The HybridModel behind the server: a one-thread queue, counters, periodic merges."""

    def __init__(self, hm, *, model_id: Optional[str] = None, save_every: float = 30.0,
                 max_queue: int = 64, profile_store: Any = None) -> None:
        from hybrid_gguf.chat import ChatTemplate

        self.hm = hm
        self.llm = hm.llm
        self.model_id = model_id or hm.resolved.name
        self.n_ctx = int(hm.llm.n_ctx())
        self.n_vocab = int(hm.llm.n_vocab())
        self.save_every = float(save_every)
        self.max_queue = int(max_queue)
        self.store = profile_store
        self.template = ChatTemplate(hm.llm).install()
        self.started = time.time()
        self.stats = _Stats()
        self._stats_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-gguf-model")
        self._waiting = 0          # requests submitted and not finished
        self._stopping = False
        self._closed = False
        self._merged_once = False
        self._cancels: set = set()
        self._meter = _Meter()
        self._install_meter()
        self.on_closed = lambda service: None  # told once the model is freed
        from hybrid_gguf.llama.devices import gpu_devices

        self._gpu_names = {g.name for g in gpu_devices()}

    # -- token accounting ----------------------------------------------------------------

    def _install_meter(self) -> None:
        """Count each request's prompt and generated tokens where llama-cpp-python passes
        them: Llama.generate (called by create_completion and every chat handler)."""
        import llama_cpp

        llm, meter = self.llm, self._meter
        generate = llm.generate
        vocab = llm._model.vocab

        def metered_generate(tokens, *args, **kwargs):
            meter.prompt = len(tokens)
            inner = generate(tokens, *args, **kwargs)
            try:
                for tok in inner:
                    if self._stopping or meter.cancel.is_set():
                        break  # shutting down, or the client went away: end the completion here
                    if not llama_cpp.llama_vocab_is_eog(vocab, tok):
                        meter.completion += 1
                    yield tok
            finally:
                inner.close()

        llm.generate = metered_generate

    # -- the one worker ------------------------------------------------------------------

    async def submit(self, fn, *args):
        """Run fn(*args) on the model thread, after the requests queued before it."""
        if self._stopping:
            raise APIError(503, "the server is shutting down", "server_error", "shutting_down")
        with self._stats_lock:
            if self._waiting >= self.max_queue:
                self.stats.rejected += 1
                raise APIError(503, f"{self._waiting} requests are already queued; try again later",
                               "server_error", "queue_full")
            self._waiting += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            with self._stats_lock:
                self._waiting -= 1

    def _begin(self, cancel: Optional[threading.Event] = None) -> None:
        if self._stopping:
            raise APIError(503, "the server is shutting down", "server_error", "shutting_down")
        self._meter.prompt = self._meter.completion = 0
        self._meter.cancel = cancel or threading.Event()

    def _end(self, ok: bool) -> None:
        routing = self._routing_now()
        with self._stats_lock:
            s = self.stats
            if ok:
                s.requests += 1
            else:
                s.failed += 1
            s.prompt_tokens += self._meter.prompt
            s.completion_tokens += self._meter.completion
            s.pending = routing

    def usage(self) -> dict:
        m = self._meter
        return {"prompt_tokens": m.prompt, "completion_tokens": m.completion,
                "total_tokens": m.prompt + m.completion}

    def run_request(self, kind: str, params: dict) -> dict:
        """A whole (non-streamed) completion on the model thread."""
        self._begin()
        ok = False
        try:
            create = self.llm.create_chat_completion if kind == "chat" else self.llm.create_completion
            try:
                out = create(**params, stream=False)
            except ValueError as exc:
                raise _context_error(exc, self.n_ctx, kind) or APIError(400, str(exc)) from None
            out["model"] = self.model_id
            out["usage"] = self.usage()
            ok = True
            return out
        finally:
            self._end(ok)

    def run_stream(self, kind: str, params: dict, emit, cancel: threading.Event) -> None:
        """A streamed completion on the model thread: emit(("chunk", c)), then ("error", e)
        or ("done", usage). Stops early when `cancel` is set (the client went away)."""
        ok = False
        try:
            if cancel.is_set():
                return
            self._begin(cancel)
            try:
                create = self.llm.create_chat_completion if kind == "chat" else self.llm.create_completion
                chunks = create(**params, stream=True)
                try:
                    for chunk in chunks:
                        if cancel.is_set():
                            break
                        chunk["model"] = self.model_id
                        emit(("chunk", chunk))
                finally:
                    close = getattr(chunks, "close", None)
                    if close:
                        close()
                ok = True
                emit(("done", self.usage()))
            finally:
                self._end(ok)
        except ValueError as exc:
            emit(("error", _context_error(exc, self.n_ctx, kind) or APIError(400, str(exc))))
        except APIError as exc:
            emit(("error", exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server goes on
            log.exception("generation failed")
            emit(("error", APIError(500, f"generation failed: {exc}", "server_error")))

    # -- routing and the profile ---------------------------------------------------------

    def _routing_now(self) -> _Routing:
        """What the recorder holds (since the last merge); call on the model thread."""
        rec = self.hm.recorder
        if rec is None:
            return _Routing()
        snap = rec.snapshot(trace=False)
        gpu = {l: list(es) for l, es in self.hm.placement.gpu_experts.items() if es}
        out = []
        for counts in (snap.counts_prompt, snap.counts_decode):
            out.append(int(counts.sum()))
            out.append(sum(int(counts[l, es].sum()) for l, es in gpu.items()))
        return _Routing(*out, int(snap.tokens_prompt[0]), int(snap.tokens_decode[0]))

    def merge(self) -> Optional[int]:
        """Merge the recorder's counts into the profile store (on the model thread); the
        first merge of a run adds a session, later ones only counts. Returns sessions."""
        rec = self.hm.recorder
        if rec is None or self._closed:
            return None
        from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile

        snap = rec.snapshot(trace=False)
        if int(snap.counts.sum()) == 0:
            return None
        routing = self._routing_now()
        inv = self.hm.inventory
        delta = RoutingProfile.from_snapshot(snap, inv.fingerprint, inv.arch, label=SERVE_LABEL)
        if self._merged_once:
            delta.sessions, delta.labels = 0, {}
        try:
            merged = (self.store or ProfileStore()).merge_session(delta)
        except Exception as exc:  # noqa: BLE001 - keep serving; the counts stay for the next try
            log.exception("profile merge failed")
            with self._stats_lock:
                self.stats.last_save_error = str(exc)
            return None
        rec.reset()
        self._merged_once = True
        with self._stats_lock:
            s = self.stats
            s.saved = s.saved + routing
            s.pending = _Routing()
            s.saves += 1
            s.last_save = time.time()
            s.last_save_error = None
            s.profile_sessions = merged.sessions
        return merged.sessions

    async def saver(self) -> None:
        """Merge every save_every seconds while serving."""
        while True:
            await asyncio.sleep(self.save_every)
            try:
                await self.submit(self.merge)
            except APIError:
                pass  # queue full: the next round (or shutdown) merges

    def stop_generating(self) -> None:
        """Refuse new requests and end the running streams (the server is stopping)."""
        self._stopping = True
        for cancel in list(self._cancels):
            cancel.set()

    async def shutdown(self) -> None:
        """Stop generating, merge what was recorded, free the model."""
        if self._closed:
            return
        self.stop_generating()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.merge)
        self.close()

    def close(self) -> None:
        """Merge (if the worker is idle) and free the model; safe to call twice."""
        if self._closed:
            return
        self.stop_generating()
        self._executor.shutdown(wait=True)
        self.merge()
        self._closed = True
        self.hm.close(save_profile=False)
        self.on_closed(self)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict:
        hm = self.hm
        from hybrid_gguf.planning.memory import is_host

        with self._stats_lock:
            s = self.stats
            total = s.saved + s.pending
            queued = self._waiting
            saved = s.saved
            st = dict(requests=s.requests, failed=s.failed, rejected=s.rejected,
                      prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                      saves=s.saves, last_save=s.last_save, last_save_error=s.last_save_error,
                      sessions=s.profile_sessions)
        placement = hm.placement.to_dict()
        vram = {}
        for name, size in hm.placement.buffers.items():
            device = name.split(" ", 1)[-1]   # "model CUDA0", "kv CUDA0", "model CUDA_Host", ...
            if device in self._gpu_names and not is_host(device):
                vram[device] = vram.get(device, 0) + int(size)

        def rate(hits, sel):
            return hits / sel if sel else None

        from hybrid_gguf.routing.profile import ProfileStore

        store = self.store or ProfileStore()
        return {
            "model": self.model_id,
            "path": str(hm.path),
            "arch": hm.inventory.arch,
            "fingerprint": hm.inventory.fingerprint,
            "n_ctx": self.n_ctx,
            "chat_template": "gguf" if self.template.from_gguf else "transcript",
            "placement": placement,
            "hot_experts": placement["hot_experts"],
            "gpu_experts": placement["gpu_experts"],
            "vram_used_bytes": sum(vram.values()),
            "vram_by_device": vram,
            "hit_rate": {
                "prompt": rate(total.prompt_hits, total.prompt_selections),
                "decode": rate(total.decode_hits, total.decode_selections),
                "prompt_selections": total.prompt_selections,
                "decode_selections": total.decode_selections,
            },
            "tokens_served": {"prompt": st["prompt_tokens"], "completion": st["completion_tokens"],
                              "total": st["prompt_tokens"] + st["completion_tokens"]},
            "requests": {"served": st["requests"], "failed": st["failed"],
                         "rejected": st["rejected"], "in_queue": queued},
            "recording": hm.recorder is not None,
            "recorded_tokens": {"prompt": total.prompt_tokens, "decode": total.decode_tokens,
                                "saved_prompt": saved.prompt_tokens, "saved_decode": saved.decode_tokens},
            "profile": {"path": str(store.path_for(hm.inventory.fingerprint)),
                        "save_every_s": self.save_every, "saves": st["saves"],
                        "last_save": st["last_save"], "last_save_error": st["last_save_error"],
                        "sessions": st["sessions"]},
            "cache": self._cache_status(),
            "uptime_s": time.time() - self.started,
        }

    def _cache_status(self) -> Optional[dict]:
        """The in-session cache's counters, read without waiting for a running request (the
        patch publishes them under its own lock after each step); None without a cache."""
        hm = self.hm
        if not hm.cache.active or hm.closed:
            return None
        from hybrid_gguf.llama import hybrid as hybrid_backend

        stats = hybrid_backend.cache_stats(hm.llm._model.model)
        return None if stats is None else {"policy": hm.cache.policy, **stats}


# -- the HTTP app -----------------------------------------------------------------------


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
                  "frequency_penalty", "logit_bias")


def _common_params(body: dict, kind: str) -> dict:
    """Check the OpenAI request fields this server honours; llama-cpp-python keyword args."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class Params(BaseModel):
        model_config = ConfigDict(extra="allow")
        max_tokens: Optional[int] = Field(None, ge=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: Optional[int] = None
        stop: Optional[Union[str, List[str]]] = None
        n: int = 1
        stream: bool = False
        stream_options: Optional[Dict[str, Any]] = None
        presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
        logit_bias: Optional[Dict[str, float]] = None

    try:
        p = Params.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or None
        raise APIError(400, f"{where}: {first.get('msg')}", param=where) from None
    if p.n != 1:
        raise APIError(400, "this server returns one choice per request (n=1)", param="n")
    stop = [p.stop] if isinstance(p.stop, str) else (p.stop or [])
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    max_tokens = p.max_completion_tokens or p.max_tokens
    if max_tokens is None:
        max_tokens = 16 if kind == "completion" else None  # OpenAI's defaults; None = to the context
    out = dict(max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop=stop,
               presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
               repeat_penalty=1.0)
    if p.temperature == 0:
        out["top_k"] = 1  # greedy, whatever the sampler chain's defaults
    if p.logit_bias:
        out["logit_bias"] = p.logit_bias
    return out


def _completion_params(body: dict) -> dict:
    params = _common_params(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        pass  # token ids
    elif not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string, a list of one string, or a list of token ids",
                       param="prompt")
    params["prompt"] = prompt
    if "suffix" in body and body["suffix"]:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.get("echo"):
        params["echo"] = True
    return params


def _chat_params(body: dict) -> dict:
    params = _common_params(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
    params["messages"] = [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]
    return params


def _check_fits(service: ModelService, kind: str, params: dict) -> None:
    """Refuse a prompt the context cannot hold, or token ids the model does not have, before it
    takes its place in the queue (llama_decode fails on an id outside the vocabulary)."""
    if kind != "chat":
        # HybridModel._prompt_tokens checks the same for the API, under the model's lock
        prompt = params["prompt"]
        bad = next((t for t in prompt if not 0 <= t < service.n_vocab), None) if isinstance(prompt, list) else None
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the model's vocabulary of {service.n_vocab}",
                           param="prompt")
        return
    try:
        n = service.template.count(params["messages"])
    except Exception as exc:  # noqa: BLE001 - a GGUF template's raise_exception, a bad message
        raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from None
    if n >= service.n_ctx:
        raise APIError(400, f"the messages are {n} tokens with the chat format; the model's context is "
                            f"{service.n_ctx} tokens", code="context_length_exceeded", param="messages")


def create_app(service: ModelService, *, manage_lifetime: bool = True):
    """The FastAPI app; with manage_lifetime it merges periodically and shuts the model down."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        saver = asyncio.create_task(service.saver()) if (manage_lifetime and service.save_every > 0) else None
        try:
            yield
        finally:
            if saver is not None:
                saver.cancel()
            if manage_lifetime:
                await service.shutdown()

    app = FastAPI(title="hybrid-gguf", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not JSON") from None
        except RecursionError:
            raise APIError(400, "the request body is JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id}

    @app.get("/hybrid/status")
    async def status():
        return service.status()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.started), "owned_by": "hybrid-gguf"}]}

    async def serve(kind: str, body: dict):
        params = _chat_params(body) if kind == "chat" else _completion_params(body)
        _check_fits(service, kind, params)
        if not body.get("stream"):
            return await service.submit(service.run_request, kind, params)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(kind, params, include_usage)

    async def _stream(kind: str, params: dict, include_usage: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        service._cancels.add(cancel)

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = asyncio.ensure_future(service.submit(service.run_stream, kind, params, emit, cancel))

        def finish(_fut) -> None:
            service._cancels.discard(cancel)
            exc = _fut.exception() if not _fut.cancelled() else None
            if exc is not None:  # not run at all (queue full, shutting down)
                queue.put_nowait(("error", exc if isinstance(exc, APIError) else
                                  APIError(500, str(exc), "server_error")))
            queue.put_nowait(("end", None))

        job.add_done_callback(finish)
        first = await queue.get()
        if first[0] == "error":  # nothing sent yet: a proper status code
            cancel.set()
            raise first[1]

        async def events():
            item = first
            last = None
            try:
                while item[0] != "end":
                    tag, value = item
                    if tag == "chunk":
                        last = value
                        yield f"data: {json.dumps(value)}\n\n"
                    elif tag == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                    elif tag == "done" and include_usage and last is not None:
                        tail = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
                        yield f"data: {json.dumps(dict(tail, choices=[], usage=value))}\n\n"
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away, or we are done: stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve("completion", await body_of(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve("chat", await body_of(request))

    return app


def serve_forever(service: ModelService, host: str, port: int, *, on_ready=None,
                  log_level: str = "warning") -> None:
    """Bind host:port (0: any free port), call on_ready(port), serve until SIGINT/SIGTERM."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from hybrid_gguf.errors import HybridError

        raise HybridError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    app = create_app(service)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level in ("info", "debug"))
    server = uvicorn.Server(config)
    handle_exit = server.handle_exit

    def on_signal(sig, frame) -> None:
        service.stop_generating()  # do not wait out the graceful period for long streams
        handle_exit(sig, frame)

    server.handle_exit = on_signal
    if on_ready:
        orig_startup = server.startup

        async def startup(sockets=None):
            await orig_startup(sockets=sockets)
            if server.started:
                on_ready(sock.getsockname()[1])

        server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.close()  # no-op after the lifespan's shutdown
