"""The fixed-point engine: integers only, close to the float engine, greedy-identical on stories260K, its sampler."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba.core import types

from sectorllm.checkpoint import load_checkpoint
from sectorllm.config import ModelConfig
from sectorllm.engines import fixed
from sectorllm.engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig, sample_fixed
from sectorllm.engines.float32 import FloatEngine
from sectorllm.packed import read_packed, write_packed
from sectorllm.quantize import quantize
from sectorllm.sampling import SamplerConfig, XorShiftRng
from sectorllm.tokenizer import BOS, Tokenizer, load_tokenizer

from .conftest import make_checkpoint

GREEDY_TOKENS = 300
NEAR_TIE = 0.01  # a float top-two logit gap that int8 weights' logit errors (~0.01-0.05) may flip either way


@pytest.fixture(scope="module")
def stories(stories260k, tok512, tmp_path_factory):
    """stories260K through the packed file, as the boot engine will see it."""
    checkpoint = load_checkpoint(stories260k)
    path = tmp_path_factory.mktemp("fixed") / "stories260K.sllm"
    write_packed(path, quantize(checkpoint, load_tokenizer(tok512))[0])
    return checkpoint, read_packed(path)


def _greedy(engine, n: int) -> list[int]:
    tokens = [BOS]
    for pos in range(n):
        tokens.append(int(np.argmax(engine.forward(tokens[-1], pos))))
    return tokens[1:]


def test_greedy_from_bos_matches_the_float_engine_up_to_its_first_near_tie(stories):
    checkpoint, packed = stories
    engine, want, gaps = FloatEngine(checkpoint), [BOS], []
    for pos in range(GREEDY_TOKENS):
        logits = engine.forward(want[-1], pos).astype(np.float64)
        top2 = np.sort(logits)[-2:]
        gaps.append(top2[1] - top2[0])
        want.append(int(np.argmax(logits)))
    safe = int(np.argmax(np.array(gaps) < NEAR_TIE))  # stories260K: token 185 (gap 0.004)
    assert safe >= 150
    assert _greedy(FixedEngine(packed), safe) == want[1:safe + 1]


def test_teacher_forced_logits_track_the_float_engine(stories):
    checkpoint, packed = stories
    float_engine, fixed_engine = FloatEngine(checkpoint), FixedEngine(packed)
    tokens = [BOS] + _greedy(FloatEngine(checkpoint), 127)
    agree, kl = 0, 0.0
    for pos, token in enumerate(tokens):
        want = float_engine.forward(token, pos).astype(np.float64)
        got = fixed_engine.forward(token, pos)
        assert got.dtype == np.int32
        log_p = want - want.max() - np.log(np.exp(want - want.max()).sum())
        got = got / 65536.0
        log_q = got - got.max() - np.log(np.exp(got - got.max()).sum())
        kl += float(np.sum(np.exp(log_p) * (log_p - log_q))) / len(tokens)
        agree += int(np.argmax(want) == np.argmax(got))
    assert agree >= 0.98 * len(tokens) and kl < 0.002


def _tokenizer_for(vocab_size: int) -> Tokenizer:
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b" "] + [b"w%d" % i for i in range(vocab_size - len(pieces) - 1)]
    return Tokenizer(pieces, np.zeros(vocab_size, dtype=np.float32), 8, {p: i for i, p in enumerate(pieces)})


@pytest.mark.parametrize("config", [
    ModelConfig(dim=288, hidden_dim=768, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=32),
    ModelConfig(dim=48, hidden_dim=100, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=300, seq_len=24,
                shared_classifier=False),
    ModelConfig(dim=64, hidden_dim=172, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=260, seq_len=20),
], ids=["stories15M-shaped", "gqa-separate-classifier", "one-head"])
def test_random_models_of_other_shapes(tmp_path, config):
    checkpoint = load_checkpoint(make_checkpoint(tmp_path, config, version=1))
    path = tmp_path / "m.sllm"
    write_packed(path, quantize(checkpoint, _tokenizer_for(config.vocab_size))[0])
    fixed_engine, float_engine = FixedEngine(read_packed(path)), FloatEngine(checkpoint)
    tokens = [BOS, 5, 17, 300 % config.vocab_size, 9, 42, 42, 7]
    for pos, token in enumerate(tokens):
        want = float_engine.forward(token, pos).astype(np.float64)
        got = fixed_engine.forward(token, pos) / 65536.0
        assert np.corrcoef(want, got)[0, 1] > 0.998
        assert np.abs(got - want).max() < 0.15 * want.std()


def test_prefill_is_forward_at_each_position(stories):
    """The batched pass gives the logits and the cache of forward() one position at a time, and decoding goes on."""
    _, packed = stories
    tokens = [BOS] + np.random.default_rng(8).integers(3, 512, 59).tolist()
    one_by_one = FixedEngine(packed)
    for pos, token in enumerate(tokens):
        last = one_by_one.forward(token, pos).copy()
    batched = FixedEngine(packed)
    np.testing.assert_array_equal(batched.prefill(tokens), last)
    for name in ("key_q", "key_d", "value_q", "value_d"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(one_by_one, name))
    np.testing.assert_array_equal(batched.forward(7, len(tokens)), one_by_one.forward(7, len(tokens)))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two cores")
def test_threads_change_nothing(stories):
    """A prompt long enough for the threaded matrix products: one and two threads give the same integers."""
    _, packed = stories
    tokens = [BOS] + np.random.default_rng(9).integers(3, 512, 149).tolist()
    one, two = FixedEngine(packed, threads=1), FixedEngine(packed, threads=2)
    np.testing.assert_array_equal(one.prefill(tokens), two.prefill(tokens))
    np.testing.assert_array_equal(one.key_q, two.key_q)


def _jitted() -> list:
    return [f for f in vars(fixed).values() if isinstance(f, numba.core.registry.CPUDispatcher)]


def _is_float(t: types.Type) -> bool:
    if isinstance(t, (types.Float, types.Complex)):
        return True
    if isinstance(t, types.Array):
        return _is_float(t.dtype)
    if isinstance(t, (types.BaseTuple,)):
        return any(_is_float(e) for e in t.types)
    return False


def test_no_float_between_file_and_token(stories):
    _, packed = stories
    engine = FixedEngine(packed)
    sampler = FixedSampler(FixedSamplerConfig.from_sampler_config(SamplerConfig(0.8, 0.9, 20, seed=5)), packed)
    token = BOS
    for pos in range(4):
        token = sampler.sample(engine.forward(token, pos))
    arrays = [*engine._w, *engine._buf, engine.key_q, engine.key_d, engine.value_q, engine.value_d]
    assert all(np.issubdtype(a.dtype, np.integer) for a in arrays)
    assert all(isinstance(v, int) for v in engine._params)
    checked: set = set()
    while True:  # compiling a caller types its callees: repeat until no new signature shows up
        todo = [(d, sig) for d in _jitted() for sig in d.signatures if (d.__name__, sig) not in checked]
        if not todo:
            break
        for dispatcher, signature in todo:
            assert not any(_is_float(t) for t in signature), (dispatcher.__name__, signature)
            fresh = numba.njit(dispatcher.py_func)  # a cached compile keeps no types: compile again to see them
            fresh.compile(signature)
            typemap = fresh.overloads[signature].type_annotation.typemap
            floats = {name: t for name, t in typemap.items() if _is_float(t)}
            assert not floats, (dispatcher.__name__, floats)
            checked.add((dispatcher.__name__, signature))
    assert {name for name, _ in checked} >= {"forward_tokens", "matmul", "rmsnorm", "isqrt62", "quantize_act", "rope",
                                             "store_kv", "attention", "exp_lookup", "silu_lookup", "sample_fixed"}


def _reference_sample(logits: list[int], table: list[int], shift: int, inv_t: int, topp: int, topk: int,
                      minp: int, coin: int) -> int:
    """docs/arithmetic.md "sample", written again from the text with Python integers."""
    top = max(logits)
    weights = []
    for value in logits:
        d = (top - value) * inv_t >> 16
        i, f = d >> shift, d & ((1 << shift) - 1)
        weight = 0 if i >= len(table) - 1 else table[i] + ((table[i + 1] - table[i]) * f >> shift)
        weights.append(0 if weight < minp else weight)
    order = list(range(len(logits)))
    keep = len(order)
    if topk or topp < 65536:
        order.sort(key=lambda i: (-weights[i], i))
        if 0 < topk < keep:
            keep = topk
        if topp < 65536:
            threshold, running = sum(weights) * topp >> 16, 0
            for j in range(keep):
                running += weights[order[j]]
                if running > threshold:
                    keep = j + 1
                    break
    target = coin * sum(weights[i] for i in order[:keep]) >> 24
    running = 0
    for i in order[:keep]:
        running += weights[i]
        if target < running:
            return i
    raise AssertionError("the coin fell past the kept weights")


@pytest.mark.parametrize("temperature, topp, topk, minp",
                         [(1.0, 1.0, 0, 0), (0.8, 0.9, 0, 0), (1.3, 1.0, 5, 0), (0.5, 0.5, 40, 0), (1.5, 1.0, 0, 0.05),
                          (1.0, 0.9, 10, 0.2)])
def test_sampler_follows_the_written_rule(stories, temperature, topp, topk, minp):
    table = stories[1].exp_table
    shift = stories[1].quant.exp_shift
    config = FixedSamplerConfig.from_sampler_config(SamplerConfig(temperature, topp, topk, minp, seed=1))
    rng = np.random.default_rng(7)
    coins = XorShiftRng(99)
    for _ in range(20):
        logits = rng.integers(-5 << 16, 5 << 16, size=97).astype(np.int32)
        logits[rng.integers(97)] = logits.max()  # a tie at the top
        coin = coins.next_u32() >> 8
        want = _reference_sample(logits.tolist(), table.tolist(), shift, config.inv_temperature_q16,
                                 config.topp_q16, config.topk, config.minp_q16, coin)
        assert sample_fixed(logits, table, shift, config.inv_temperature_q16, config.topp_q16,
                            config.topk, config.minp_q16, coin) == want


def test_greedy_sampler_takes_the_first_of_tied_maxima(stories):
    sampler = FixedSampler(FixedSamplerConfig.from_sampler_config(SamplerConfig(0.0)), stories[1])
    assert sampler.sample(np.array([3, 9, 1, 9, 9], dtype=np.int32)) == 1


def test_seeded_sampling_repeats_and_follows_the_seed(stories):
    _, packed = stories

    def run(seed: int) -> list[int]:
        engine = FixedEngine(packed)
        sampler = FixedSampler(FixedSamplerConfig.from_sampler_config(SamplerConfig(1.0, 0.9, seed=seed)), packed)
        tokens = [BOS]
        for pos in range(40):
            tokens.append(sampler.sample(engine.forward(tokens[-1], pos)))
        return tokens

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_sampler_settings_become_q16_integers():
    config = FixedSamplerConfig.from_sampler_config(SamplerConfig(0.5, 0.9, 3, seed=8))
    assert config == FixedSamplerConfig(131072, 58982, 3, 8)
    assert FixedSamplerConfig.from_sampler_config(SamplerConfig(1.0, minp=0.1)).minp_q16 == 6554
