"""`hybrid-gguf serve` through the openai client, kill -9 mid-stream, and the chat of `run`.

Every server is a real subprocess on a loopback port chosen by the kernel (--port 0), with
its profile store in tmp_path (HYBRID_GGUF_HOME), and is always killed in a finally.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hybrid_gguf.chat import trim_to_fit  # noqa: E402
from hybrid_gguf import paths  # noqa: E402
from hybrid_gguf.header.inventory import read_inventory  # noqa: E402
from hybrid_gguf.models import resolve_model  # noqa: E402
from hybrid_gguf.routing.profile import SLOW_WRITE_ENV, ProfileStore, RoutingProfile  # noqa: E402
from hybrid_gguf.llama.recorder import recorder_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ok, why = recorder_status()
needs_recorder = pytest.mark.skipif(not ok, reason=why)


def _env(cache: Path, **extra) -> dict:
    # profiles and chat history in the test's folder; the shared cache (recorder, models) kept
    env = dict(os.environ, PYTHONPATH=str(REPO), HYBRID_GGUF_HOME=str(cache),
               HYBRID_GGUF_CACHE=str(paths.cache_dir()), COLUMNS="200")
    env.pop(SLOW_WRITE_ENV, None)
    env.update(extra)
    return env


def _fingerprint() -> str:
    return read_inventory(resolve_model(None).path).fingerprint


class Server:
    """`hybrid-gguf serve` in a subprocess; its stderr lines are collected by a thread."""

    def __init__(self, cache: Path, *args: str, env_extra=None) -> None:
        cmd = [sys.executable, "-m", "hybrid_gguf.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=_env(cache, **(env_extra or {})), cwd=str(REPO))
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = self._wait_ready(timeout=90)
        self.base = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)
        self._q.put(None)

    def _wait_ready(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._q.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                return int(m.group(1))
        self.kill()
        raise AssertionError("the server did not start:\n" + "\n".join(self.lines))

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="sk-test", timeout=60, max_retries=0)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self, sig=signal.SIGINT, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return "\n".join(self.lines)


def _stored(cache: Path):
    return ProfileStore(cache / "profiles").load(_fingerprint())


@needs_recorder
def test_openai_client_chat_stream_completion_queue_and_context(tmp_path):
    cache = tmp_path / "cache"
    # a first session from `run`, so the server starts from a stored profile
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", "-p", "import sys", "-n", "4",
                          "--threads", "1", "--json"], capture_output=True, text=True, env=_env(cache),
                         cwd=str(REPO), timeout=120)
    assert res.returncode == 0, res.stderr
    before = _stored(cache)
    assert before is not None and before.sessions == 1

    server = Server(cache, "--save-every", "600")
    try:
        assert "routing profile: 1 sessions" in server.log()
        assert server.get("/health")["status"] == "ok"
        client = server.client()
        model_id = client.models.list().data[0].id
        assert model_id == "tiny-moe-stdlib"

        # chat, with the model's chat format (a transcript: the tiny model has no template)
        chat = client.chat.completions.create(
            model=model_id, messages=[{"role": "system", "content": "You write Python."},
                                      {"role": "user", "content": "import os"}],
            max_tokens=8, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert isinstance(chat.choices[0].message.content, str)
        assert chat.usage.prompt_tokens > 10 and 1 <= chat.usage.completion_tokens <= 8
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

        # streaming chat: server-sent events, usage in the last chunk when asked for
        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "import os"}], max_tokens=8,
                temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert finish == "length" and usage is not None and usage.completion_tokens == 8
        # the same request unstreamed gives the same text (greedy)
        same = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "import os"}],
                                              max_tokens=8, temperature=0)
        assert "".join(pieces) == same.choices[0].message.content

        # completion with a stop sequence; seeded sampling repeats itself
        full = client.completions.create(model=model_id, prompt="def main():", max_tokens=12, temperature=0)
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
        text = full.choices[0].text
        stop = text.strip()[:2]
        assert stop, text
        cut = client.completions.create(model=model_id, prompt="def main():", max_tokens=12, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[:text.index(stop)]
        seeded = [client.completions.create(model=model_id, prompt="class A:", max_tokens=10, temperature=0.9,
                                            top_p=0.9, seed=7).choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]

        # two requests at once: queued, served one at a time, the same answers as alone
        prompts = ["import json", "for i in range("]
        alone = [client.completions.create(model=model_id, prompt=p, max_tokens=10, temperature=0).choices[0].text
                 for p in prompts]

        def one(p):
            return server.client().completions.create(model=model_id, prompt=p, max_tokens=10,
                                                      temperature=0).choices[0].text

        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(one, prompts))
        assert together == alone

        # too long for the context (256 tokens): a clear 400, and the server goes on
        for call in (lambda: client.chat.completions.create(model=model_id, max_tokens=4,
                                                            messages=[{"role": "user", "content": "x" * 400}]),
                     lambda: client.completions.create(model=model_id, prompt="y" * 400, max_tokens=4),
                     lambda: client.completions.create(model=model_id, prompt="y" * 400, max_tokens=4,
                                                       stream=True)):
            with pytest.raises(openai.BadRequestError) as err:
                call()
            assert err.value.status_code == 400
            assert err.value.code == "context_length_exceeded"
            assert "context" in err.value.message
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model_id, prompt="x", max_tokens=4, temperature=5)
        # token ids the model does not have: llama_decode would fail on them (a 500 before)
        for ids in ([999999999], [-1], [1, 2, 10**6]):
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=model_id, prompt=ids, max_tokens=2)
            assert "outside the model's vocabulary" in err.value.message
        # a body nested too deeply for the JSON parser
        req = urllib.request.Request(server.base + "/v1/completions", data=b"[" * 100000 + b"]" * 100000,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=30)
        assert http_err.value.code == 400
        assert server.get("/health")["status"] == "ok"

        status = server.get("/hybrid/status")
        assert status["model"] == model_id and status["placement"]["mode"] in ("cpu", "gpu", "whole-tensor",
                                                                              "per-expert")
        for key in ("hot_experts", "vram_used_bytes", "hit_rate", "tokens_served", "requests", "profile"):
            assert key in status
        assert status["requests"]["served"] == 11
        served = status["tokens_served"]
        # 11 answered: chat, stream, chat, completion, cut, 2 seeded, 2 alone, 2 together
        completion = (chat.usage.completion_tokens + 8 + same.usage.completion_tokens + 12
                      + cut.usage.completion_tokens + 2 * 10 + 4 * 10)
        assert served["completion"] == completion
        assert status["hit_rate"]["prompt_selections"] > 0
        recorded = status["recorded_tokens"]
        assert 0 < recorded["prompt"] <= served["prompt"]
        # every prompt was evaluated but for a prefix shared with the request before it
        assert recorded["prompt"] >= served["prompt"] // 2

        assert server.stop(signal.SIGINT) == 130  # Ctrl-C: merged, then the usual status
    finally:
        server.kill()
    assert "Traceback" not in server.log(), server.log()
    after = _stored(cache)
    # one server run is one session, and the profile grew by exactly what the server recorded
    assert after.sessions == 2 and after.labels.get("serve") == 1
    grown = after.tokens_per_layer[0] - before.tokens_per_layer[0]
    assert grown == recorded["prompt"] + recorded["decode"]
    assert grown <= served["total"]


@needs_recorder
def test_a_client_that_goes_away_stops_its_generation(tmp_path):
    server = Server(tmp_path / "cache", "--save-every", "600")
    try:
        client = server.client()
        stream = client.completions.create(model="m", prompt="def f():", max_tokens=230, temperature=0.8,
                                           stream=True)
        for n, _chunk in enumerate(stream, 1):
            if n == 3:
                stream.close()
                break
        # the next request is served, and the abandoned one stopped well short of 230 tokens
        assert client.completions.create(model="m", prompt="x", max_tokens=3).usage.completion_tokens == 3
        status = server.get("/hybrid/status")
        assert status["requests"]["served"] == 2
        assert status["tokens_served"]["completion"] - 3 < 200
        assert server.stop() == 130
    finally:
        server.kill()


def _tmp_files(path: Path) -> list:
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]


@needs_recorder
def test_sigkill_mid_stream_or_mid_merge_leaves_a_loadable_profile(tmp_path):
    cache = tmp_path / "cache"
    path = ProfileStore(cache / "profiles").path_for(_fingerprint())
    # 1. killed mid-stream, after a periodic merge
    server = Server(cache, "--save-every", "0.3")
    try:
        client = server.client()
        client.completions.create(model="m", prompt="import os\nimport sys\n", max_tokens=8, temperature=0)
        end = time.monotonic() + 30
        while server.get("/hybrid/status")["profile"]["saves"] < 1 and time.monotonic() < end:
            time.sleep(0.1)
        saved = server.get("/hybrid/status")
        assert saved["profile"]["saves"] >= 1
        got = 0
        for _chunk in client.completions.create(model="m", prompt="def main():", max_tokens=200,
                                                temperature=0.8, stream=True):
            got += 1
            if got == 5:
                os.kill(server.proc.pid, signal.SIGKILL)
                break
        assert server.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        server.kill()
    data = json.loads(path.read_text())  # complete JSON, never half a file
    profile = RoutingProfile.load(path, expected_fingerprint=_fingerprint())
    assert data["sessions"] == profile.sessions == 1
    rec = saved["recorded_tokens"]
    assert profile.tokens_per_layer[0] == rec["saved_prompt"] + rec["saved_decode"] > 0

    # 2. killed while a merge is half-way through writing its temp file
    before = path.read_bytes()
    server = Server(cache, "--save-every", "0.2", env_extra={SLOW_WRITE_ENV: "60"})
    try:
        assert "routing profile: 1 sessions" in server.log()
        server.client().completions.create(model="m", prompt="class A:", max_tokens=4, temperature=0)
        end = time.monotonic() + 30
        while not _tmp_files(path) and time.monotonic() < end:
            time.sleep(0.05)
        assert _tmp_files(path), server.log()
        os.kill(server.proc.pid, signal.SIGKILL)
        assert server.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        server.kill()
    assert path.read_bytes() == before  # the previous profile, whole
    assert RoutingProfile.load(path, expected_fingerprint=_fingerprint()).sessions == 1
    assert not list(path.parent.glob("*.corrupt*"))
    # the next merge takes it from there and clears the dead writer's temp file
    merged = ProfileStore(cache / "profiles").merge_session(profile)
    assert merged.sessions == 2 and not _tmp_files(path)


# -- chat (`run` without -p) -----------------------------------------------------------------


class _Words:
    """A stand-in ChatTemplate: one token per word, plus 2 per message."""

    def count(self, messages):
        return sum(len(m["content"].split()) + 2 for m in messages)


def test_trim_drops_the_oldest_turns_but_keeps_the_system_message():
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    msgs.append({"role": "user", "content": "last one"})
    kept, n = trim_to_fit(_Words(), msgs, n_ctx=40, max_tokens=10)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last one"
    assert n + 10 <= 40 and n == _Words().count(kept)
    assert [m["role"] for m in kept[1:]] == ["user", "assistant", "user"]  # whole turns went
    assert kept[1]["content"].startswith("question 3")
    # a last message too long on its own is all that is left, and the caller is told its size
    kept, n = trim_to_fit(_Words(), msgs[:-1] + [{"role": "user", "content": "w " * 100}], 40, 10)
    assert [m["role"] for m in kept] == ["system", "user"] and n > 40


class Pty:
    """A command on a pseudo-terminal (chat needs a terminal)."""

    def __init__(self, args, env) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(REPO))
        os.close(slave)
        self.out = b""

    def read_until(self, token: bytes, timeout: float = 60) -> bytes:
        import select

        start = len(self.out)
        end = time.monotonic() + timeout
        while token not in self.out[start:] and time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    break
        assert token in self.out[start:], self.text()
        return self.out[start:]

    def drain(self, timeout: float = 5) -> None:
        import select

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.out += chunk
            elif self.proc.poll() is not None:
                return

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def text(self) -> str:
        """The output without colours, lines joined (rich wraps at the terminal's width)."""
        return " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.out.decode(errors="replace")).split())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        os.close(self.master)


@needs_recorder
def test_chat_trims_turns_takes_system_and_ctrl_c_saves_with_130(tmp_path):
    cache = tmp_path / "cache"
    chat = Pty([sys.executable, "-m", "hybrid_gguf.cli", "run", "-n", "100", "--threads", "1",
                "--system", "You write Python."], _env(cache, TERM="dumb"))
    try:
        chat.read_until(b"> ")
        for line in ("def fib(n):", "import os", "class Foo:"):
            chat.send(line)
            chat.read_until(b"> ")
        chat.send("x" * 400)  # longer than the context on its own: refused, the chat goes on
        chat.read_until(b"> ")
        time.sleep(0.5)  # at the prompt
        chat.proc.send_signal(signal.SIGINT)
        rc = chat.proc.wait(timeout=60)
        chat.drain()
    finally:
        chat.close()
    text = chat.text()
    assert rc == 130, text
    assert "no chat template" in text
    # 256 tokens of context, 100 of them for the reply: the second turn no longer fits whole
    assert "dropped the 2 oldest messages" in text
    assert "send a shorter one" in text
    assert "interrupted" in text and "Traceback" not in text
    stored = _stored(cache)
    # at least the first prompt (the later turns reuse the cached prefix of the conversation)
    assert stored is not None and stored.sessions == 1 and stored.tokens_per_layer[0] > 40
    assert (cache / "chat_history").exists()


@needs_recorder
def test_profile_ctrl_c_stores_what_was_recorded(tmp_path):
    cache = tmp_path / "cache"
    prompts = tmp_path / "prompts.txt"
    # ~1 minute of work on a 2-core machine (400 prompts took 6 s, too close to the 4 s below)
    prompts.write_text("".join(f"def function_{i}(x):\n" for i in range(4000)))
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_gguf.cli", "profile", str(resolve_model(None).path),
                             "--prompts", str(prompts), "-n", "32", "--ctx", "128", "--threads", "1",
                             "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache),
                            cwd=str(REPO))
    try:
        time.sleep(4)  # loaded and a few prompts in (the whole workload takes far longer)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted: merged" in err and "Traceback" not in err
    stored = ProfileStore(store).load(_fingerprint())
    assert stored is not None and stored.sessions == 1 and stored.tokens_per_layer[0] > 0


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_uses_the_gguf_chat_template(tmp_path):
    from hybrid_gguf.chat import ChatTemplate
    from hybrid_gguf.model import HybridModel

    path = tmp_path / "templated.gguf"
    res = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", TEMPLATE,
                          str(resolve_model(None).path), str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    hm = HybridModel(str(path), record=False, n_threads=1)
    try:
        template = ChatTemplate(hm.llm).install()
        assert template.from_gguf and template.notice is None
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
        assert template.render(msgs).prompt == "<system>be brief</system>\n<user>import os</user>\n<assistant>"
        out = hm.llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
        assert out["usage"]["prompt_tokens"] == template.count(msgs)
        # trimming counts with the same template
        long = msgs + [{"role": "assistant", "content": "a" * 100}, {"role": "user", "content": "b" * 60}]
        kept, n = trim_to_fit(template, long, hm.llm.n_ctx(), 128)
        assert [m["role"] for m in kept] == ["system", "user"] and kept[-1]["content"] == "b" * 60
        assert n == template.count(kept) and n + 128 <= hm.llm.n_ctx()
    finally:
        hm.close(save_profile=False)


