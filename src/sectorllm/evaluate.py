"""Precision of the fixed-point engine against the float engine: agreement, KL, greedy prefixes, perplexity."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .atomic import write_atomically
from .calibrate import calibration_texts
from .checkpoint import Checkpoint
from .engines import Engine
from .engines.fixed import FixedEngine
from .engines.float32 import FloatEngine
from .engines.simulate import STEPS, SimulatedEngine
from .errors import UsageError
from .generate import continuation
from .packed import DEFAULT_SCHEME, packed_bytes
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
    calibration_top1_agreement: float  # the same, teacher-forced on the quantizer's calibration stories (in-sample)
    calibration_mean_kl: float
    agreement_by_position: list[float] = field(repr=False)  # index: position after the prompt
    kl_by_position: list[float] = field(repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Text:
    """A token sequence the float engine chose, with the float engine's logits after each of its tokens."""

    tokens: list[int]
    start: int  # positions start..len-2 are scored (the last prompt token onwards)
    greedy: bool  # the float engine's greedy continuation (its scored prefix is a greedy prefix)
    reference: np.ndarray  # (len - 1, vocab_size) float64 logits


def _logits(engine: Engine, tokens: list[int]) -> np.ndarray:
    """(len - 1, vocab_size) float64: the engine's logits after each token but the last (copied: engines reuse
    their logits buffer)."""
    return np.array([np.array(engine.forward(t, pos), dtype=np.float64) for pos, t in enumerate(tokens[:-1])])


def reference_text(engine: Engine, tokens: list[int], start: int, greedy: bool) -> Text:
    return Text(tokens, start, greedy, _logits(engine, tokens))


def teacher_forced(text: Text, engine: Engine) -> PositionStats:
    """The engine reads the text; positions start..len-2 are scored on predicting the token that follows."""
    log_p = _log_softmax(text.reference[text.start:])
    log_q = _log_softmax(_logits(engine, text.tokens)[text.start:] / LOGIT_ONE)
    following = np.array(text.tokens[text.start + 1:])
    rows = np.arange(following.size)
    return PositionStats(np.argmax(log_p, axis=1) == np.argmax(log_q, axis=1),
                         np.sum(np.exp(log_p) * (log_p - log_q), axis=1),
                         -log_p[rows, following], -log_q[rows, following])


def first_difference(agree: np.ndarray) -> int:
    misses = np.flatnonzero(~agree)
    return int(misses[0]) if misses.size else int(agree.size)


def eval_texts(checkpoint: Checkpoint, tokenizer: Tokenizer, prompts: Sequence[str], positions: int,
               greedy_bos: int | None, progress: Callable[[int], None] | None = None) -> tuple[Text, list[Text]]:
    """The float engine's greedy text from BOS, and each prompt's greedy and sampled (seed = prompt number)
    continuations, with the float logits that score them."""
    seq_len = checkpoint.config.seq_len
    if not prompts:
        raise UsageError("no prompts to evaluate: give a file with one prompt per line")
    if positions < 1:
        raise UsageError(f"positions {positions} must be at least 1")
    engine = FloatEngine(checkpoint)
    greedy_bos = seq_len - 1 if greedy_bos is None else min(greedy_bos, seq_len - 1)  # default: the whole context
    bos = reference_text(engine, continuation(engine, [1], greedy_bos, Sampler(SamplerConfig(temperature=0))),
                         0, True)
    texts = []
    for i, prompt in enumerate(prompts):
        prompt_tokens = tokenizer.encode(prompt)
        n = min(positions, seq_len - len(prompt_tokens))
        if n < 1:
            raise UsageError(f"prompt {i + 1} is {len(prompt_tokens)} tokens: it leaves no room in the "
                             f"{seq_len}-token context; shorten it")
        for config in (SamplerConfig(temperature=0), SamplerConfig(temperature=1.0, topp=0.9, seed=i + 1)):
            tokens = continuation(engine, prompt_tokens, n, Sampler(config))
            texts.append(reference_text(engine, tokens, len(prompt_tokens) - 1, config.temperature == 0))
        if progress is not None:
            progress(1)
    return bos, texts


def score(engine: Engine, bos: Text, texts: Sequence[Text]) -> tuple[int, list[PositionStats], list[int]]:
    """The greedy prefix from BOS, each text's statistics, and each greedy text's identical prefix.

    The greedy prefix after a prompt is where the teacher-forced argmax first differs on the greedy text: up to
    there both engines saw the same tokens, so it is also where the engine's own greedy text departs.
    """
    runs = [teacher_forced(text, engine) for text in texts]
    prefixes = [first_difference(r.agree) for r, text in zip(runs, texts) if text.greedy]
    return first_difference(teacher_forced(bos, engine).agree), runs, prefixes


