"""Float32 engine: run.c's forward pass in numba, bit-identical logits to run.c built with gcc -O3."""

from __future__ import annotations

import numba
import numpy as np

from ..checkpoint import Checkpoint, Weights
from ..config import ModelConfig

# Every function pins fastmath=False (numba would otherwise compile it with its first caller's flags): run.c's -O3
# build on baseline x86-64 rounds every float32 multiply and add on its own, in source order, and only the same
# operations in the same order give the same bits. numba calls glibc's expf/powf/cosf/sinf, as run.c does.


@numba.njit(cache=True, fastmath=False)
def matvec(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out = w @ x for w (d, n), x (n,), each row summed over j in order as run.c's matmul does.

    Eight rows at a time, a d/8 apart: eight independent sums the CPU overlaps (one sum would wait on each
    addition), each reading its own long run of memory, which the hardware prefetches.
    """
    d, n = w.shape
    m = d // 8
    for i in range(m):
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for j in range(n):
            xj = x[j]
            s0 += w[i, j] * xj
            s1 += w[i + m, j] * xj
            s2 += w[i + 2 * m, j] * xj
            s3 += w[i + 3 * m, j] * xj
            s4 += w[i + 4 * m, j] * xj
            s5 += w[i + 5 * m, j] * xj
            s6 += w[i + 6 * m, j] * xj
            s7 += w[i + 7 * m, j] * xj
        out[i], out[i + m], out[i + 2 * m], out[i + 3 * m] = s0, s1, s2, s3
        out[i + 4 * m], out[i + 5 * m], out[i + 6 * m], out[i + 7 * m] = s4, s5, s6, s7
    for i in range(8 * m, d):
        s = np.float32(0.0)
        for j in range(n):
            s += w[i, j] * x[j]
        out[i] = s


@numba.njit(cache=True, fastmath=False)
def matmul(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out = x @ w.T for x (T, n), w (d, n): matvec of each of the T positions, the same sums in the same order.

    For several positions x is transposed, so that out[:, i] += w[i, j] * x[:, j], for j in order, runs vectorized
    over the positions; four weight rows and two steps of j per pass share the loads of x and of the partial sums.
    """
    T, n = x.shape
    if T == 1:
        matvec(out[0], w, x[0])
        return
    d = w.shape[0]
    xt = np.ascontiguousarray(x.T)
    acc = np.empty((4, T), dtype=np.float32)
    a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
    for i in range(0, d - d % 4, 4):
        acc[:] = 0
        for j in range(0, n - n % 2, 2):
            u, v = xt[j], xt[j + 1]
            w0u, w1u, w2u, w3u = w[i, j], w[i + 1, j], w[i + 2, j], w[i + 3, j]
            w0v, w1v, w2v, w3v = w[i, j + 1], w[i + 1, j + 1], w[i + 2, j + 1], w[i + 3, j + 1]
            for t in range(T):
                a0[t] = (a0[t] + w0u * u[t]) + w0v * v[t]
                a1[t] = (a1[t] + w1u * u[t]) + w1v * v[t]
                a2[t] = (a2[t] + w2u * u[t]) + w2v * v[t]
                a3[t] = (a3[t] + w3u * u[t]) + w3v * v[t]
        for j in range(n - n % 2, n):
            for r in range(4):
                for t in range(T):
                    acc[r, t] += w[i + r, j] * xt[j, t]
        out[:, i:i + 4] = acc.T
    for i in range(d - d % 4, d):
        a0[:] = 0
        for j in range(n):
            for t in range(T):
                a0[t] += w[i, j] * xt[j, t]
        out[:, i] = a0


@numba.njit(cache=True, fastmath=False)
def softmax(x: np.ndarray) -> None:
    """In place, float32, in run.c's order: subtract the max, expf, sequential sum, divide."""
    max_val = x[0]
    for i in range(1, x.shape[0]):
        if x[i] > max_val:
            max_val = x[i]
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        x[i] = np.exp(x[i] - max_val)
        total += x[i]
    for i in range(x.shape[0]):
        x[i] /= total


@numba.njit(cache=True, fastmath=False)
def rmsnorm(out: np.ndarray, x: np.ndarray, weight: np.ndarray) -> None:
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    ss /= np.float32(x.shape[0])
    ss += np.float32(1e-5)
    ss = np.float32(1.0) / np.sqrt(ss)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (ss * x[j])


@numba.njit(cache=True, fastmath=False)
def rope_tables(seq_len: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (seq_len, head_size/2) of pos * 10000^(-2i/head_size), computed in float32 as run.c does."""
    cos = np.empty((seq_len, head_size // 2), dtype=np.float32)
    sin = np.empty((seq_len, head_size // 2), dtype=np.float32)
    for i in range(head_size // 2):
        freq = np.float32(1.0) / np.float32(np.power(np.float32(10000.0), np.float32(2 * i) / np.float32(head_size)))
        for pos in range(seq_len):
            angle = np.float32(pos) * freq
            cos[pos, i] = np.cos(angle)
            sin[pos, i] = np.sin(angle)
    return cos, sin


@numba.njit(cache=True, fastmath=False)
def rope(vec: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_size: int) -> None:
    """Rotate each (even, odd) pair of every head by its position's angle."""
    for i in range(0, vec.shape[0], 2):
        c = cos[(i % head_size) // 2]
        s = sin[(i % head_size) // 2]
        v0 = vec[i]
        v1 = vec[i + 1]
        vec[i] = v0 * c - v1 * s
        vec[i + 1] = v0 * s + v1 * c


@numba.njit(cache=True, fastmath=False)
def attention(out: np.ndarray, q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, pos: int,
              att: np.ndarray) -> None:
    """Each query head of q (dim,) attends over positions 0..pos of one layer's cache, as run.c's head loop.

    Keys are stored (kv head, i, t) and values (kv head, t, i): run.c sums each score over i and the weighted
    values over t, and these layouts keep those orders while the inner loops run over contiguous memory.
    """
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    n_heads = q.shape[0] // head_size
    kv_mul = n_heads // n_kv_heads
    scale = np.sqrt(np.float32(head_size))
    scores = att[:pos + 1]
    for h in range(n_heads):
        keys, values = key_cache[h // kv_mul], value_cache[h // kv_mul]
        scores[:] = 0
        for i in range(head_size):
            qi = q[h * head_size + i]
            for t in range(pos + 1):
                scores[t] += qi * keys[i, t]
        for t in range(pos + 1):
            scores[t] /= scale
        softmax(scores)
        head = out[h * head_size:(h + 1) * head_size]
        head[:] = 0
        # four positions per pass over the head, added one after the other: run.c's order, a quarter of the passes
        last = pos + 1 - (pos + 1) % 4
        for t in range(0, last, 4):
            a0, a1, a2, a3 = scores[t], scores[t + 1], scores[t + 2], scores[t + 3]
            v0, v1, v2, v3 = values[t], values[t + 1], values[t + 2], values[t + 3]
            for i in range(head_size):
                head[i] = (((head[i] + a0 * v0[i]) + a1 * v1[i]) + a2 * v2[i]) + a3 * v3[i]
        for t in range(last, pos + 1):
            a = scores[t]
            for i in range(head_size):
                head[i] += a * values[t, i]


@numba.njit(cache=True, fastmath=False)
def forward_tokens(tokens: np.ndarray, pos: int, w: tuple, rope_cos: np.ndarray, rope_sin: np.ndarray,
                   key_cache: np.ndarray, value_cache: np.ndarray, buf: tuple, att: np.ndarray,
                   logits: np.ndarray) -> np.ndarray:
    """run.c's forward() for tokens at positions pos, pos+1, ...: fills the cache, returns the last logits.

    Row t of each activation buffer is position pos + t: the steps of one position run row by row, the matrix
    products for all rows at once (matmul), with the same float32 operations in the same order either way.
    """
    emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls = w
    x, xb, xb2, hb, hb2, q, k, v = buf
    n_layers, n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1], key_cache.shape[2]
    T = tokens.shape[0]
    for t in range(T):
        x[t] = emb[tokens[t]]
    for l in range(n_layers):
        # attention: q, k, v of each position; k and v go into the cache
        for t in range(T):
            rmsnorm(xb[t], x[t], rms_att[l])
        matmul(q, wq[l], xb)
        matmul(k, wk[l], xb)
        matmul(v, wv[l], xb)
        for t in range(T):
            rope(q[t], rope_cos[pos + t], rope_sin[pos + t], head_size)
            rope(k[t], rope_cos[pos + t], rope_sin[pos + t], head_size)
            key_cache[l, :, :, pos + t] = k[t].reshape(n_kv_heads, head_size)
            value_cache[l, :, pos + t, :] = v[t].reshape(n_kv_heads, head_size)
        for t in range(T):
            attention(xb[t], q[t], key_cache[l], value_cache[l], pos + t, att)
        matmul(xb2, wo[l], xb)
        x += xb2
        # feed-forward: w2(silu(w1 x) * w3 x)
        for t in range(T):
            rmsnorm(xb[t], x[t], rms_ffn[l])
        matmul(hb, w1[l], xb)
        matmul(hb2, w3[l], xb)
        for t in range(T):
            for i in range(hb.shape[1]):
                val = hb[t, i]
                val *= np.float32(1.0) / (np.float32(1.0) + np.exp(-val))
                hb[t, i] = val * hb2[t, i]
        matmul(xb2, w2[l], hb)
        x += xb2
    rmsnorm(x[T - 1], x[T - 1], rms_final)
    matvec(logits, wcls, x[T - 1])
    return logits


class FloatEngine:
    """run.c's Transformer: weights, RoPE tables, a KV cache and preallocated activation buffers."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        c: ModelConfig = checkpoint.config
        self.config = c
        w: Weights = checkpoint.weights
        self._w = (w.token_embedding_table, w.rms_att_weight, w.wq, w.wk, w.wv, w.wo,
                   w.rms_ffn_weight, w.w1, w.w2, w.w3, w.rms_final_weight, w.wcls)
        self.rope_cos, self.rope_sin = rope_tables(c.seq_len, c.head_size)
        self.key_cache = np.zeros((c.n_layers, c.n_kv_heads, c.head_size, c.seq_len), dtype=np.float32)
        self.value_cache = np.zeros((c.n_layers, c.n_kv_heads, c.seq_len, c.head_size), dtype=np.float32)
        self._token = np.zeros(1, dtype=np.int64)
        self._buf = self._buffers(1)
        self._att = np.zeros(c.seq_len, dtype=np.float32)
        self._logits = np.zeros(c.vocab_size, dtype=np.float32)
        self.forward(0, 0)  # load (or compile) the jitted code now, so it is not timed as decoding

    def _buffers(self, positions: int) -> tuple:
        """x, xb, xb2, hb, hb2, q, k, v: one row per position."""
        c = self.config
        return tuple(np.zeros((positions, n), dtype=np.float32)
                     for n in (c.dim, c.dim, c.dim, c.hidden_dim, c.hidden_dim, c.dim, c.kv_dim, c.kv_dim))

    def forward(self, token: int, pos: int) -> np.ndarray:
        self._token[0] = token
        return forward_tokens(self._token, pos, self._w, self.rope_cos, self.rope_sin,
                              self.key_cache, self.value_cache, self._buf, self._att, self._logits)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """All prompt positions in one pass, with batched matrix products: the logits of forward() one by one."""
        if not 0 < len(tokens) <= self.config.seq_len:
            raise ValueError(f"prefill takes 1 to {self.config.seq_len} tokens, not {len(tokens)}")
        return forward_tokens(np.asarray(tokens, dtype=np.int64), 0, self._w, self.rope_cos, self.rope_sin,
                              self.key_cache, self.value_cache, self._buffers(len(tokens)), self._att, self._logits)
