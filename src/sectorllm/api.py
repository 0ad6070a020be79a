"""The Python API: load a model by name or path onto an engine, then generate text from it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat import chat
from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .engines import Engine
from .engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from .engines.float32 import FloatEngine
from .errors import UsageError
from .generate import Generation, TokenSampler
from .hub import resolve_model, resolve_tokenizer
from .packed import DEFAULT_SCHEME, PackedModel, is_packed, read_packed
from .quantize import quantize_model
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer, load_tokenizer

ENGINES = ("float", "fixed")


@dataclass
class Model:
    """A loaded model: its tokenizer and an engine with its KV cache (one generation at a time)."""

    config: ModelConfig
    tokenizer: Tokenizer
    engine: Engine
    path: Path
    packed: PackedModel | None = None  # set when the engine is the fixed-point one

    def generate(self, prompt: str = "", *, steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 topk: int = 0, minp: float = 0.0, seed: int = 0) -> Generation:
        """Iterate the result for Tokens as they are generated; `.result` holds the whole run.

        Defaults are run.c's: temperature 1, top-p 0.9, 256 steps (prompt included), seed from the clock.
        """
        sampler = self._sampler(SamplerConfig(temperature, topp, topk, minp, seed))
        return Generation(self.engine, self.tokenizer, prompt, steps, sampler)

    def chat(self, read_line: Callable[[], str | None], prompt: str | None = None, system_prompt: str | None = None,
             *, steps: int = 256, temperature: float = 1.0, topp: float = 0.9, topk: int = 0, minp: float = 0.0,
             seed: int = 0) -> Iterator[bytes]:
        """run.c's chat mode (chat.chat): the bytes to print, asking read_line() for each turn not given."""
        sampler = self._sampler(SamplerConfig(temperature, topp, topk, minp, seed))
        return chat(self.engine, self.tokenizer, sampler, steps, read_line, prompt, system_prompt)

    def _sampler(self, config: SamplerConfig) -> TokenSampler:
        if self.packed is None:
            return Sampler(config)
        return FixedSampler(FixedSamplerConfig.from_sampler_config(config), self.packed)

    def __repr__(self) -> str:
        engine = "float" if self.packed is None else "fixed"
        return f"Model({self.path}, {engine} engine, {self.config})"


def load(model: str | os.PathLike = "stories260K", tokenizer: str | os.PathLike | None = None,
         engine: str | None = None, scheme: str = DEFAULT_SCHEME, download: bool = True, threads: int = 0) -> Model:
    """Load a llama2.c checkpoint (a path or a name such as "stories15M") or a packed .sllm file.

    engine: "float" (the default for checkpoints) or "fixed" (the default, and the only choice, for packed files;
    a checkpoint is quantized in memory with `scheme`). threads: the engine's (0: all cores).
    """
    if engine is not None and engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    path = resolve_model(str(model), download=download)
    if engine == "fixed" or is_packed(path):
        if engine == "float":
            raise UsageError(f"{path} is a packed integer model: run it with the fixed engine (drop --engine float)")
        packed = load_packed(path, tokenizer, scheme)
        return Model(packed.config, packed.tokenizer, FixedEngine(packed, threads), path, packed)
    checkpoint = load_checkpoint(path)
    return Model(checkpoint.config, checkpoint_tokenizer(checkpoint, path, tokenizer, download),
                 FloatEngine(checkpoint, threads), path)


def load_packed(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, scheme: str = DEFAULT_SCHEME,
                download: bool = True) -> PackedModel:
    """The integer model: a packed .sllm file as it is, or a checkpoint quantized in memory with `scheme`."""
    path = resolve_model(str(model), download=download)
    if is_packed(path):
        if tokenizer is not None:
            raise UsageError(f"{path} carries its own tokenizer: drop -z")
        return read_packed(path)
    checkpoint = load_checkpoint(path)
    return quantize_model(checkpoint, checkpoint_tokenizer(checkpoint, path, tokenizer, download), scheme)


def checkpoint_tokenizer(checkpoint: Checkpoint, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                         download: bool = True) -> Tokenizer:
    """The tokenizer for a checkpoint: the one given (path or name), else the one its vocabulary calls for, looked
    for beside the model file first (hub.resolve_tokenizer); checked against the checkpoint's vocabulary."""
    vocab = checkpoint.config.vocab_size
    path = resolve_tokenizer(None if tokenizer is None else str(tokenizer), model, vocab, download)
    return load_tokenizer(path, vocab)
