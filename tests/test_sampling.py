"""Sampler: run.c's rules for argmax and top-p, and our top-k / min-p extensions."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest

from sectorllm.checkpoint import load_checkpoint
from sectorllm.engines.float32 import FloatEngine
from sectorllm.engines.softmax import softmax
from sectorllm.errors import UsageError
from sectorllm.sampling import Sampler, SamplerConfig, XorShiftRng, run_c_seed


def test_xorshift_against_an_independent_transcription():
    """xorshift64* as run.c writes it, with explicit 64-bit masking, for several seeds."""
    for seed in (1, 42, 2**63 + 5):
        state, mine = seed, XorShiftRng(seed)
        for _ in range(100):
            state ^= state >> 12
            state = (state ^ (state << 25)) % 2**64
            state ^= state >> 27
            assert mine.next_u32() == (state * 0x2545F4914F6CDD1D % 2**64) >> 32


def test_greedy_takes_first_maximum_and_draws_no_coin():
    sampler = Sampler(SamplerConfig(temperature=0, seed=9))
    state = int(sampler.rng.state[0])
    assert sampler.sample(np.array([1, 5, 5, 2], np.float32)) == 1
    assert sampler.rng.state[0] == state


def test_topk_one_and_minp_near_one_are_argmax():
    logits = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    best = int(np.argmax(logits))
    for config in (SamplerConfig(1.0, 1.0, topk=1, seed=3), SamplerConfig(1.0, 0.9, minp=0.999, seed=4)):
        sampler = Sampler(config)
        assert {sampler.sample(logits) for _ in range(50)} == {best}


def test_topk_draws_only_among_the_k_likeliest():
    logits = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    top5 = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(SamplerConfig(2.0, 1.0, topk=5, seed=11))
    draws = {sampler.sample(logits) for _ in range(300)}
    assert draws <= top5 and len(draws) > 1


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.1, 0.05, 0.05], np.float32)
    sampler = Sampler(SamplerConfig(1.0, 0.7, seed=2))
    draws = {sampler.sample(np.log(probs)) for _ in range(400)}
    assert draws == {0, 1}  # 0.5 + 0.3 is the first sum past 0.7


@pytest.mark.parametrize("config", [SamplerConfig(temperature=-1), SamplerConfig(temperature=float("nan")),
                                    SamplerConfig(temperature=1e6), SamplerConfig(topp=-0.1), SamplerConfig(topp=1.5),
                                    SamplerConfig(topk=-2), SamplerConfig(topk=2**63), SamplerConfig(minp=1.0),
                                    SamplerConfig(seed=-1)])
def test_bad_settings_are_refused(config):
    with pytest.raises(UsageError):
        Sampler(config)


def test_softmax_is_run_c_sequential_float32_even_after_the_engine_ran(stories260k):
    """run.c's softmax: libm expf, a sequential float32 sum, a division, whichever jitted code called it first
    (numba compiles a function without explicit flags with the flags of its first caller)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    FloatEngine(load_checkpoint(stories260k)).forward(5, 1)
    x = (np.random.default_rng(0).standard_normal(32000) * 0.5).astype(np.float32)
    mine = x.copy()
    softmax(mine)
    exps = np.array([libm.expf(float(v - x.max())) for v in x], np.float32)
    total = np.float32(0)
    for value in exps:
        total = np.float32(total + value)
    assert np.array_equal(mine, exps / total)


def test_seed_is_read_as_run_c_atoi_reads_it():
    """atoi gives a signed 32-bit int; assigning it to run.c's unsigned long long state sign-extends it."""
    assert run_c_seed(42) == 42
    assert run_c_seed(2**31 - 1) == 2**31 - 1
    assert run_c_seed(2**31) == 2**64 - 2**31
    assert run_c_seed(-5) == 2**64 - 5
    assert run_c_seed(2**32 + 7) == 7
