"""Chat with a model's own GGUF chat template: shared by `run` (interactive) and `serve`.

`ChatTemplate.install(llm)` makes `llm.create_chat_completion` format messages with the
template the GGUF file carries (`tokenizer.chat_template`). A model without one (the bundled
tiny model) gets a plain transcript instead of llama-cpp-python's silent llama-2 default:

    <system text>

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

and generation stops at the next "\\nUser:". `ChatTemplate.count(messages)` gives the
prompt's length in tokens, so a conversation can be trimmed to fit the context.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

TRANSCRIPT_NOTICE = "the model has no chat template: using a plain User:/Assistant: transcript"


@dataclass
class _Rendered:
    prompt: str
    stop: List[str]
    added_special: bool


class _TranscriptFormatter:
    """A ChatFormatter (llama_cpp.llama_chat_format protocol) for models without a template."""

    stop = ["\nUser:"]

    def __call__(self, *, messages: Sequence[dict], **_: Any):
        from llama_cpp.llama_chat_format import ChatFormatterResponse

        parts = []
        for m in messages:
            role, content = m.get("role"), _text(m.get("content"))
            if role == "system":
                parts.append(f"{content}\n\n")
            elif role == "assistant":
                parts.append(f"Assistant: {content}\n")
            else:
                parts.append(f"User: {content}\n")
        parts.append("Assistant:")
        return ChatFormatterResponse(prompt="".join(parts), stop=list(self.stop))


def _text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


class ChatTemplate:
    """The chat format of one loaded model (see the module docstring)."""

    def __init__(self, llm) -> None:
        from llama_cpp import llama_chat_format

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        self.from_gguf = bool(template)
        if self.from_gguf:
            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            model = llm._model
            self.formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id] if eos_id != -1 else None,
            )
        else:
            self.formatter = _TranscriptFormatter()
        self.handler = llama_chat_format.chat_formatter_to_chat_completion_handler(self.formatter)

    @property
    def notice(self) -> Optional[str]:
        return None if self.from_gguf else TRANSCRIPT_NOTICE

    def install(self, llm=None) -> "ChatTemplate":
        """Make llm.create_chat_completion use this template."""
        (llm or self.llm).chat_handler = self.handler
        return self

    def render(self, messages: Sequence[dict]) -> _Rendered:
        res = self.formatter(messages=list(messages))
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return _Rendered(res.prompt, stop, bool(res.added_special))

    def tokens(self, messages: Sequence[dict]) -> list:
        """The prompt's tokens, as the chat handler tokenizes them."""
        r = self.render(messages)
        return self.llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)

    def count(self, messages: Sequence[dict]) -> int:
        return len(self.tokens(messages))


def trim_to_fit(template: ChatTemplate, messages: List[dict], n_ctx: int, max_tokens: int
                ) -> tuple[List[dict], int]:
    """Drop the oldest turns (never a system message, never the last message) until the prompt
    plus `max_tokens` fits `n_ctx`. Returns (messages kept, prompt tokens); the prompt may
    still not fit when the last message alone is too long: the caller checks."""
    msgs = list(messages)
    while True:
        n = template.count(msgs)
        if n + max_tokens <= n_ctx:
            return msgs, n
        # the oldest non-system message, unless it is the newest one
        idx = next((i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"), None)
        if idx is None:
            return msgs, n
        del msgs[idx]
        # a turn is a user message and the reply to it: drop the reply with it
        if idx < len(msgs) - 1 and msgs[idx].get("role") == "assistant":
            del msgs[idx]


# -- the interactive chat of `hybrid-gguf run` ---------------------------------------------


def history_path() -> Path:
    from hybrid_gguf.paths import chat_history_path

    return chat_history_path()


def _line_editing(enabled: bool) -> Callable[[], None]:
    """Line editing and a persistent history via readline (on a terminal); returns a saver."""
    if not enabled:
        return lambda: None
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is missing on some platforms
        return lambda: None
    path = history_path()
    try:
        readline.read_history_file(str(path))
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(path))
        except OSError:
            pass

    return save


def chat_loop(hm, *, max_tokens: int, temperature: float, system: Optional[str] = None,
              read: Optional[Callable[[str], str]] = None, write: Callable[[str], Any] = None,
              notice: Callable[[str], Any] = lambda s: None) -> int:
    """Chat until an empty line or end of input; returns the number of turns answered.

    Each turn's conversation is trimmed (oldest turns first) so that the prompt plus
    `max_tokens` fits the context; a message too long on its own is refused, and the chat
    goes on. KeyboardInterrupt propagates (the caller saves the routing and exits 130)."""
    interactive = read is None and sys.stdin.isatty()
    read = read or input
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    save_history = _line_editing(interactive)
    template = ChatTemplate(hm.llm).install()
    if template.notice:
        notice(template.notice)
    n_ctx = hm.llm.n_ctx()
    base: List[dict] = [{"role": "system", "content": system}] if system else []
    turns: List[dict] = []
    answered = 0
    try:
        while True:
            try:
                user = read("> ")
            except EOFError:
                break
            if not user.strip():
                break
            wanted = base + turns + [{"role": "user", "content": user}]
            try:
                msgs, n_prompt = trim_to_fit(template, wanted, n_ctx, max_tokens)
            except Exception as exc:  # noqa: BLE001 - a GGUF template's raise_exception
                notice(f"the model's chat template refused the conversation: {exc}")
                continue
            if n_prompt >= n_ctx:
                notice(f"that message is {n_prompt} tokens with the chat format; the context holds "
                       f"{n_ctx}: send a shorter one")
                continue
            dropped = len(wanted) - len(msgs)
            if dropped:
                notice(f"dropped the {dropped} oldest messages to fit the context of {n_ctx} tokens")
            turns = [m for m in msgs if m.get("role") != "system"][:-1]
            reply = []
            for chunk in hm.llm.create_chat_completion(
                    msgs, stream=True, max_tokens=max_tokens, temperature=max(temperature, 0.0),
                    top_k=1 if temperature <= 0 else 40, repeat_penalty=1.0):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    reply.append(piece)
                    write(piece)
            write("\n")
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(reply)}]
            answered += 1
    finally:
        save_history()
    return answered
