"""Float32 engine: run.c's forward pass in numba, bit-identical logits to run.c built with gcc -O3."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ..checkpoint import Checkpoint, Weights
from ..config import ModelConfig
from ..sampling import Sampler, sample_logits
from . import PARALLEL_WORK, thread_count
from .prefetch import LINE, prefetch
from .softmax import expf, softmax

# Every function pins fastmath=False (numba would otherwise compile it with its first caller's flags): run.c's -O3
# build on baseline x86-64 rounds every float32 multiply and add on its own, in source order, and only the same
# operations in the same order give the same bits. Speed comes from doing many such sums side by side, never from
# reordering one.

# Rows per block of the weight layout: a block stores its rows' j-th elements next to each other, so the sums of
# BLOCK rows advance together, one vector operation per step of j, each row still summed over j in order.
BLOCK = 64
# Positions per tile of a batched matrix product: one tile reads each weight vector once from memory for all of them.
TILE = 8
# How far ahead of its loads a product asks for weights (float32 elements): 8 KB, measured best for matrices that
# stream from memory (the 15M and 110M shapes' decoding), where it gives about 1.6x over the hardware prefetcher alone.
# Matrices under PREFETCH_FROM elements (256 KB) are left to the hardware: stories260K's whole model stays in cache,
# where the hints only cost instructions.
PREFETCH = 2048
PREFETCH_FROM = 1 << 16


def block_rows(w: np.ndarray) -> np.ndarray:
    """(..., d, n) row-major to (..., ceil(d/BLOCK), n, BLOCK): element [b, j, r] is w[b*BLOCK + r, j]; zero rows pad."""
    d, n = w.shape[-2:]
    nb = -(-d // BLOCK)
    padded = np.zeros(w.shape[:-2] + (nb * BLOCK, n), dtype=np.float32)
    padded[..., :d, :] = w
    blocked = padded.reshape(w.shape[:-2] + (nb, BLOCK, n)).swapaxes(-1, -2)
    return np.ascontiguousarray(blocked)


def padded(n: int) -> int:
    """Room for n outputs of a blocked matrix: whole blocks, since a block writes all its rows."""
    return -(-n // BLOCK) * BLOCK


@numba.njit(cache=True, fastmath=False)
def _tile(out: np.ndarray, wb: np.ndarray, x: np.ndarray, b: int, t0: int, t1: int) -> None:
    """out[t, rows of block b] = x[t] @ those rows, for t0 <= t < t1: every row's sum in order over j.

    Sixteen steps of j per pass load and store each partial sum once; the BLOCK rows run as vectors. The weights
    are read as one flat stream at constant offsets (no per-row strides to recompute). On a large matrix the first
    tile asks for the weights PREFETCH elements ahead of each pass.
    """
    n = wb.shape[1]
    stream = wb.reshape(-1)
    lo, base = b * BLOCK, b * n * BLOCK
    ahead = base + PREFETCH if t0 == 0 and stream.shape[0] >= PREFETCH_FROM else stream.shape[0]
    for t in range(t0, t1):
        out[t, lo:lo + BLOCK] = 0
    j = 0
    while j + 16 <= n:
        if ahead + (j + 32) * BLOCK <= stream.shape[0]:
            for k in range((j + 16) * BLOCK, (j + 32) * BLOCK, LINE // 4):
                prefetch(stream, ahead + k)
        w = stream[base + j * BLOCK:base + (j + 16) * BLOCK]
        for t in range(t0, t1):
            xt = x[t, j:j + 16]
            x0, x1, x2, x3, x4, x5, x6, x7 = xt[0], xt[1], xt[2], xt[3], xt[4], xt[5], xt[6], xt[7]
            x8, x9, x10, x11, x12, x13, x14, x15 = xt[8], xt[9], xt[10], xt[11], xt[12], xt[13], xt[14], xt[15]
            a = out[t, lo:lo + BLOCK]
            for r in range(BLOCK):
                half = (((((((a[r] + w[r] * x0) + w[BLOCK + r] * x1) + w[2 * BLOCK + r] * x2)
                          + w[3 * BLOCK + r] * x3) + w[4 * BLOCK + r] * x4) + w[5 * BLOCK + r] * x5)
                       + w[6 * BLOCK + r] * x6) + w[7 * BLOCK + r] * x7
                a[r] = (((((((half + w[8 * BLOCK + r] * x8) + w[9 * BLOCK + r] * x9) + w[10 * BLOCK + r] * x10)
                           + w[11 * BLOCK + r] * x11) + w[12 * BLOCK + r] * x12) + w[13 * BLOCK + r] * x13)
                        + w[14 * BLOCK + r] * x14) + w[15 * BLOCK + r] * x15
        j += 16
    while j < n:
        w = stream[base + j * BLOCK:base + (j + 1) * BLOCK]
        for t in range(t0, t1):
            x0 = x[t, j]
            a = out[t, lo:lo + BLOCK]
            for r in range(BLOCK):
                a[r] += w[r] * x0
        j += 1


@numba.njit(cache=True, fastmath=False, parallel=True)
def matmul(out: np.ndarray, wb: np.ndarray, x: np.ndarray, threads: int) -> None:
    """out (T, padded(d)) = x (T, n) @ w.T for w blocked by block_rows: run.c's matmul for each of the T rows.

    The (row block, position tile) pieces are independent: large products split them into threads runs of
    consecutive pieces, one per thread.
    """
    T, n = x.shape
    nb = wb.shape[0]
    tiles = -(-T // TILE)
    pieces = nb * tiles
    if threads == 1 or nb * BLOCK * n * T < PARALLEL_WORK:
        for p in range(pieces):
            b, t0 = p // tiles, p % tiles * TILE
            _tile(out, wb, x, b, t0, min(t0 + TILE, T))
    else:
        for c in prange(threads):
            for p in range(c * pieces // threads, (c + 1) * pieces // threads):
                b, t0 = p // tiles, p % tiles * TILE
                _tile(out, wb, x, b, t0, min(t0 + TILE, T))


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
def largest(x: np.ndarray) -> np.float32:
    """The largest element, as eight interleaved running maxima (a maximum is the same in any order; where a NaN
    would make the order matter, softmax's total is NaN whatever the maximum is)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x[0]
    t = 0
    while t + 8 <= x.shape[0]:
        m0, m1, m2, m3 = max(m0, x[t]), max(m1, x[t + 1]), max(m2, x[t + 2]), max(m3, x[t + 3])
        m4, m5, m6, m7 = max(m4, x[t + 4]), max(m5, x[t + 5]), max(m6, x[t + 6]), max(m7, x[t + 7])
        t += 8
    while t < x.shape[0]:
        m0 = max(m0, x[t])
        t += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@numba.njit(cache=True, fastmath=False)
def attend(out: np.ndarray, q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int,
           att: np.ndarray) -> None:
    """Every query head of one position q (dim,) over cache positions 0..pos: run.c's head loop.

    Keys are cached (kv head, i, t) and values (t, kv head, i). run.c sums each score over i, each softmax total
    over t and each output over t; the loops keep those orders and run the vectors across the independent sums
    (scores over t, outputs over i), eight terms of a sum per pass so that a partial sum is loaded and stored once
    per eight additions; the output passes take the heads in turn, so that their sums' chains overlap.
    att (n_heads, seq_len) is scratch.
    """
    n_kv_heads, head_size = keys.shape[0], keys.shape[1]
    n_heads = q.shape[0] // head_size
    kv_mul = n_heads // n_kv_heads
    scale = np.sqrt(np.float32(head_size))
    n = pos + 1
    for h in range(n_heads):
        scores, k, qh = att[h, :n], keys[h // kv_mul], q[h * head_size:(h + 1) * head_size]
        scores[:] = 0
        i = 0
        while i + 8 <= head_size:
            q0, q1, q2, q3, q4, q5, q6, q7 = qh[i], qh[i + 1], qh[i + 2], qh[i + 3], qh[i + 4], qh[i + 5], \
                qh[i + 6], qh[i + 7]
            k0, k1, k2, k3, k4, k5, k6, k7 = k[i], k[i + 1], k[i + 2], k[i + 3], k[i + 4], k[i + 5], k[i + 6], \
                k[i + 7]
            for t in range(n):
                scores[t] = (((((((scores[t] + q0 * k0[t]) + q1 * k1[t]) + q2 * k2[t]) + q3 * k3[t]) + q4 * k4[t])
                              + q5 * k5[t]) + q6 * k6[t]) + q7 * k7[t]
            i += 8
        while i < head_size:
            qi, ki = qh[i], k[i]
            for t in range(n):
                scores[t] += qi * ki[t]
            i += 1
        for t in range(n):
            scores[t] /= scale
        top = largest(scores)
        for t in range(n):
            scores[t] = expf(scores[t] - top)
    totals = np.empty(4, dtype=np.float32)
    h = 0
    while h < n_heads:  # each softmax total in order over t, four heads' chains side by side
        a0, a1, a2, a3 = att[h, :n], att[min(h + 1, n_heads - 1), :n], att[min(h + 2, n_heads - 1), :n], \
            att[min(h + 3, n_heads - 1), :n]
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for t in range(n):
            s0 += a0[t]
            s1 += a1[t]
            s2 += a2[t]
            s3 += a3[t]
        totals[0], totals[1], totals[2], totals[3] = s0, s1, s2, s3
        for r in range(min(4, n_heads - h)):
            a, total = att[h + r, :n], totals[r]
            for t in range(n):
                a[t] /= total
        h += 4
    out[:] = 0
    t = 0
    while t < n:
        step = min(8, n - t)
        for h in range(n_heads):
            o, a, lo = out[h * head_size:(h + 1) * head_size], att[h, t:t + step], (h // kv_mul) * head_size
            hi = lo + head_size
            if step == 8:
                a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
                v0, v1, v2, v3 = values[t, lo:hi], values[t + 1, lo:hi], values[t + 2, lo:hi], values[t + 3, lo:hi]
                v4, v5, v6, v7 = values[t + 4, lo:hi], values[t + 5, lo:hi], values[t + 6, lo:hi], \
                    values[t + 7, lo:hi]
                for i in range(head_size):
                    o[i] = (((((((o[i] + a0 * v0[i]) + a1 * v1[i]) + a2 * v2[i]) + a3 * v3[i]) + a4 * v4[i])
                             + a5 * v5[i]) + a6 * v6[i]) + a7 * v7[i]
            else:
                for u in range(step):
                    au, vu = a[u], values[t + u, lo:hi]
                    for i in range(head_size):
                        o[i] += au * vu[i]
        t += step


@numba.njit(cache=True, fastmath=False, parallel=True)
def attention(out: np.ndarray, q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, pos: int,
              att: np.ndarray, threads: int) -> None:
    """Rows t of q (T, dim) at positions pos + t attend over one layer's cache, each as attend().

    att (T, n_heads, seq_len) is scratch. Many rows (a prompt) spread over threads threads; one row (decoding)
    stays on this one.
    """
    T = q.shape[0]
    if T == 1 or threads == 1:
        for t in range(T):
            attend(out[t], q[t], key_cache, value_cache, pos + t, att[t])
    else:
        for c in prange(threads):
            for t in range(c, T, threads):  # interleaved: later rows attend over more positions
                attend(out[t], q[t], key_cache, value_cache, pos + t, att[t])


@numba.njit(cache=True, fastmath=False)
def forward_tokens(tokens: np.ndarray, pos: int, w: tuple, rope_cos: np.ndarray, rope_sin: np.ndarray,
                   key_cache: np.ndarray, value_cache: np.ndarray, buf: tuple, logits: np.ndarray,
                   threads: int) -> np.ndarray:
    """run.c's forward() for tokens at positions pos, pos+1, ...: fills the cache, returns the last logits.

    Row t of each activation buffer is position pos + t: the steps of one position run row by row, the matrix
    products for all rows at once (matmul), with the same float32 operations in the same order either way.
    """
    emb, rms_att, wqkv, wo, rms_ffn, w13, w2, rms_final, wcls = w
    x, xb, xb2, hb, qkv, att, out = buf
    n_layers, n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1], key_cache.shape[2]
    T, dim = tokens.shape[0], emb.shape[1]
    kv_dim = n_kv_heads * head_size
    hidden_dim = w2.shape[2]
    for t in range(T):
        x[t] = emb[tokens[t]]
    for l in range(n_layers):
        # attention: q, k, v of each position (one product, three row ranges); k and v go into the cache
        for t in range(T):
            rmsnorm(xb[t, :dim], x[t], rms_att[l])
        matmul(qkv, wqkv[l], xb[:, :dim], threads)
        for t in range(T):
            q, k, v = qkv[t, :dim], qkv[t, dim:dim + kv_dim], qkv[t, dim + kv_dim:dim + 2 * kv_dim]
            rope(q, rope_cos[pos + t], rope_sin[pos + t], head_size)
            rope(k, rope_cos[pos + t], rope_sin[pos + t], head_size)
            key_cache[l, :, :, pos + t] = k.reshape(n_kv_heads, head_size)
            value_cache[l, pos + t] = v
        attention(xb, qkv[:, :dim], key_cache[l], value_cache[l], pos, att, threads)
        matmul(xb2, wo[l], xb[:, :dim], threads)
        for t in range(T):
            for i in range(dim):
                x[t, i] += xb2[t, i]
        # feed-forward: w2(silu(w1 x) * w3 x), w1 and w3 as one product (gate rows, then up rows)
        for t in range(T):
            rmsnorm(xb[t, :dim], x[t], rms_ffn[l])
        matmul(hb, w13[l], xb[:, :dim], threads)
        for t in range(T):
            for i in range(hidden_dim):
                val = hb[t, i]
                val *= np.float32(1.0) / (np.float32(1.0) + expf(-val))
                hb[t, i] = val * hb[t, hidden_dim + i]
        matmul(xb2, w2[l], hb[:, :hidden_dim], threads)
        for t in range(T):
            for i in range(dim):
                x[t, i] += xb2[t, i]
    rmsnorm(x[T - 1], x[T - 1], rms_final)
    matmul(out, wcls, x[T - 1:], threads)
    logits[:] = out[0, :logits.shape[0]]
    return logits


@numba.njit(cache=True, fastmath=False)
def decode_step(token: int, pos: int, w: tuple, rope_cos: np.ndarray, rope_sin: np.ndarray,
                key_cache: np.ndarray, value_cache: np.ndarray, buf: tuple, logits: np.ndarray, scratch: np.ndarray,
                temperature: np.float32, topp: np.float32, topk: int, minp: float, rng_state: np.ndarray,
                threads: int) -> int:
    """One decoding step in compiled code: the forward pass at pos, then the sampler's pick of the next token."""
    tokens = np.empty(1, dtype=np.int64)
    tokens[0] = token
    forward_tokens(tokens, pos, w, rope_cos, rope_sin, key_cache, value_cache, buf, logits, threads)
    return sample_logits(logits, scratch, temperature, topp, topk, minp, rng_state)


class FloatEngine:
    """run.c's Transformer: weights in the blocked layout, RoPE tables, a KV cache and activation buffers."""

    def __init__(self, checkpoint: Checkpoint, threads: int = 0) -> None:
        """threads: how many threads the matrix products and a prompt's attention use (0: all of numba's).

        The count goes to the compiled code with every call (no numba.set_num_threads, which costs more Python
        time per call than a stories260K layer): large loops split their work into that many runs.
        """
        c: ModelConfig = checkpoint.config
        self.config = c
        self.threads = thread_count(threads)
        w: Weights = checkpoint.weights
        wqkv = np.concatenate([w.wq, w.wk, w.wv], axis=1)
        w13 = np.concatenate([w.w1, w.w3], axis=1)
        self._w = (w.token_embedding_table, w.rms_att_weight, block_rows(wqkv), block_rows(w.wo), w.rms_ffn_weight,
                   block_rows(w13), block_rows(w.w2), w.rms_final_weight, block_rows(w.wcls))
        self.rope_cos, self.rope_sin = rope_tables(c.seq_len, c.head_size)
        self.key_cache = np.zeros((c.n_layers, c.n_kv_heads, c.head_size, c.seq_len), dtype=np.float32)
        self.value_cache = np.zeros((c.n_layers, c.seq_len, c.kv_dim), dtype=np.float32)
        self._token = np.zeros(1, dtype=np.int64)
        self._buf = self._buffers(1)
        self._logits = np.zeros(c.vocab_size, dtype=np.float32)
        self._scratch = np.zeros(c.vocab_size, dtype=np.float32)
        # Load (or compile) the jitted code now, so that it is not timed as decoding: the forward pass, and the
        # decoding step with a throwaway generator (its types are every sampler's; the values do not matter).
        self.forward(0, 0)
        decode_step(0, 0, self._w, self.rope_cos, self.rope_sin, self.key_cache, self.value_cache, self._buf,
                    self._logits, self._scratch, np.float32(0), np.float32(1), 0, 0.0, np.ones(1, np.uint64),
                    self.threads)

    def _buffers(self, positions: int) -> tuple:
        """x, xb, xb2, hb, qkv, att, out (the classifier's): a row per position, products' outputs whole blocks."""
        c = self.config
        widths = (c.dim, c.dim, padded(c.dim), padded(2 * c.hidden_dim), padded(c.dim + 2 * c.kv_dim))
        rows = tuple(np.zeros((positions, n), dtype=np.float32) for n in widths)
        return rows + (np.zeros((positions, c.n_heads, c.seq_len), dtype=np.float32),
                       np.zeros((1, padded(c.vocab_size)), dtype=np.float32))

    def forward(self, token: int, pos: int) -> np.ndarray:
        self._token[0] = token
        return forward_tokens(self._token, pos, self._w, self.rope_cos, self.rope_sin,
                              self.key_cache, self.value_cache, self._buf, self._logits, self.threads)

    def step(self, token: int, pos: int, sampler: Sampler) -> int:
        """forward(token, pos), then sampler's choice of the next token, in one compiled call."""
        return decode_step(token, pos, self._w, self.rope_cos, self.rope_sin, self.key_cache, self.value_cache,
                           self._buf, self._logits, self._scratch, *sampler.settings, sampler.rng.state, self.threads)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """All prompt positions in one pass, with batched matrix products: the logits of forward() one by one."""
        if not 0 < len(tokens) <= self.config.seq_len:
            raise ValueError(f"prefill takes 1 to {self.config.seq_len} tokens, not {len(tokens)}")
        return forward_tokens(np.asarray(tokens, dtype=np.int64), 0, self._w, self.rope_cos, self.rope_sin,
                              self.key_cache, self.value_cache, self._buffers(len(tokens)), self._logits,
                              self.threads)
