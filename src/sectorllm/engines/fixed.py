"""Fixed-point engine: the boot engine's golden model, integers only from the packed file to the sampled token.

Every function here is one routine of docs/arithmetic.md, step for step. Values are held in int64 while numba
computes; wrap32 marks exactly the places where the 32-bit x86 code wraps, everything else provably fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from ..config import ModelConfig
from ..errors import UsageError
from ..packed import PackedModel
from ..sampling import SamplerConfig, XorShiftRng, clock_seed
from . import PARALLEL_WORK, thread_count

# A cached value c stands for c * D / 2**shift in Q16.16, D being its (position, kv head) divisor. Keys are int16:
# int8 keys cost 4x the KL of every other integer step together (scores are large, softmax amplifies their error).
KEY_SHIFT = 15
VALUE_SHIFT = 7
ONE_Q16 = 1 << 16


@numba.njit(cache=True, inline="always")
def wrap32(v: int) -> int:
    """The low 32 bits of v as a signed integer: what a 32-bit register holds."""
    return ((v + 0x80000000) & 0xFFFFFFFF) - 0x80000000


@numba.njit(cache=True, inline="always")
def bit_length(v: int) -> int:
    """Bits needed for v >= 0 (0 for 0): bsr + 1."""
    n = 0
    while v:
        v >>= 1
        n += 1
    return n


@numba.njit(cache=True)
def quantize_act(out: np.ndarray, v: np.ndarray, bits: int) -> int:
    """out = v >> k with the smallest k >= 0 that leaves every |out| <= 2**bits; returns k."""
    mask = 0
    for j in range(v.shape[0]):
        a = np.int64(v[j])
        mask |= a if a >= 0 else -a  # the OR of the magnitudes has the bit length of the largest
    k = max(0, bit_length(mask) - bits)
    for j in range(v.shape[0]):
        out[j] = v[j] >> k
    return k


# Rows per task when a matrix product is spread over threads.
ROWS_PER_TASK = 16


@numba.njit(cache=True)
def _rows(out: np.ndarray, w_q: np.ndarray, w_s: np.ndarray, shift: int, act: np.ndarray, ks: np.ndarray,
          add: bool, first: int, end: int) -> None:
    """matmul's rows first..end-1."""
    n = w_q.shape[1]
    for i in range(first, end):
        row, s = w_q[i], np.int64(w_s[i])
        for t in range(act.shape[0]):
            a = act[t]
            acc = np.int32(0)
            for j in range(n):  # int32 arithmetic (the cast wraps), so that the compiler sums in 32-bit lanes
                acc = np.int32(acc + np.int32(row[j]) * np.int32(a[j]))
            r = wrap32((np.int64(acc) * s) >> (shift - ks[t]))
            out[t, i] = wrap32(np.int64(out[t, i]) + r) if add else r


