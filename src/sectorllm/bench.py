"""Speed measurement: decode and prefill tokens per second of an engine, the median of a few warm runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .api import checkpoint_tokenizer
from .checkpoint import Checkpoint, load_checkpoint, random_weights
from .config import STORIES_SHAPES
from .engines import Engine
from .engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from .engines.float32 import FloatEngine
from .errors import UsageError
from .generate import TokenSampler
from .hub import resolve_model
from .quantize import quantize_model
from .sampling import Sampler, SamplerConfig
from .tokenizer import BOS


@dataclass(frozen=True)
class BenchResult:
    model: str
    engine: str
    decode_tokens: int  # greedy positions 0..n-1 from BOS, one forward pass + argmax each
    decode_tok_per_s: float
    prefill_tokens: int  # one batched pass over a prompt of this length
    prefill_tok_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def greedy_decode(engine: Engine, n_tokens: int, sampler: TokenSampler) -> list[int]:
    """n_tokens greedy steps from BOS, never stopping early: the decode workload."""
    tokens = [BOS]
    for pos in range(n_tokens):
        tokens.append(engine.step(tokens[-1], pos, sampler))
    return tokens


def bench_engine(engine: Engine, sampler: TokenSampler, model: str, engine_name: str, decode_tokens: int = 256,
                 prefill_tokens: int = 200, repeats: int = 5) -> BenchResult:
    seq_len = engine.config.seq_len
    decode_tokens = min(decode_tokens, seq_len)
    prefill_tokens = min(prefill_tokens, seq_len)
    tokens = greedy_decode(engine, decode_tokens, sampler)  # a warm-up outside the timed runs, and the prompt
    decode_s = _median_seconds(lambda: greedy_decode(engine, decode_tokens, sampler), repeats)
    prompt = (tokens * (prefill_tokens // decode_tokens + 1))[:prefill_tokens]
    engine.prefill(prompt)
    prefill_s = _median_seconds(lambda: engine.prefill(prompt), repeats)
    return BenchResult(model, engine_name, decode_tokens, decode_tokens / decode_s,
                       prefill_tokens, prefill_tokens / prefill_s)


def load_bench_model(model: str) -> Checkpoint:
    """A checkpoint by name or path, or "random:NAME": random weights of a published shape."""
    if model.startswith("random:"):
        shape = model.removeprefix("random:")
        if shape not in STORIES_SHAPES:
            raise UsageError(f"unknown shape {shape!r} in {model!r}: use one of {', '.join(STORIES_SHAPES)}")
        config = STORIES_SHAPES[shape]
        return Checkpoint(config, random_weights(config), version=1)
    return load_checkpoint(resolve_model(model))


def bench_model(model: str, engine: str, decode_tokens: int = 256, prefill_tokens: int = 200,
                threads: int = 0) -> BenchResult:
    """Bench one engine on a model; the fixed engine runs the model quantized in memory with scheme "row": every
    scheme gives the same integer work, and "row" takes seconds where "calibrated" takes minutes on large shapes."""
    checkpoint = load_bench_model(model)
    if engine == "float":
        return bench_engine(FloatEngine(checkpoint, threads), Sampler(SamplerConfig(temperature=0)), model, engine,
                            decode_tokens, prefill_tokens)
    packed = quantize_model(checkpoint, checkpoint_tokenizer(checkpoint, model.removeprefix("random:")), "row")
    return bench_engine(FixedEngine(packed, threads), FixedSampler(FixedSamplerConfig(0), packed), model, engine,
                        decode_tokens, prefill_tokens)
