"""Calibration for the quantizer: the float model's own stories, and what each matrix reads while it tells them."""

from __future__ import annotations

import numba
import numpy as np

from .checkpoint import Checkpoint
from .config import RMS_EPS
from .engines.float32 import FloatEngine, rope_tables
from .generate import continuation
from .sampling import Sampler, SamplerConfig

# Stories sampled from BOS, never the evaluation prompts (sectorllm eval's texts start from its prompts and use seeds
# 1..50): what the quantizer tunes on and what eval measures are disjoint.
CALIBRATION_SEEDS = tuple(range(1001, 1009))
CALIBRATION_LENGTH = 512  # tokens per story at most (BOS included): the whole context of stories260K

GRAM_INPUTS = ("wqkv", "wo", "w13", "w2")  # the packed matrices whose inputs are recorded


def calibration_texts(checkpoint: Checkpoint, seeds: tuple[int, ...] = CALIBRATION_SEEDS) -> list[list[int]]:
    """One story per seed, sampled by the float engine from BOS at temperature 1 to the end of the context (or to
    CALIBRATION_LENGTH tokens)."""
    engine = FloatEngine(checkpoint)
    n = min(checkpoint.config.seq_len, CALIBRATION_LENGTH) - 1
    return [continuation(engine, [1], n, Sampler(SamplerConfig(temperature=1.0, topp=1.0, seed=seed)))
            for seed in seeds]


def rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """run.c's RMSNorm over the last axis, in float64."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * g


def rotate(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE on (T, heads, head_size) with (T, head_size / 2) tables."""
    v0, v1 = v[..., 0::2], v[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.stack([v0 * c - v1 * s, v0 * s + v1 * c], axis=-1).reshape(v.shape)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


@numba.njit(cache=True)
def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_mul: int) -> np.ndarray:
    """Softmax attention of q (T, heads, hs), already scaled, over k and v (T, kv_heads, hs) at positions <= t."""
    T, n_heads, hs = q.shape
    out = np.zeros_like(q)
    scores = np.empty(T)
    for h in range(n_heads):
        g = h // kv_mul
        for t in range(T):
            top = -np.inf
            for s in range(t + 1):
                dot = 0.0
                for i in range(hs):
                    dot += q[t, h, i] * k[s, g, i]
                scores[s] = dot
                top = max(top, dot)
            total = 0.0
            for s in range(t + 1):
                scores[s] = np.exp(scores[s] - top)
                total += scores[s]
            for s in range(t + 1):
                for i in range(hs):
                    out[t, h, i] += scores[s] / total * v[s, g, i]
    return out


def forward_text(checkpoint: Checkpoint, tokens: list[int]) -> np.ndarray:
    """The float model in float64 over a whole text at once (causal attention): logits (T, vocab_size)."""
    w = checkpoint.weights
    x = rmsnorm(_residual_stream(checkpoint, tokens), np.asarray(w.rms_final_weight, dtype=np.float64))
    return x @ np.asarray(w.wcls, dtype=np.float64).T


def _residual_stream(checkpoint: Checkpoint, tokens: list[int],
                     grams: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The residual stream (T, dim) after the last layer, in float64.

    grams: adds, per layer, sum over positions of x x^T of the inputs of the packed matrices (GRAM_INPUTS:
    wqkv and w13 read the RMSNorm outputs, wo the attention output, w2 the SwiGLU output).
    """
    c, w = checkpoint.config, checkpoint.weights
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    T, hs, kv_mul = len(tokens), c.head_size, c.n_heads // c.n_kv_heads
    cos, sin = (f(t)[:T] for t in rope_tables(c.seq_len, hs))

    def record(name: str, layer: int, x: np.ndarray) -> None:
        if grams is not None:
            grams[name][layer] += x.T @ x

    x = f(w.token_embedding_table)[tokens]
    for layer in range(c.n_layers):
        xb = rmsnorm(x, f(w.rms_att_weight[layer]))
        record("wqkv", layer, xb)
        q = rotate((xb @ f(w.wq[layer]).T).reshape(T, c.n_heads, hs), cos, sin)
        k = rotate((xb @ f(w.wk[layer]).T).reshape(T, c.n_kv_heads, hs), cos, sin)
        v = (xb @ f(w.wv[layer]).T).reshape(T, c.n_kv_heads, hs)
        out = _causal_attention(q / np.sqrt(hs), k, v, kv_mul).reshape(T, c.dim)
        record("wo", layer, out)
        x = x + out @ f(w.wo[layer]).T
        xb = rmsnorm(x, f(w.rms_ffn_weight[layer]))
        record("w13", layer, xb)
        gate, up = xb @ f(w.w1[layer]).T, xb @ f(w.w3[layer]).T
        hb = silu(gate) * up
        record("w2", layer, hb)
        x = x + hb @ f(w.w2[layer]).T
    return x


def input_grams(checkpoint: Checkpoint, texts: list[list[int]]) -> dict[str, np.ndarray]:
    """Per packed matrix, (n_layers, n, n): the mean over every position of the texts of x x^T of its input x."""
    c = checkpoint.config
    grams = {name: np.zeros((c.n_layers, n, n)) for name, n in
             zip(GRAM_INPUTS, (c.dim, c.dim, c.dim, c.hidden_dim))}
    for tokens in texts:
        _residual_stream(checkpoint, tokens, grams)  # the classifier reads nothing calibrated
    positions = sum(len(t) for t in texts)
    return {name: g / positions for name, g in grams.items()}