@numba.njit(cache=True, parallel=True)
def matmul(out: np.ndarray, w_q: np.ndarray, w_s: np.ndarray, shift: int, act: np.ndarray, ks: np.ndarray,
           add: bool, threads: int) -> None:
    """matvec of each position: out[t] (+)= W act[t, :n] with act[t]'s own k = ks[t]; out (T, d), W (d, n).

    Rows outer, positions inner: each int8 row is read from memory once for all T positions. act is int16
    (|act| <= 2**15 - 1, see quantize_act): int8 x int16 products summed in 32-bit lanes, many at a time, which
    needs act's rows contiguous: it is the whole buffer, of which the first n columns are read. Rows are
    independent: large products split them into threads runs of consecutive tasks, one per thread.
    """
    d = w_q.shape[0]
    if threads == 1 or d * w_q.shape[1] * act.shape[0] < PARALLEL_WORK:
        _rows(out, w_q, w_s, shift, act, ks, add, 0, d)
    else:
        tasks = -(-d // ROWS_PER_TASK)
        for c in prange(threads):
            for task in range(c * tasks // threads, (c + 1) * tasks // threads):
                first = task * ROWS_PER_TASK
                _rows(out, w_q, w_s, shift, act, ks, add, first, min(first + ROWS_PER_TASK, d))


@numba.njit(cache=True)
def matvec(out: np.ndarray, w_q: np.ndarray, w_s: np.ndarray, shift: int, a: np.ndarray, k: int, add: bool) -> None:
    """out[i] (+)= (sum_j w_q[i, j] * a[j]) * w_s[i] >> (shift - k): int8 x int16-range, 32-bit sum, Q16.16 out."""
    matmul(out.reshape(1, -1), w_q, w_s, shift, a.reshape(1, -1), np.full(1, k), add, 1)


@numba.njit(cache=True)
def isqrt62(m: int) -> int:
    """floor(sqrt(m)) for 2**60 <= m < 2**62, by Newton's method from 2**31 (which is above the root)."""
    x = np.int64(1) << 31
    while True:
        y = (x + m // x) >> 1
        if y >= x:
            return x
        x = y


@numba.njit(cache=True)
def rmsnorm(out: np.ndarray, x: np.ndarray, g: np.ndarray, eps: int, norm_shift: int) -> None:
    """out = x / sqrt(sum(x^2) + eps) * g, with g = weight * sqrt(dim) in Q(norm_shift): Q16.16 in and out."""
    ss = np.int64(0)
    for j in range(x.shape[0]):
        xj = np.int64(x[j])
        ss += xj * xj  # a 64-bit (add, adc) sum
    ss += eps
    if ss < 0 or ss >= np.int64(1) << 62:  # past 2**62 only when x is garbage: saturate, never fault
        ss = (np.int64(1) << 62) - 1
    h = (62 - bit_length(ss)) >> 1
    inv = ((np.int64(1) << 61) - 1) // isqrt62(ss << (2 * h))
    for j in range(x.shape[0]):
        u = wrap32((np.int64(x[j]) * inv) >> (31 - h))  # x / sqrt(ss) in Q2.30
        out[j] = wrap32((u * np.int64(g[j])) >> (norm_shift + 14))


@numba.njit(cache=True)
def rope(vec: np.ndarray, table: np.ndarray, head_size: int, shift: int) -> None:
    """Rotate each (even, odd) pair of every head by this position's Q14 cos and sin."""
    for i in range(0, vec.shape[0], 2):
        c = np.int64(table[(i % head_size) // 2, 0])
        s = np.int64(table[(i % head_size) // 2, 1])
        v0 = np.int64(vec[i])
        v1 = np.int64(vec[i + 1])
        vec[i] = wrap32((v0 * c - v1 * s) >> shift)
        vec[i + 1] = wrap32((v0 * s + v1 * c) >> shift)


@numba.njit(cache=True)
def store_kv(out_q: np.ndarray, v: np.ndarray, shift: int) -> int:
    """Round one head's keys or values to |c| <= 2**shift - 1; returns the divisor D (the scale is D / 2**shift)."""
    m = 0
    for i in range(v.shape[0]):
        a = abs(np.int64(v[i]))
        if a > m:
            m = a
    m = min(m, 1 << 30)
    if m == 0:
        out_q[:] = 0
        return 0
    top = (1 << shift) - 1
    d = m + (m + top - 1) // top  # M * 2**shift / D <= top: the largest value maps to at most top
    half = d >> 1
    for i in range(v.shape[0]):
        n = np.int64(v[i]) << shift
        q = (n + half) // d if n >= 0 else -((half - n) // d)  # idiv truncates towards zero
        out_q[i] = max(-top, min(top, q))
    return d


@numba.njit(cache=True)
def exp_lookup(d: int, table: np.ndarray, shift: int) -> int:
    """exp(-d) in Q16 for a Q16.16 distance 0 <= d < 2**32, linearly interpolated; 0 past the table."""
    i = d >> shift
    if i >= table.shape[0] - 1:
        return 0
    t0 = np.int64(table[i])
    return t0 + (((np.int64(table[i + 1]) - t0) * (d & ((1 << shift) - 1))) >> shift)


@numba.njit(cache=True)
def silu_lookup(x: int, table: np.ndarray, shift: int, lo: int) -> int:
    """silu(x) for Q16.16 x, linearly interpolated; 0 below the table, x above it."""
    if x < lo:
        return 0
    u = x - lo
    i = u >> shift
    if i >= table.shape[0] - 1:
        return x
    t0 = np.int64(table[i])
    return t0 + (((np.int64(table[i + 1]) - t0) * (u & ((1 << shift) - 1))) >> shift)


@numba.njit(cache=True)
def attention(out: np.ndarray, q: np.ndarray, key_q: np.ndarray, key_d: np.ndarray, value_q: np.ndarray,
              value_d: np.ndarray, pos: int, bits: int, exp_table: np.ndarray, exp_shift: int,
              qa: np.ndarray, att: np.ndarray) -> None:
    """One query head (already scaled by 1/sqrt(head_size)) against its kv head's cache rows 0..pos."""
    head_size = q.shape[0]
    k = quantize_act(qa, q, bits)
    sh = 16 + KEY_SHIFT - k
    top = np.int64(-(1 << 31))
    for t in range(pos + 1):
        dot = np.int32(0)
        for i in range(head_size):  # the spec's 32-bit sum in int32 arithmetic, as in _rows
            dot = np.int32(dot + np.int32(qa[i]) * np.int32(key_q[t, i]))
        score = wrap32((np.int64(dot) * np.int64(key_d[t])) >> sh)
        att[t] = score
        top = max(top, score)
    total = 0
    for t in range(pos + 1):
        e = exp_lookup(top - att[t], exp_table, exp_shift)
        att[t] = e
        total += e
    recip = ((np.int64(1) << 48) - 1) // total  # total >= 65536 (the top score's own weight)
    for t in range(pos + 1):
        p = (att[t] * recip) >> 32  # the softmax weight in Q16: EDX after mul
        att[t] = (p * np.int64(value_d[t])) >> 16
    out[:] = 0
    for t in range(pos + 1):  # positions outer, the head's values as a vector: the 32-bit sums allow any order
        a = att[t]
        for i in range(head_size):
            out[i] = np.int32(out[i] + a * np.int32(value_q[t, i]))
    for i in range(head_size):
        out[i] >>= VALUE_SHIFT


@numba.njit(cache=True)
def forward_tokens(tokens: np.ndarray, pos: int, w: tuple, params: tuple, key_q: np.ndarray, key_d: np.ndarray,
                   value_q: np.ndarray, value_d: np.ndarray, buf: tuple, threads: int) -> np.ndarray:
    """docs/arithmetic.md's forward for tokens at positions pos, pos+1, ...: returns the last one's Q16.16 logits.

    Row t of each buffer is position pos + t. Every step runs for each position as the spec says; the matrix
    products take all positions at once (matmul) and each position's attention comes after every position's
    keys and values are cached, which it never reads past its own: the same integers as one position at a time.
    """
    (emb_q, emb_s, rms_att, wqkv_q, wqkv_s, wo_q, wo_s, rms_ffn, w13_q, w13_s, w2_q, w2_s, rms_final,
     wcls_q, wcls_s, wres_q, wres_s, rope_table, exp_table, silu_table) = w
    (emb_shift, wqkv_shift, wo_shift, w13_shift, w2_shift, wcls_shift, wres_shift, bits_dim, bits_hidden, bits_head,
     norm_shift, rope_shift, eps, exp_shift, silu_shift, silu_lo) = params
    x, xb, act, ks, qkv, hb, qa, att, logits = buf
    n_layers, n_kv_heads, head_size = key_q.shape[0], key_q.shape[1], key_q.shape[3]
    T, dim, hidden_dim = tokens.shape[0], x.shape[1], hb.shape[1] // 2
    kv_dim = n_kv_heads * head_size
    kv_mul = dim // kv_dim
    for t in range(T):
        for j in range(dim):
            x[t, j] = wrap32((np.int64(emb_q[tokens[t], j]) * np.int64(emb_s[tokens[t]])) >> (emb_shift - 16))
    for l in range(n_layers):
        for t in range(T):
            rmsnorm(xb[t], x[t], rms_att[l], eps, norm_shift)
            ks[t] = quantize_act(act[t, :dim], xb[t], bits_dim)
        matmul(qkv, wqkv_q[l], wqkv_s[l], wqkv_shift, act, ks, False, threads)
        for t in range(T):
            rope(qkv[t, :dim + kv_dim], rope_table[pos + t], head_size, rope_shift)  # q and k, never v
            for h in range(n_kv_heads):
                lo = dim + h * head_size
                key_d[l, h, pos + t] = store_kv(key_q[l, h, pos + t], qkv[t, lo:lo + head_size], KEY_SHIFT)
                value_d[l, h, pos + t] = store_kv(value_q[l, h, pos + t],
                                                  qkv[t, lo + kv_dim:lo + kv_dim + head_size], VALUE_SHIFT)
        for t in range(T):
            for h in range(dim // head_size):
                kvh, lo = h // kv_mul, h * head_size
                attention(xb[t, lo:lo + head_size], qkv[t, lo:lo + head_size], key_q[l, kvh], key_d[l, kvh],
                          value_q[l, kvh], value_d[l, kvh], pos + t, bits_head, exp_table, exp_shift, qa, att)
            ks[t] = quantize_act(act[t, :dim], xb[t], bits_dim)
        matmul(x, wo_q[l], wo_s[l], wo_shift, act, ks, True, threads)  # the residual connection
        for t in range(T):
            rmsnorm(xb[t], x[t], rms_ffn[l], eps, norm_shift)
            ks[t] = quantize_act(act[t, :dim], xb[t], bits_dim)
        matmul(hb, w13_q[l], w13_s[l], w13_shift, act, ks, False, threads)
        for t in range(T):
            for i in range(hidden_dim):
                gate = silu_lookup(np.int64(hb[t, i]), silu_table, silu_shift, silu_lo)
                hb[t, i] = wrap32((gate * np.int64(hb[t, hidden_dim + i])) >> 16)
            ks[t] = quantize_act(act[t, :hidden_dim], hb[t, :hidden_dim], bits_hidden)
        matmul(x, w2_q[l], w2_s[l], w2_shift, act, ks, True, threads)
    last = T - 1
    rmsnorm(xb[last], x[last], rms_final, eps, norm_shift)
    ks[last] = quantize_act(act[last, :dim], xb[last], bits_dim)
    out, act_last = logits.reshape(1, -1), np.ascontiguousarray(act[last:])
    matmul(out, wcls_q, wcls_s, wcls_shift, act_last, ks[last:], False, threads)
    matmul(out, wres_q, wres_s, wres_shift, act_last, ks[last:], True, threads)
    return logits


class FixedEngine:
    """The integer transformer: packed weights; int16 keys, int8 values, a divisor per (position, kv head)."""

    def __init__(self, packed: PackedModel, threads: int = 0) -> None:
        """threads: how many threads the matrix products use (0: all of numba's)."""
        c: ModelConfig = packed.config
        self.config = c
        self.threads = thread_count(threads)
        p, q = packed, packed.quant
        self._w = (p.token_embedding.q, p.token_embedding.s, p.rms_att_weight, p.wqkv.q, p.wqkv.s, p.wo.q, p.wo.s,
                   p.rms_ffn_weight, p.w13.q, p.w13.s, p.w2.q, p.w2.s, p.rms_final_weight, p.wcls.q, p.wcls.s,
                   p.wcls_residual.q, p.wcls_residual.s, p.rope, p.exp_table, p.silu_table)
        self._params = (p.token_embedding.shift, p.wqkv.shift, p.wo.shift, p.w13.shift, p.w2.shift, p.wcls.shift,
                        p.wcls_residual.shift, q.act_bits_dim, q.act_bits_hidden, q.act_bits_head, q.norm_shift,
                        q.rope_shift, q.rms_eps, q.exp_shift, q.silu_shift, q.silu_lo)
        cache_shape = (c.n_layers, c.n_kv_heads, c.seq_len, c.head_size)
        self.key_q = np.zeros(cache_shape, dtype=np.int16)
        self.value_q = np.zeros(cache_shape, dtype=np.int8)
        self.key_d = np.zeros(cache_shape[:-1], dtype=np.int32)
        self.value_d = np.zeros(cache_shape[:-1], dtype=np.int32)
        self._token = np.zeros(1, dtype=np.int64)
        self._buf = self._buffers(1)
        self.forward(0, 0)  # load (or compile) the jitted code now, so it is not timed as decoding

    def _buffers(self, positions: int) -> tuple:
        """x, xb, act (matmul input, int16), ks (act's shifts), qkv, hb (gate then up), qa (one query head), att,
        logits: a row per position where the step runs for each position."""
        c = self.config
        rows = lambda n, dtype=np.int32: np.zeros((positions, n), dtype=dtype)  # noqa: E731
        return (rows(c.dim), rows(c.dim), rows(max(c.dim, c.hidden_dim), np.int16), np.zeros(positions, np.int64),
                rows(c.dim + 2 * c.kv_dim), rows(2 * c.hidden_dim), np.zeros(c.head_size, np.int16),
                np.zeros(c.seq_len, np.int32), np.zeros(c.vocab_size, np.int32))

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) int32 in Q16.16: compare or argmax them, never treat them as floats."""
        self._token[0] = token
        return forward_tokens(self._token, pos, self._w, self._params, self.key_q, self.key_d,
                              self.value_q, self.value_d, self._buf, self.threads)

    def step(self, token: int, pos: int, sampler: FixedSampler) -> int:
        return sampler.sample(self.forward(token, pos))

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """All prompt positions in one pass, with batched matrix products: the logits of forward() one by one."""
        if not 0 < len(tokens) <= self.config.seq_len:
            raise ValueError(f"prefill takes 1 to {self.config.seq_len} tokens, not {len(tokens)}")
        return forward_tokens(np.asarray(tokens, dtype=np.int64), 0, self._w, self._params, self.key_q, self.key_d,
                              self.value_q, self.value_d, self._buffers(len(tokens)), self.threads)


@dataclass(frozen=True)
class FixedSamplerConfig:
    """The sampler's settings as the integers docs/arithmetic.md uses."""

    inv_temperature_q16: int  # round(65536 / temperature); 0 means greedy argmax
    topp_q16: int = ONE_Q16  # round(65536 * top-p); 65536 turns top-p off
    topk: int = 0  # 0 turns top-k off
    seed: int = 0  # 0 takes the seed from the clock
    minp_q16: int = 0  # round(65536 * min-p); 0 turns min-p off

    @classmethod
    def from_sampler_config(cls, config: SamplerConfig) -> FixedSamplerConfig:
        """Round the float settings once, outside the engine: temperature and top-p become Q16 integers."""
        config.validate()
        if config.greedy:
            return cls(0, ONE_Q16, config.topk, config.seed)
        inv_t = round(ONE_Q16 / config.temperature)
        if not 1 <= inv_t < 1 << 31:
            raise UsageError(f"temperature {config.temperature} is outside what the fixed-point sampler holds "
                             "(1/65536 .. 65536): use a value in that range")
        topp = max(1, round(ONE_Q16 * config.topp)) if config.topp_on else ONE_Q16
        return cls(inv_t, topp, config.topk, config.seed, round(ONE_Q16 * config.minp))


@numba.njit(cache=True)
def sample_fixed(logits: np.ndarray, exp_table: np.ndarray, exp_shift: int, inv_temperature: int,
                 topp: int, topk: int, minp: int, coin: int) -> int:
    """docs/arithmetic.md "sample": exp-table weights of the scaled logits, min-p/top-k/top-p cut, a 24-bit coin."""
    n = logits.shape[0]
    top = np.int64(logits[0])
    for i in range(n):
        top = max(top, np.int64(logits[i]))
    e = np.empty(n, dtype=np.int64)
    total = 0
    for i in range(n):
        e[i] = exp_lookup(((top - logits[i]) * inv_temperature) >> 16, exp_table, exp_shift)
        if e[i] < minp:  # the top logit weighs exp(0) = 65536, so this is p < min-p * p_top
            e[i] = 0
        total += e[i]
    n_keep = n
    if topk == 0 and topp >= ONE_Q16:
        order = np.arange(n)
    else:
        keys = ((ONE_Q16 - e) << 16) | np.arange(n)  # weight descending, then index ascending
        order = np.sort(keys) & 0xFFFF
        if 0 < topk < n:
            n_keep = topk
        if topp < ONE_Q16:
            threshold = (total * topp) >> 16
            cumulative = 0
            for j in range(n_keep):
                cumulative += e[order[j]]
                if cumulative > threshold:
                    n_keep = j + 1
                    break
    kept = 0
    for j in range(n_keep):
        kept += e[order[j]]
    target = (coin * kept) >> 24
    j = 0
    cdf = e[order[0]]
    while target >= cdf:
        j += 1
        cdf += e[order[j]]
    return order[j]


class FixedSampler:
    """Greedy or seeded sampling in integers over FixedEngine logits, with run.c's xorshift64* coins."""

    def __init__(self, config: FixedSamplerConfig, packed: PackedModel) -> None:
        self.config = config
        self.seed = config.seed or clock_seed()
        self.rng = XorShiftRng(self.seed)
        self._exp_table, self._exp_shift = packed.exp_table, packed.quant.exp_shift
        if config.inv_temperature_q16:  # load (or compile) the jitted sampler now, so it is not timed as decoding
            sample_fixed(np.zeros(2, np.int32), self._exp_table, self._exp_shift, ONE_Q16, ONE_Q16, 0, 0, 0)
            XorShiftRng(1).next_u32()

    def sample(self, logits: np.ndarray) -> int:
        c = self.config
        if c.inv_temperature_q16 == 0:
            return int(np.argmax(logits))  # the first index on ties
        coin = self.rng.next_u32() >> 8  # 24 bits, as run.c's random_f32 takes them
        return int(sample_fixed(logits, self._exp_table, self._exp_shift, c.inv_temperature_q16,
                                c.topp_q16, c.topk, c.minp_q16, coin))
