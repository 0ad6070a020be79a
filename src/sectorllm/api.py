"""The Python API: load a model by name or path, then generate text from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .engines import Engine
from .engines.float32 import FloatEngine
from .errors import UsageError
from .generate import Generation
from .hub import resolve_model, resolve_tokenizer
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer, load_tokenizer

ENGINES = ("float",)


@dataclass
class Model:
    """A loaded model: its tokenizer and an engine with its KV cache (one generation at a time)."""

    config: ModelConfig
    tokenizer: Tokenizer
    engine: Engine
    path: Path

    def generate(self, prompt: str = "", *, steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 topk: int = 0, minp: float = 0.0, seed: int = 0) -> Generation:
        """Iterate the result for Tokens as they are generated; `.result` holds the whole run.

        Defaults are run.c's: temperature 1, top-p 0.9, 256 steps (prompt included), seed from the clock.
        """
        sampler = Sampler(SamplerConfig(temperature, topp, topk, minp, seed))
        return Generation(self.engine, self.tokenizer, prompt, steps, sampler)


def load(model: str | os.PathLike = "stories260K", tokenizer: str | os.PathLike | None = None,
         engine: str = "float", download: bool = True) -> Model:
    """Load a llama2.c checkpoint (a path or a name such as "stories15M") and its tokenizer."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    path = resolve_model(str(model), download=download)
    checkpoint = load_checkpoint(path)
    vocab = checkpoint.config.vocab_size
    tok = load_tokenizer(resolve_tokenizer(None if tokenizer is None else str(tokenizer), path, vocab), vocab)
    return Model(checkpoint.config, tok, make_engine(checkpoint, engine), path)


def make_engine(checkpoint: Checkpoint, engine: str) -> Engine:
    return FloatEngine(checkpoint)