def evaluate(checkpoint: Checkpoint, tokenizer: Tokenizer, scheme: str = DEFAULT_SCHEME,
             prompts: Sequence[str] = BUILTIN_PROMPTS, positions: int = 128, greedy_bos: int | None = None,
             progress: Callable[[int], None] | None = None) -> EvalReport:
    """Score the fixed engine on each prompt's float greedy continuation and on a sampled one (seeded per prompt),
    and on the calibration stories the quantizer tuned on (from BOS, other seeds: disjoint from the prompts' texts)."""
    bos, texts = eval_texts(checkpoint, tokenizer, prompts, positions, greedy_bos, progress)
    packed = quantize_model(checkpoint, tokenizer, scheme)
    engine = FixedEngine(packed)
    prefix_bos, runs, prefixes = score(engine, bos, texts)
    float_engine = FloatEngine(checkpoint)
    calibration = [teacher_forced(reference_text(float_engine, tokens, 0, False), engine)
                   for tokens in calibration_texts(checkpoint)]
    agree = np.concatenate([r.agree for r in runs])
    kl = np.concatenate([r.kl for r in runs])
    width = max(r.agree.size for r in runs)
    by_position = [[r for r in runs if r.agree.size > j] for j in range(width)]
    return EvalReport(
        scheme=scheme, prompts=len(prompts), positions=positions,
        top1_agreement=float(agree.mean()), mean_kl=float(kl.mean()),
        greedy_prefix_bos=prefix_bos, greedy_tokens_bos=len(bos.tokens) - 1,
        greedy_prefix_mean=float(np.mean(prefixes)),
        ppl_float=float(np.exp(np.concatenate([r.nll_float for r in runs]).mean())),
        ppl_fixed=float(np.exp(np.concatenate([r.nll_fixed for r in runs]).mean())),
        packed_bytes=packed_bytes(packed), float_bytes=checkpoint.file_bytes,
        calibration_top1_agreement=float(np.concatenate([r.agree for r in calibration]).mean()),
        calibration_mean_kl=float(np.concatenate([r.kl for r in calibration]).mean()),
        agreement_by_position=[float(np.mean([r.agree[j] for r in rs])) for j, rs in enumerate(by_position)],
        kl_by_position=[float(np.mean([r.kl[j] for r in rs])) for j, rs in enumerate(by_position)],
    )


WEIGHTS = ("embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "classifier")


@dataclass(frozen=True)
class AblationRow:
    label: str
    exact: tuple[str, ...]  # the steps computed in float64 instead of the fixed engine's integers
    top1_agreement: float
    mean_kl: float
    greedy_prefix_bos: int
    greedy_prefix_mean: float

    def as_dict(self) -> dict:
        return asdict(self)


def ablations() -> list[tuple[str, frozenset[str]]]:
    """The error budget's rows: the fixed engine, each step alone made exact, each step alone left integer, the
    weights as one group, and every step exact (the float model in float64)."""
    steps = frozenset(STEPS)
    rows = [("fixed engine (no step exact)", frozenset())]
    rows += [(f"exact {step}", frozenset({step})) for step in STEPS]
    rows += [("exact all weights", frozenset(WEIGHTS)), ("integer weights only", steps - frozenset(WEIGHTS))]
    rows += [(f"integer {step} only", steps - {step}) for step in STEPS]
    rows.append(("all exact (float64 model)", steps))
    return rows


def ablate(checkpoint: Checkpoint, tokenizer: Tokenizer, scheme: str = DEFAULT_SCHEME,
           prompts: Sequence[str] = BUILTIN_PROMPTS, positions: int = 128, greedy_bos: int | None = None,
           rows: Sequence[tuple[str, frozenset[str]]] | None = None,
           progress: Callable[[int], None] | None = None) -> list[AblationRow]:
    """The error budget: the fixed engine's texts scored with each row's steps swapped for exact float ones."""
    bos, texts = eval_texts(checkpoint, tokenizer, prompts, positions, greedy_bos)
    packed = quantize_model(checkpoint, tokenizer, scheme)
    report = []
    for label, exact in ablations() if rows is None else rows:
        prefix_bos, runs, prefixes = score(SimulatedEngine(checkpoint, packed, exact), bos, texts)
        report.append(AblationRow(label, tuple(s for s in STEPS if s in exact),
                                  float(np.concatenate([r.agree for r in runs]).mean()),
                                  float(np.concatenate([r.kl for r in runs]).mean()), prefix_bos,
                                  float(np.mean(prefixes))))
        if progress is not None:
            progress(1)
    return report


def require_matplotlib() -> None:
    """Refuse a plot before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sectorllm[plot]'") from None


def plot_reports(reports: Sequence[EvalReport], path: str | os.PathLike) -> None:
    """Agreement and KL against position after the prompt, one panel each, one line per scheme (needs matplotlib)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for report in reports:
        top.plot(report.agreement_by_position, label=f"scheme {report.scheme}")
        bottom.plot(report.kl_by_position, label=f"scheme {report.scheme}")
    lowest = min(min(r.agreement_by_position) for r in reports)
    top.set_ylabel("top-1 agreement")
    top.set_ylim(min(0.9, lowest) - 0.01, 1.005)
    top.set_title(f"fixed vs float: {reports[0].prompts} prompts x 2 texts")
    top.legend()
    bottom.set_ylabel("mean KL(float || fixed), nats")
    bottom.set_xlabel("position after the prompt")
    bottom.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, (png.getvalue(),))
