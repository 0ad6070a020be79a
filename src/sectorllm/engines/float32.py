"""Float32 engine: run.c's forward pass in numba (decode) and numpy (batched prefill), token-identical to run.c."""

from __future__ import annotations

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from ..checkpoint import Checkpoint, Weights
from ..config import ModelConfig

# Below this width, BLAS threads cost more than they save (and stall when the other core is busy).
_SINGLE_THREAD_BLAS_BELOW_DIM = 256
# Dot products may be reassociated (vectorized), as run.c's -Ofast build does and still gives the same tokens;
# norms and softmax keep run.c's float32 order: they say fastmath=False, or numba would compile them with the
# flags of the first caller (the sampler shares softmax, and its coin is compared against these exact sums).
_REASSOCIATE = {"reassoc", "nsz", "contract"}


@numba.njit(cache=True, fastmath=_REASSOCIATE)
def matvec(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out = w @ x for w (d, n), x (n,)."""
    for i in range(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[i, j] * x[j]
        out[i] = acc


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


@numba.njit(cache=True)
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


@numba.njit(cache=True)
def rope(vec: np.ndarray, cos: np.ndarray, sin: np.ndarray, head_size: int) -> None:
    """Rotate each (even, odd) pair of every head by its position's angle."""
    for i in range(0, vec.shape[0], 2):
        c = cos[(i % head_size) // 2]
        s = sin[(i % head_size) // 2]
        v0 = vec[i]
        v1 = vec[i + 1]
        vec[i] = v0 * c - v1 * s
        vec[i + 1] = v0 * s + v1 * c


@numba.njit(cache=True, fastmath=_REASSOCIATE)
def attention(out: np.ndarray, q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, pos: int,
              att: np.ndarray) -> None:
    """Each query head of q (dim,) attends over positions 0..pos of one layer's cache (n_kv_heads, head_size, seq_len).

    The cache is stored (kv head, i, t) so that the loops over positions t run over contiguous memory.
    """
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    n_heads = q.shape[0] // head_size
    kv_mul = n_heads // n_kv_heads
    for h in range(n_heads):
        kv_head = h // kv_mul
        scores = att[:pos + 1]
        scores[:] = 0
        for i in range(head_size):
            qi = q[h * head_size + i]
            keys = key_cache[kv_head, i]
            for t in range(pos + 1):
                scores[t] += qi * keys[t]
        scores /= np.sqrt(np.float32(head_size))
        softmax(scores)
        for i in range(head_size):
            values = value_cache[kv_head, i]
            acc = np.float32(0.0)
            for t in range(pos + 1):
                acc += scores[t] * values[t]
            out[h * head_size + i] = acc


@numba.njit(cache=True)
def causal_attention(out: np.ndarray, q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                     att: np.ndarray) -> None:
    """attention() for every prompt position: row t of q (T, dim) sees positions 0..t."""
    for t in range(q.shape[0]):
        attention(out[t], q[t], key_cache, value_cache, t, att)


@numba.njit(cache=True, fastmath=_REASSOCIATE)
def forward_token(token: int, pos: int, w: tuple, rope_cos: np.ndarray, rope_sin: np.ndarray,
                  key_cache: np.ndarray, value_cache: np.ndarray, buf: tuple) -> np.ndarray:
    """One position of the transformer, run.c's forward(): returns the logits buffer."""
    emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls = w
    x, xb, xb2, hb, hb2, q, k, v, att, logits = buf
    n_layers, n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1], key_cache.shape[2]
    dim, hidden_dim = x.shape[0], hb.shape[0]
    x[:] = emb[token]
    for l in range(n_layers):
        # attention: q, k, v of this position; k and v go into the cache
        rmsnorm(xb, x, rms_att[l])
        matvec(q, wq[l], xb)
        matvec(k, wk[l], xb)
        matvec(v, wv[l], xb)
        rope(q, rope_cos[pos], rope_sin[pos], head_size)
        rope(k, rope_cos[pos], rope_sin[pos], head_size)
        key_cache[l, :, :, pos] = k.reshape(n_kv_heads, head_size)
        value_cache[l, :, :, pos] = v.reshape(n_kv_heads, head_size)
        attention(xb, q, key_cache[l], value_cache[l], pos, att)
        matvec(xb2, wo[l], xb)
        for i in range(dim):
            x[i] += xb2[i]
        # feed-forward: w2(silu(w1 x) * w3 x)
        rmsnorm(xb, x, rms_ffn[l])
        matvec(hb, w1[l], xb)
        matvec(hb2, w3[l], xb)
        for i in range(hidden_dim):
            val = hb[i]
            val *= np.float32(1.0) / (np.float32(1.0) + np.exp(-val))
            hb[i] = val * hb2[i]
        matvec(xb2, w2[l], hb)
        for i in range(dim):
            x[i] += xb2[i]
    rmsnorm(x, x, rms_final)
    matvec(logits, wcls, x)
    return logits


def _rmsnorm_rows(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    ss = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + np.float32(1e-5)
    return weight * (x / np.sqrt(ss))


class FloatEngine:
    """run.c's Transformer: weights, RoPE tables, a KV cache and preallocated activation buffers."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        c: ModelConfig = checkpoint.config
        self.config = c
        self.weights: Weights = checkpoint.weights
        w = self.weights
        self._w = (w.token_embedding_table, w.rms_att_weight, w.wq, w.wk, w.wv, w.wo,
                   w.rms_ffn_weight, w.w1, w.w2, w.w3, w.rms_final_weight, w.wcls)
        self.rope_cos, self.rope_sin = rope_tables(c.seq_len, c.head_size)
        self.key_cache = np.zeros((c.n_layers, c.n_kv_heads, c.head_size, c.seq_len), dtype=np.float32)
        self.value_cache = np.zeros_like(self.key_cache)
        f32 = lambda n: np.zeros(n, dtype=np.float32)  # noqa: E731
        # x, xb, xb2, hb, hb2, q, k, v, att, logits
        self._buf = (f32(c.dim), f32(c.dim), f32(c.dim), f32(c.hidden_dim), f32(c.hidden_dim),
                     f32(c.dim), f32(c.kv_dim), f32(c.kv_dim), f32(c.seq_len), f32(c.vocab_size))
        self._blas = ThreadpoolController() if c.dim < _SINGLE_THREAD_BLAS_BELOW_DIM else None
        self.forward(0, 0)  # load (or compile) the jitted code now, so it is not timed as decoding

    def forward(self, token: int, pos: int) -> np.ndarray:
        return forward_token(token, pos, self._w, self.rope_cos, self.rope_sin,
                             self.key_cache, self.value_cache, self._buf)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """All prompt positions at once: the same math as forward_token, with matrix-matrix products."""
        if self._blas is not None:
            with self._blas.limit(limits=1, user_api="blas"):
                return self._prefill(tokens)
        return self._prefill(tokens)

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        c, w = self.config, self.weights
        T, hs = len(tokens), c.head_size
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = w.token_embedding_table[np.asarray(tokens)].astype(np.float32)
        attended = np.empty((T, c.dim), dtype=np.float32)
        for l in range(c.n_layers):
            xb = _rmsnorm_rows(x, w.rms_att_weight[l])
            q = _rope_rows((xb @ w.wq[l].T).reshape(T, c.n_heads, hs), cos, sin)
            k = _rope_rows((xb @ w.wk[l].T).reshape(T, c.n_kv_heads, hs), cos, sin)
            v = (xb @ w.wv[l].T).reshape(T, c.n_kv_heads, hs)
            self.key_cache[l, :, :, :T] = k.transpose(1, 2, 0)
            self.value_cache[l, :, :, :T] = v.transpose(1, 2, 0)
            causal_attention(attended, q.reshape(T, c.dim), self.key_cache[l], self.value_cache[l], self._buf[-2])
            x = x + attended @ w.wo[l].T
            xb = _rmsnorm_rows(x, w.rms_ffn_weight[l])
            gate = xb @ w.w1[l].T
            x = x + (gate / (np.float32(1.0) + np.exp(-gate)) * (xb @ w.w3[l].T)) @ w.w2[l].T
        logits = self._buf[-1]
        logits[:] = w.wcls @ _rmsnorm_rows(x[-1], w.rms_final_weight)
        return logits


def _rope_rows(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate (T, heads, head_size) pairs by per-position angles (T, head_size/2)."""
    v0, v1 = v[..., 0::2], v[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(v)
    out[..., 0::2] = v0 * c - v1 * s
    out[..., 1::2] = v0 * s + v1 * c
    return out
