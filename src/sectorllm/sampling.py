"""Choosing the next token: run.c's xorshift generator and sampler (argmax, temperature, top-p), plus top-k and min-p."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np

from .engines.softmax import softmax
from .errors import UsageError

_U64 = (1 << 64) - 1
# Below this temperature every engine picks the argmax. Dividing logits by a tiny temperature overflows float32
# (inf - inf = NaN in the softmax, so run.c prints garbage) and the fixed-point sampler holds 65536/temperature in
# 31 bits; above it the distribution is already one-hot for any logits these models give.
GREEDY_BELOW = 1e-4
MAX_TEMPERATURE = 65536.0  # the fixed-point sampler's round(65536 / temperature) must stay >= 1
MAX_TOPK = (1 << 31) - 1  # the boot image's u32 field and the engines' int32 arithmetic


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) means greedy argmax
    topp: float = 0.9  # nucleus threshold; 1 or 0 samples from the whole distribution, as run.c
    topk: int = 0  # our extension: keep only the k likeliest tokens (0 = off)
    minp: float = 0.0  # our extension: drop tokens below minp * the top probability (0 = off)
    seed: int = 0  # 0 takes the seed from the clock, as run.c does

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def topp_on(self) -> bool:
        return 0 < self.topp < 1

    def validate(self) -> None:
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails this too
            raise UsageError(f"temperature {self.temperature} is outside 0 .. {MAX_TEMPERATURE:g}: use 0 (greedy) "
                             f"or e.g. 0.8")
        if not 0 <= self.topp <= 1:
            raise UsageError(f"top-p {self.topp} is outside [0, 1]: use e.g. 0.9, or 0 or 1 to turn it off")
        if not 0 <= self.topk <= MAX_TOPK:
            raise UsageError(f"top-k {self.topk} is outside 0 .. {MAX_TOPK}: use 0 (off) or a count of tokens")
        if not 0 <= self.minp < 1:
            raise UsageError(f"min-p {self.minp} is outside [0, 1): use e.g. 0.05, or 0 to turn it off")
        if not 0 <= self.seed < 1 << 64:
            raise UsageError(f"seed {self.seed} does not fit 64 bits: use 1 .. 2**64-1 (0 = from the clock)")


def run_c_seed(value: int) -> int:
    """The generator state run.c's `-s value` gives: atoi keeps a signed 32-bit int, widened to 64 bits."""
    low = value & 0xFFFFFFFF
    return (low - (1 << 32) if low >= 1 << 31 else low) & _U64


def clock_seed() -> int:
    """run.c's fallback seed: the current Unix time in seconds."""
    return int(time.time()) & 0xFFFFFFFF


@numba.njit(cache=True)
def next_u32(state: np.ndarray) -> int:
    """Advance the generator held in state[0] (uint64) and return its next 32-bit output."""
    s = state[0]
    s ^= s >> np.uint64(12)
    s ^= s << np.uint64(25)
    s ^= s >> np.uint64(27)
    state[0] = s
    return (s * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32)


class XorShiftRng:
    """run.c's xorshift64* generator: the same seed gives the same stream of coins."""

    def __init__(self, seed: int) -> None:
        self.state = np.array([seed & _U64], dtype=np.uint64)  # an array, so that compiled code advances it too

    def next_u32(self) -> int:
        return int(next_u32(self.state))

    def next_f32(self) -> np.float32:
        """A coin in [0, 1): the top 24 bits of a u32 over 2**24, as run.c's random_f32."""
        return np.float32(self.next_u32() >> 8) / np.float32(16777216.0)


@numba.njit(cache=True)
def _keep_topk_minp(probs: np.ndarray, topk: int, minp: float) -> np.float32:
    """Zero the tokens outside top-k and below min-p; returns the probability mass kept."""
    if topk > 0 and topk < probs.shape[0]:
        kth = np.sort(probs)[probs.shape[0] - topk]
        for i in range(probs.shape[0]):
            if probs[i] < kth:
                probs[i] = 0
    if minp > 0:
        floor = np.float32(minp) * probs.max()
        for i in range(probs.shape[0]):
            if probs[i] < floor:
                probs[i] = 0
    kept = np.float32(0.0)
    for i in range(probs.shape[0]):
        kept += probs[i]
    return kept


@numba.njit(cache=True)
def _sample_mult(probs: np.ndarray, coin: np.float32) -> int:
    cdf = np.float32(0.0)
    for i in range(probs.shape[0]):
        cdf += probs[i]
        if coin < cdf:
            return i
    return probs.shape[0] - 1


@numba.njit(cache=True)
def _sample_topp(probs: np.ndarray, topp: np.float32, coin: np.float32) -> int:
    """run.c's sample_topp: drop tokens under (1-topp)/(n-1), sort descending, cut after the mass exceeds topp."""
    n = probs.shape[0]
    cutoff = (np.float32(1.0) - topp) / np.float32(n - 1)
    candidates = np.nonzero(probs >= cutoff)[0]
    order = candidates[np.argsort(-probs[candidates], kind="mergesort")]
    cumulative = np.float32(0.0)
    last = order.shape[0] - 1
    for i in range(order.shape[0]):
        cumulative += probs[order[i]]
        if cumulative > topp:
            last = i
            break
    r = coin * cumulative
    cdf = np.float32(0.0)
    for i in range(last + 1):
        cdf += probs[order[i]]
        if r < cdf:
            return order[i]
    return order[last]


@numba.njit(cache=True)
def sample_probabilities(logits: np.ndarray, temperature: np.float32, topp: np.float32,
                         topk: int, minp: float, coin: np.float32) -> int:
    """Temperature, softmax, optional top-k/min-p, then top-p or plain sampling; logits are overwritten."""
    for i in range(logits.shape[0]):
        logits[i] /= temperature
    softmax(logits)
    kept = np.float32(1.0)
    if topk > 0 or minp > 0:
        kept = _keep_topk_minp(logits, topk, minp)
    if topp <= 0 or topp >= 1:
        return _sample_mult(logits, coin * kept)  # top-p rescales by its own kept mass
    return _sample_topp(logits, topp, coin)


@numba.njit(cache=True)
def sample_logits(logits: np.ndarray, scratch: np.ndarray, temperature: np.float32, topp: np.float32, topk: int,
                  minp: float, rng_state: np.ndarray) -> int:
    """run.c's sample(): the first largest logit when greedy, else one coin from the generator and a draw."""
    if temperature == 0:
        return np.argmax(logits)
    coin = np.float32(next_u32(rng_state) >> np.uint64(8)) / np.float32(16777216.0)
    scratch[:] = logits
    return sample_probabilities(scratch, temperature, topp, topk, minp, coin)


class Sampler:
    """Turns logits into token ids; holds the generator state, so one Sampler per generation."""

    def __init__(self, config: SamplerConfig) -> None:
        config.validate()
        self.config = config
        self.seed = config.seed or clock_seed()
        self.rng = XorShiftRng(self.seed)
        # temperature (0 when greedy), top-p, top-k and min-p as the compiled sampler takes them: made once, since
        # a decoding step passes them every token
        self.settings = (np.float32(0 if config.greedy else config.temperature), np.float32(config.topp), config.topk,
                         config.minp)
        # load (or compile) the jitted sampler now, with a throwaway generator, so it is not timed as decoding
        sample_logits(np.zeros(2, np.float32), np.zeros(2, np.float32), *self.settings, np.ones(1, np.uint64))

    def sample(self, logits: np.ndarray) -> int:
        return int(sample_logits(logits, np.empty_like(logits, dtype=np.float32), *self.settings, self.rng.state))
