"""Float engine: run.c's float32 arithmetic to the bit, batched or token by token; other shapes load and generate."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from dataclasses import replace

import numba
import numpy as np
import pytest

from sectorllm.checkpoint import Checkpoint, load_checkpoint, random_weights, write_checkpoint
from sectorllm.config import STORIES_SHAPES, ModelConfig
from sectorllm.engines.float32 import FloatEngine, attention, block_rows, matmul, padded
from sectorllm.engines.softmax import expf
from sectorllm.generate import Generation
from sectorllm.sampling import Sampler, SamplerConfig
from sectorllm.tokenizer import load_tokenizer

from .conftest import make_checkpoint, run_cli

GQA = ModelConfig(dim=48, hidden_dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=512, seq_len=64)
# widths that leave remainders for every blocking of rows and columns in matvec and matmul
ODD = ModelConfig(dim=36, hidden_dim=91, n_layers=2, n_heads=3, n_kv_heads=3, vocab_size=509, seq_len=64,
                  shared_classifier=False)


def _sequential_logits(engine: FloatEngine, tokens: list[int]) -> np.ndarray:
    for pos, token in enumerate(tokens):
        logits = engine.forward(token, pos)
    return logits.copy()


@pytest.mark.parametrize("source", ["stories260K", "gqa", "separate_classifier", "odd"])
def test_prefill_is_bit_identical_to_token_by_token(source, stories260k):
    """The batched pass adds the same float32 products in the same order: same logits and cache, to the bit."""
    if source == "stories260K":
        checkpoint = load_checkpoint(stories260k)
    else:
        config = {"gqa": GQA, "separate_classifier": replace(GQA, n_kv_heads=6, shared_classifier=False),
                  "odd": ODD}[source]
        checkpoint = Checkpoint(config, random_weights(config, seed=7, scale=0.3), version=1)
    tokens = [1] + np.random.default_rng(3).integers(3, checkpoint.config.vocab_size, 40).tolist()
    one_by_one = FloatEngine(checkpoint)
    expected = _sequential_logits(one_by_one, tokens)
    batched = FloatEngine(checkpoint)
    assert np.array_equal(batched.prefill(tokens), expected)
    assert np.array_equal(batched.key_cache, one_by_one.key_cache)
    assert np.array_equal(batched.value_cache, one_by_one.value_cache)
    assert np.array_equal(batched.forward(7, len(tokens)), one_by_one.forward(7, len(tokens)))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two cores")
def test_threads_change_nothing(stories260k):
    """A prompt long enough for the threaded products and attention gives one and two threads the same bits."""
    checkpoint = load_checkpoint(stories260k)
    tokens = [1] + np.random.default_rng(4).integers(3, 512, 149).tolist()
    one, two = FloatEngine(checkpoint, threads=1), FloatEngine(checkpoint, threads=2)
    assert np.array_equal(one.prefill(tokens), two.prefill(tokens))
    assert np.array_equal(one.value_cache, two.value_cache)
    assert np.array_equal(_sequential_logits(FloatEngine(checkpoint, threads=2), tokens), one.prefill(tokens))


# A classifier of 2**20 multiply-adds: past PARALLEL_WORK, so one decoding step runs a threaded product.
WIDE = ModelConfig(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=16384, seq_len=32)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two cores")
def test_two_threads_decode_in_a_fresh_process():
    """The threaded products run inside compiled calls: in a process where nothing else started numba's threads,
    the engine starts them, and two threads step to the same logits and token as one. Twice: the second process
    loads the compiled code from numba's cache, where no compilation starts the threads on the way."""
    code = ("import numpy as np\n"
            "from sectorllm.checkpoint import Checkpoint, random_weights\n"
            "from sectorllm.config import ModelConfig\n"
            "from sectorllm.engines.float32 import FloatEngine\n"
            "from sectorllm.sampling import Sampler, SamplerConfig\n"
            f"config = {WIDE!r}\n"
            "ck = Checkpoint(config, random_weights(config, 3), version=1)\n"
            "two, one = FloatEngine(ck, 2), FloatEngine(ck, 1)\n"
            "steps = [(e.step(5, 0, Sampler(SamplerConfig(temperature=0))), e._logits.copy()) for e in (two, one)]\n"
            "print(steps[0][0] == steps[1][0] and np.array_equal(steps[0][1], steps[1][1]))\n")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert proc.stdout.strip() == b"True"


