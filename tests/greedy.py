"""Greedy decoding that keeps every step's logits: the probe for placement equivalence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class GreedyRun:
    tokens: list[int]         # generated token ids
    logits: np.ndarray        # [n_steps, n_vocab]: logits that chose each generated token


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    # Llama.scores is only filled with logits_all=True; read the context directly.
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy(llm, prompt_tokens: Sequence[int], n_gen: int) -> GreedyRun:
    llm.reset()
    llm.eval(list(prompt_tokens))
    tokens: list[int] = []
    steps = []
    for _ in range(n_gen):
        logits = last_logits(llm)
        steps.append(logits)
        tok = int(np.argmax(logits))
        tokens.append(tok)
        llm.eval([tok])
    return GreedyRun(tokens=tokens, logits=np.stack(steps) if steps else np.zeros((0, llm.n_vocab())))
