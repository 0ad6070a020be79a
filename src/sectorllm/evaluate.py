"""Precision of the fixed-point engine against the float engine: agreement, KL, greedy prefixes, perplexity."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .checkpoint import Checkpoint
from .engines import Engine
from .engines.fixed import FixedEngine
from .engines.float32 import FloatEngine
from .errors import UsageError
from .packed import packed_bytes
from .quantize import quantize_model
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer

LOGIT_ONE = 65536  # fixed-engine logits are Q16.16

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Once upon a time", "Lily and Tom", "The cat", "One day, a little boy", "Tim had a big red ball",
    "The sun was shining", "Sara went to the park", "There was a small dog", "Mom said", "The bird sang",
    "Ben wanted to play", "In the forest", "A little girl named Sue", "The car was fast", "Anna liked to draw",
    "The old man", "Max found a box", "It was a rainy day", "The frog jumped", "Jack and Jill",
    "The fish swam", "Mia had a doll", "The tree was tall", "Dad made a cake", "The bunny hopped",
    "Tom was sad because", "Lucy saw a butterfly", "The boat", "Once there was a king", "The baby cried",
    "Sam and his friend", "The flower was pretty", "Kitty wanted milk", "The teacher said", "A big bear",
    "The moon was bright", "Emma went to school", "The dog barked at", "Bob liked to eat", "The little duck",
    "Grandma gave Lily", "The toy train", "Joe climbed a tree", "The princess", "Spot the dog",
    "The snow fell", "Amy and her mom", "The man had a hat", "The ball rolled", "At the beach",
)


@dataclass(frozen=True)
class PositionStats:
    agree: np.ndarray  # (n,) bool: argmax of both engines equal at each position
    kl: np.ndarray  # (n,) KL(float || fixed) of the next-token distributions
    nll_float: np.ndarray  # (n,) -log p(next token) under each engine
    nll_fixed: np.ndarray


@dataclass(frozen=True)
class EvalReport:
    scheme: str
    prompts: int
    positions: int
    top1_agreement: float  # fraction of teacher-forced positions whose argmax agrees
    mean_kl: float  # nats
    greedy_prefix_bos: int  # identical greedy tokens from BOS (out of greedy_tokens_bos)
    greedy_tokens_bos: int
    greedy_prefix_mean: float  # mean identical greedy tokens after each prompt (out of positions)
    ppl_float: float
    ppl_fixed: float
    packed_bytes: int
    float_bytes: int
    agreement_by_position: list[float] = field(repr=False)  # index: position after the prompt
    kl_by_position: list[float] = field(repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def teacher_forced(float_engine: Engine, fixed_engine: Engine, tokens: Sequence[int], start: int) -> PositionStats:
    """Both engines read `tokens`; positions start..len-2 are scored on predicting the token that follows."""
    agree, kl, nll_float, nll_fixed = [], [], [], []
    for pos, token in enumerate(tokens[:-1]):
        ref = float_engine.forward(token, pos).astype(np.float64)
        fixed = fixed_engine.forward(token, pos).astype(np.float64) / LOGIT_ONE
        if pos < start:
            continue
        log_p, log_q = _log_softmax(ref), _log_softmax(fixed)
        agree.append(int(np.argmax(ref)) == int(np.argmax(fixed)))
        kl.append(float(np.sum(np.exp(log_p) * (log_p - log_q))))
        nll_float.append(-log_p[tokens[pos + 1]])
        nll_fixed.append(-log_q[tokens[pos + 1]])
    return PositionStats(np.array(agree), np.array(kl), np.array(nll_float), np.array(nll_fixed))


def float_continuation(engine: Engine, prompt: list[int], n: int, sampler: Sampler) -> list[int]:
    """The prompt followed by n tokens the float engine chooses (never stopping at BOS/EOS)."""
    tokens = list(prompt)
    logits = engine.prefill(tokens)
    for _ in range(n):
        tokens.append(sampler.sample(logits))
        if len(tokens) < n + len(prompt):
            logits = engine.forward(tokens[-1], len(tokens) - 1)
    return tokens


def first_difference(agree: np.ndarray) -> int:
    misses = np.flatnonzero(~agree)
    return int(misses[0]) if misses.size else int(agree.size)


def evaluate(checkpoint: Checkpoint, tokenizer: Tokenizer, scheme: str = "row",
             prompts: Sequence[str] = BUILTIN_PROMPTS, positions: int = 128, greedy_bos: int = 256,
             progress: Callable[[int], None] | None = None) -> EvalReport:
    """Score the fixed engine on each prompt's float greedy continuation and on a sampled one (seeded per prompt).

    The greedy prefix after a prompt is where the teacher-forced argmax first differs on the greedy text: up to
    there both engines saw the same tokens, so it is also where the fixed engine's own greedy text departs.
    """
    seq_len = checkpoint.config.seq_len
    if not prompts:
        raise UsageError("no prompts to evaluate: give a file with one prompt per line")
    if positions < 1:
        raise UsageError(f"positions {positions} must be at least 1")
    packed = quantize_model(checkpoint, tokenizer, scheme)
    float_engine, fixed_engine = FloatEngine(checkpoint), FixedEngine(packed)
    greedy_bos = min(greedy_bos, seq_len - 1)
    bos_stats = teacher_forced(float_engine, fixed_engine, float_continuation(
        float_engine, [1], greedy_bos, Sampler(SamplerConfig(temperature=0))), start=0)
    runs: list[PositionStats] = []
    prefixes = []
    for i, prompt in enumerate(prompts):
        prompt_tokens = tokenizer.encode(prompt)
        n = min(positions, seq_len - len(prompt_tokens))
        if n < 1:
            raise UsageError(f"prompt {i + 1} is {len(prompt_tokens)} tokens: it leaves no room in the "
                             f"{seq_len}-token context; shorten it")
        start = len(prompt_tokens) - 1
        for config in (SamplerConfig(temperature=0), SamplerConfig(temperature=1.0, topp=0.9, seed=i + 1)):
            tokens = float_continuation(float_engine, prompt_tokens, n, Sampler(config))
            stats = teacher_forced(float_engine, fixed_engine, tokens, start)
            runs.append(stats)
            if config.temperature == 0:
                prefixes.append(first_difference(stats.agree))
        if progress is not None:
            progress(1)
    agree = np.concatenate([r.agree for r in runs])
    kl = np.concatenate([r.kl for r in runs])
    width = max(r.agree.size for r in runs)
    by_position = [[r for r in runs if r.agree.size > j] for j in range(width)]
    return EvalReport(
        scheme=scheme, prompts=len(prompts), positions=positions,
        top1_agreement=float(agree.mean()), mean_kl=float(kl.mean()),
        greedy_prefix_bos=first_difference(bos_stats.agree), greedy_tokens_bos=greedy_bos,
        greedy_prefix_mean=float(np.mean(prefixes)),
        ppl_float=float(np.exp(np.concatenate([r.nll_float for r in runs]).mean())),
        ppl_fixed=float(np.exp(np.concatenate([r.nll_fixed for r in runs]).mean())),
        packed_bytes=packed_bytes(packed), float_bytes=checkpoint.file_bytes,
        agreement_by_position=[float(np.mean([r.agree[j] for r in rs])) for j, rs in enumerate(by_position)],
        kl_by_position=[float(np.mean([r.kl[j] for r in rs])) for j, rs in enumerate(by_position)],
    )


def plot_report(report: EvalReport, path: str) -> None:
    """Agreement and KL against position after the prompt, one panel each (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sectorllm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(report.agreement_by_position, color="tab:blue")
    top.set_ylabel("top-1 agreement")
    top.set_ylim(min(0.9, min(report.agreement_by_position)) - 0.01, 1.005)
    top.set_title(f"fixed vs float, scheme {report.scheme}: {report.prompts} prompts x 2 texts")
    bottom.plot(report.kl_by_position, color="tab:red")
    bottom.set_ylabel("mean KL(float || fixed), nats")
    bottom.set_xlabel("position after the prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