def test_threads_beyond_the_cores_are_refused(stories260k, tok512):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--threads", "999", "-n", "5")
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and b"threads 999" in proc.stderr and b"Traceback" not in proc.stderr


def _libm_expf():
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return libm.expf


def _run_c_matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """run.c's matmul transcribed one float32 operation at a time (no reassociation, no fused multiply-add)."""
    out = np.zeros(w.shape[0], np.float32)
    for i in range(w.shape[0]):
        val = np.float32(0)
        for j in range(w.shape[1]):
            val = np.float32(val + np.float32(w[i, j] * x[j]))
        out[i] = val
    return out


def _run_c_attention(q: np.ndarray, k_rows: np.ndarray, v_rows: np.ndarray, pos: int, n_heads: int,
                     n_kv_heads: int) -> np.ndarray:
    """run.c's head loop over cache rows (position, kv_dim), with libm expf for its softmax."""
    expf = _libm_expf()
    head_size = q.shape[0] // n_heads
    kv_mul = n_heads // n_kv_heads
    xb = np.zeros(q.shape[0], np.float32)
    for h in range(n_heads):
        qh = q[h * head_size:(h + 1) * head_size]
        kv = slice((h // kv_mul) * head_size, (h // kv_mul + 1) * head_size)
        att = np.zeros(pos + 1, np.float32)
        for t in range(pos + 1):
            score = np.float32(0)
            for i in range(head_size):
                score = np.float32(score + np.float32(qh[i] * k_rows[t, kv][i]))
            att[t] = np.float32(score / np.sqrt(np.float32(head_size)))
        att = np.array([expf(float(a - att.max())) for a in att], np.float32)
        total = np.float32(0)
        for a in att:
            total = np.float32(total + a)
        att = att / total
        for t in range(pos + 1):
            for i in range(head_size):
                xb[h * head_size + i] = np.float32(xb[h * head_size + i] + np.float32(att[t] * v_rows[t, kv][i]))
    return xb


@pytest.mark.parametrize("rows, width", [(21, 97), (8, 64), (5, 33), (130, 19)])
def test_matmul_is_run_c_to_the_bit(rows, width):
    """One position (decoding) and several (a prompt, in tiles of positions) against run.c's matmul."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, width)).astype(np.float32)
    x = rng.standard_normal((7, width)).astype(np.float32)
    expected = np.array([_run_c_matmul(w, row) for row in x])
    for positions in (1, 7):
        out = np.full((positions, padded(rows)), np.nan, np.float32)
        matmul(out, block_rows(w), x[:positions], 1)
        assert np.array_equal(out[:, :rows], expected[:positions])


def test_expf_is_glibc_expf_to_the_bit():
    """Every 4099th float32 bit pattern (all signs, magnitudes, infinities, NaNs) and the edges, against libm."""
    bits = np.concatenate([np.arange(0, 1 << 32, 4099, dtype=np.uint64),
                           np.array([0x7F800000, 0xFF800000, 0x42B17217, 0x42B17218, 0xC2CFF1B4, 0xC2CFF1B5,
                                     0x80000000, 0x00000001])]).astype(np.uint32)
    xs = bits.view(np.float32)
    libm_expf = _libm_expf()
    every = np.arange(0, xs.size, 97)
    with np.errstate(over="ignore", invalid="ignore"):  # infinities and NaNs among the inputs
        expected = np.exp(xs.astype(np.float64)).astype(np.float32)  # glibc's expf but for rare roundings...
    expected[every] = [libm_expf(float(x)) for x in xs[every]]  # ...so a sample is glibc's own
    got = _expf_all(xs)
    same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    assert same[every].all()
    assert same.mean() > 0.999  # glibc's expf is not correctly rounded: it differs from the double's rounding


@numba.njit(fastmath=False)
def _expf_all(xs: np.ndarray) -> np.ndarray:
    out = np.empty_like(xs)
    for i in range(xs.shape[0]):
        out[i] = expf(xs[i])
    return out


@pytest.mark.parametrize("n_heads, n_kv_heads, pos", [(4, 4, 0), (4, 4, 30), (4, 2, 17), (6, 3, 21), (3, 1, 9)])
def test_attention_is_run_c_to_the_bit(n_heads, n_kv_heads, pos):
    """Heads in fours and the rest (softmax totals four at a time), positions in eights and the rest."""
    head_size, seq_len = 14, 40
    rng = np.random.default_rng(pos)
    q = rng.standard_normal(n_heads * head_size).astype(np.float32)
    k_rows = rng.standard_normal((seq_len, n_kv_heads * head_size)).astype(np.float32)
    v_rows = rng.standard_normal((seq_len, n_kv_heads * head_size)).astype(np.float32)
    key_cache = np.ascontiguousarray(k_rows.reshape(seq_len, n_kv_heads, head_size).transpose(1, 2, 0))
    out = np.empty((1, q.shape[0]), np.float32)
    attention(out, q[None], key_cache, v_rows, pos, np.empty((1, n_heads, seq_len), np.float32), 1)
    assert np.array_equal(out[0], _run_c_attention(q, k_rows, v_rows, pos, n_heads, n_kv_heads))


def test_legacy_and_v1_files_generate_the_same_tokens(tmp_path, tok512):
    tokenizer = load_tokenizer(tok512, 512)
    results = []
    for version in (0, 1):
        engine = FloatEngine(load_checkpoint(make_checkpoint(tmp_path, GQA, version=version, seed=2)))
        sampler = Sampler(SamplerConfig(temperature=0.9, seed=5))
        results.append(Generation(engine, tokenizer, "Once upon a time", 40, sampler).result.generated_tokens)
    assert results[0] == results[1] and len(results[0]) > 0


def test_context_end_stops_cleanly(tmp_path, tok512):
    """A zero final norm makes every logit 0, so greedy picks token 0 forever and only the context can stop it."""
    config = replace(GQA, seq_len=24)
    weights = replace(random_weights(config), rms_final_weight=np.zeros(config.dim, np.float32))
    path = tmp_path / "flat.bin"
    write_checkpoint(path, config, weights)
    proc = run_cli("run", str(path), "-z", str(tok512), "-t", "0", "-n", "100", "-i", "Hi", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["stop_reason"] == "context"
    assert len(result["prompt_tokens"]) - 1 + len(result["generated_tokens"]) == 24
    assert b"context" in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("shape", ["stories15M", "stories110M"])
def test_random_published_shapes_load_and_generate(tmp_path, llama_tokenizer, shape):
    path = make_checkpoint(tmp_path, STORIES_SHAPES[shape], seed=1)
    proc = run_cli("run", str(path), "-z", str(llama_tokenizer), "-n", "6", "-s", "3", "-i", "Once", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"][0] == 1
    assert len(result["generated_tokens"]) == 6 - (len(result["prompt_tokens"]) - 1) or result["stop_reason"] in (
        "bos", "eos")
    assert all(0 <= t < 32000 for t in result["generated_tokens"])


def test_tokens_stream_before_the_run_ends(stories260k, tok512):
    engine = FloatEngine(load_checkpoint(stories260k))
    generation = Generation(engine, load_tokenizer(tok512, 512), "", 50, Sampler(SamplerConfig(temperature=0)))
    first = next(iter(generation))
    assert first.generated and first.text
    assert generation._result is None  # nothing more has been computed yet