def test_system_without_chat_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", "-p", "x", "--system", "s"],
                         capture_output=True, text=True, env=_env(tmp_path), cwd=str(REPO), timeout=120)
    assert res.returncode == 2 and "--system is for the chat" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port"),
    (["--save-every", "0"], "--save-every"),
    (["--hot", "0:1", "--plan", "p.yaml"], "pass one"),
    (["-ub", "big"], "--ubatch must be a positive integer or auto"),
    (["-c", "256", "--ubatch", "1024"], "--ubatch 1024 exceeds the context of 256 tokens"),
    (["-ctk", "q3"], "--cache-type-k: unknown KV cache type 'q3'; known: f32, f16, bf16, q8_0"),
    (["--cache-type-v", "q8_0"], "a quantized V cache (q8_0) needs flash attention (-fa/--flash-attn"),
])
def test_serve_bad_options_are_one_clear_line(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "serve", *args], capture_output=True,
                         text=True, env=_env(tmp_path), cwd=str(REPO), timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    if "-ctk" in args or "--cache-type-v" in args:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_status_page_reports_the_in_session_cache(tmp_path):
    from hybrid_gguf.llama import hybrid as hybrid_backend

    if hybrid_backend.capability().version < 5:
        pytest.skip("needs hybrid patch version 5 (the in-session cache)")
    server = Server(tmp_path / "cache", "--hot", "0:1;1:2;2:0", "--cache", "lru", "--cache-quota", "100",
                    "--no-record")
    try:
        assert server.get("/hybrid/status")["cache"]["steps"] == 0
        server.client().completions.create(model="m", prompt="def f():", max_tokens=8)
        cache = server.get("/hybrid/status")["cache"]
        assert cache["policy"] == "lru" and cache["steps"] > 0 and cache["uploads"] > 0
        assert cache["hits"] + cache["misses"] > 0
    finally:
        server.kill()


def test_serve_takes_the_ubatch_and_flash_attn(tmp_path):
    """-ub/-fa reach the served model's llama.cpp context; /hybrid/status says what it took."""
    server = Server(tmp_path / "cache", "-ub", "32", "-fa", "--no-record", "-c", "256")
    try:
        placement = server.get("/hybrid/status")["placement"]
        assert (placement["n_ubatch"], placement["flash_attn"]) == (32, True)
        reply = server.client().completions.create(model="m", prompt="def f():", max_tokens=4)
        assert reply.usage.completion_tokens > 0
    finally:
        server.kill()


def test_serve_takes_the_cache_types(tmp_path):
    """-ctk/-ctv reach the served model's llama.cpp context; /hybrid/status says what it took."""
    server = Server(tmp_path / "cache", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "--no-record", "-c", "256")
    try:
        placement = server.get("/hybrid/status")["placement"]
        assert (placement["type_k"], placement["type_v"], placement["flash_attn"]) == ("q8_0", "q8_0", True)
        reply = server.client().completions.create(model="m", prompt="def f():", max_tokens=4)
        assert reply.usage.completion_tokens > 0
    finally:
        server.kill()
