"""The generation loop shared by the CLI, the Python API and the tests: run.c's loop, with a batched prompt."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from .engines import Engine
from .errors import UsageError
from .tokenizer import BOS, EOS, Tokenizer


class TokenSampler(Protocol):
    seed: int

    def sample(self, logits: np.ndarray) -> int: ...


@dataclass(frozen=True)
class Token:
    """One step of the stream: a prompt token echoed or a generated one, with the bytes it prints."""

    id: int
    piece: bytes
    generated: bool

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: list[int]  # encode(prompt) with BOS first
    generated_tokens: list[int]  # sampled ids; a terminating BOS/EOS is not included
    text: str  # everything printed: the echoed prompt, then the generated pieces
    stop_reason: str  # "bos", "eos", "steps" or "context"
    tok_per_s: float  # generated tokens per second of decoding (prompt and load excluded)
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_steps(steps: int) -> None:
    if steps < 0:
        raise UsageError(f"steps {steps} is negative: use a positive number, or 0 for the whole context")


def step_budget(steps: int, seq_len: int) -> tuple[int, str]:
    """run.c's rule: 0 or more than the context means the whole context; returns (forward passes, reason at the end)."""
    check_steps(steps)
    if steps == 0 or steps > seq_len:
        return seq_len, "context"
    return steps, "steps"


def encode_prompt(tokenizer: Tokenizer, prompt: str, seq_len: int) -> list[int]:
    """The prompt's tokens, BOS first; UsageError if they do not fit the model's context."""
    tokens = tokenizer.encode(prompt)
    if len(tokens) > seq_len:
        raise UsageError(f"the prompt is {len(tokens)} tokens but the model's context is {seq_len}: shorten it")
    return tokens


def continuation(engine: Engine, prompt: list[int], n: int, sampler: TokenSampler) -> list[int]:
    """The prompt followed by n tokens the engine chooses, never stopping at BOS/EOS (texts to measure on)."""
    tokens = list(prompt)
    logits = engine.prefill(tokens)
    for _ in range(n):
        tokens.append(sampler.sample(logits))
        if len(tokens) < n + len(prompt):
            logits = engine.forward(tokens[-1], len(tokens) - 1)
    return tokens


class StreamedGeneration:
    """A run that streams Tokens when iterated and sets `_result` at the end; `result` finishes it if need be."""

    _result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Token]:
        raise NotImplementedError

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            for _ in self:
                pass
        assert self._result is not None
        return self._result


class Generation(StreamedGeneration):
    """Iterate for the Tokens as they come; `result` is ready once the iteration ends."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: str, steps: int, sampler: TokenSampler) -> None:
        self.engine, self.tokenizer, self.sampler = engine, tokenizer, sampler
        seq_len = engine.config.seq_len
        self.prompt_tokens = encode_prompt(tokenizer, prompt, seq_len)
        self.steps, self._limit_reason = step_budget(steps, seq_len)

    def __iter__(self) -> Iterator[Token]:
        if self._result is not None:
            return
        prompt, steps = self.prompt_tokens, self.steps
        printed = bytearray()
        for prev, token in zip(prompt, prompt[1:steps + 1]):
            piece = self.tokenizer.piece_bytes(prev, token)
            printed += piece
            yield Token(token, piece, generated=False)
        generated: list[int] = []
        stop_reason = self._limit_reason if steps <= len(prompt) - 1 else ""
        decode_seconds = 0.0
        if not stop_reason:
            logits = self.engine.prefill(prompt)
            pos, token = len(prompt), prompt[-1]
            started = time.perf_counter()
            next_token = self.sampler.sample(logits)
            while True:
                if next_token in (BOS, EOS):
                    stop_reason = "bos" if next_token == BOS else "eos"
                    break
                generated.append(next_token)
                piece = self.tokenizer.piece_bytes(token, next_token)
                printed += piece
                decode_seconds += time.perf_counter() - started
                yield Token(next_token, piece, generated=True)
                started = time.perf_counter()
                if pos >= steps:
                    stop_reason = self._limit_reason
                    break
                pos, token, next_token = pos + 1, next_token, self.engine.step(next_token, pos, self.sampler)
            decode_seconds += time.perf_counter() - started
        tok_per_s = len(generated) / decode_seconds if generated and decode_seconds > 0 else 0.0
        self._result = GenerationResult(list(prompt), generated, printed.decode("utf-8", errors="replace"),
                                        stop_reason, tok_per_s, self.sampler.seed)
