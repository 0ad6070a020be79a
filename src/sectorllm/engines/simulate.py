"""The fixed engine step by step in float64, any step swapped for its exact float counterpart: the error budget.

Values pass between steps as float64 numbers in real units. A step left integer rounds its input to Q16.16
(exact when the step before was integer too) and runs the fixed engine's own routine on it, so with no step
swapped the logits are the fixed engine's bit for bit; with every step swapped they are the float model's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numba
import numpy as np

from ..calibrate import rmsnorm, rotate, silu
from ..checkpoint import Checkpoint
from ..packed import PackedModel, dequantize
from . import fixed
from .float32 import rope_tables

ONE = 65536.0  # Q16.16

# Each step's integer form (docs/arithmetic.md) against its exact counterpart.
STEPS: dict[str, str] = {
    "embedding": "int8 token embedding rows",
    "wq": "int8 wq rows", "wk": "int8 wk rows", "wv": "int8 wv rows", "wo": "int8 wo",
    "w1": "int8 w1 rows", "w2": "int8 w2", "w3": "int8 w3 rows",
    "classifier": "int8 classifier plus its int8 residual",
    "activations": "matmul inputs shifted to act_bits",
    "query": "query heads shifted to act_bits_head before q.k",
    "keys": "int16 key cache with a divisor per (position, kv head)",
    "values": "int8 value cache with a divisor per (position, kv head)",
    "exp": "softmax through the exp table, Q16 weights",
    "silu": "SiLU table, Q16.16 gate times up",
    "rope": "Q14 cos and sin",
    "rmsnorm": "integer inverse square root, Q18 weights",
}


def to_q16(v: np.ndarray) -> np.ndarray:
    """Real values to the engine's Q16.16 int32 (exact for values an integer step produced)."""
    return np.round(np.asarray(v, dtype=np.float64) * ONE).astype(np.int32)


@numba.njit(cache=True)
def _silu_times_up(out: np.ndarray, gate: np.ndarray, up: np.ndarray, table: np.ndarray, shift: int,
                   lo: int) -> None:
    """The fixed engine's SwiGLU step over Q16.16 vectors: silu_lookup(gate) * up >> 16."""
    for i in range(gate.shape[0]):
        out[i] = fixed.wrap32((fixed.silu_lookup(np.int64(gate[i]), table, shift, lo) * np.int64(up[i])) >> 16)


@numba.njit(cache=True)
def _exp_lookups(out: np.ndarray, d: np.ndarray, table: np.ndarray, shift: int) -> None:
    for t in range(d.shape[0]):
        out[t] = fixed.exp_lookup(d[t], table, shift)


class SimulatedEngine:
    """The fixed engine with the steps named in `exact` (keys of STEPS) computed in float64 instead."""

    def __init__(self, checkpoint: Checkpoint, packed: PackedModel, exact: Iterable[str] = ()) -> None:
        exact = frozenset(exact)
        unknown = exact - STEPS.keys()
        if unknown:
            raise ValueError(f"unknown steps {sorted(unknown)}: use {', '.join(STEPS)}")
        c, w, p = checkpoint.config, checkpoint.weights, packed
        self.config, self.exact, self.packed = c, exact, p
        f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        d, kv, h = c.dim, c.kv_dim, c.hidden_dim
        # each fused matrix's float rows and which of its rows stay int8
        self._float = {
            "wqkv": np.concatenate([f64(w.wq) / np.sqrt(c.head_size), f64(w.wk), f64(w.wv)], axis=1),
            "wo": f64(w.wo), "w13": np.concatenate([f64(w.w1), f64(w.w3)], axis=1), "w2": f64(w.w2),
            "wcls": f64(w.wcls),
        }
        self._int_rows = {
            "wqkv": np.concatenate([np.full(d, "wq" not in exact), np.full(kv, "wk" not in exact),
                                    np.full(kv, "wv" not in exact)]),
            "wo": np.full(d, "wo" not in exact),
            "w13": np.concatenate([np.full(h, "w1" not in exact), np.full(h, "w3" not in exact)]),
            "w2": np.full(d, "w2" not in exact),
            "wcls": np.full(c.vocab_size, "classifier" not in exact),
        }
        self._matrix = {"wqkv": p.wqkv, "wo": p.wo, "w13": p.w13, "w2": p.w2}
        self._deq = {name: dequantize(m) for name, m in self._matrix.items()}
        self._deq["wcls"] = dequantize(p.wcls) + dequantize(p.wcls_residual)
        self._emb = f64(w.token_embedding_table) if "embedding" in exact else \
            np.floor(dequantize(p.token_embedding) * ONE) / ONE  # (q * s) >> (S - 16): Q16.16, truncated
        self._norms = {"att": (f64(w.rms_att_weight), p.rms_att_weight),
                       "ffn": (f64(w.rms_ffn_weight), p.rms_ffn_weight),
                       "final": (f64(w.rms_final_weight), p.rms_final_weight)}
        cos, sin = rope_tables(c.seq_len, c.head_size)
        self._rope = (f64(cos), f64(sin))
        shape = (c.n_layers, c.n_kv_heads, c.seq_len, c.head_size)
        self.keys, self.values = np.zeros(shape), np.zeros(shape)  # real values, dequantized when integer
        self.key_q, self.value_q = np.zeros(shape, np.int16), np.zeros(shape, np.int8)
        self.key_d, self.value_d = np.zeros(shape[:-1], np.int32), np.zeros(shape[:-1], np.int32)
        self._qa, self._att = np.zeros(c.head_size, np.int32), np.zeros(c.seq_len, np.int32)

    # -- steps -------------------------------------------------------------------------------------------------

    def _rmsnorm(self, x: np.ndarray, which: str, layer: int | None) -> np.ndarray:
        g, G = self._norms[which]
        if layer is not None:
            g, G = g[layer], G[layer]
        if "rmsnorm" in self.exact:
            return rmsnorm(x, g)
        out = np.zeros(x.shape[0], np.int32)
        q = self.packed.quant
        fixed.rmsnorm(out, to_q16(x), G, q.rms_eps, q.norm_shift)
        return out / ONE

    def _matvec(self, name: str, x: np.ndarray, layer: int | None) -> np.ndarray:
        """One matrix times x: int8 rows through fixed.matvec, exact rows in float64, per the switches."""
        q = self.packed.quant
        bits = q.act_bits_hidden if name == "w2" else q.act_bits_dim
        index = () if layer is None else (layer,)
        w_float, deq, int_rows = self._float[name][index], self._deq[name][index], self._int_rows[name]
        if "activations" in self.exact:
            out = deq @ x
        else:
            act = np.zeros(x.shape[0], np.int32)
            k = fixed.quantize_act(act, to_q16(x), bits)
            x = act * 2.0 ** k / ONE  # what the int8 rows see
            ints = np.zeros(w_float.shape[0], np.int32)
            for m, add in ((self.packed.wcls, False), (self.packed.wcls_residual, True)) if name == "wcls" else \
                    ((self._matrix[name], False),):
                fixed.matvec(ints, m.q[index], m.s[index], m.shift, act, k, add)
            out = ints / ONE
        if not int_rows.all():
            out = np.where(int_rows, out, w_float @ x)
        return out

    def _rotate(self, v: np.ndarray, pos: int) -> np.ndarray:
        hs = self.config.head_size
        if "rope" in self.exact:
            return rotate(v.reshape(1, -1, hs), self._rope[0][pos:pos + 1], self._rope[1][pos:pos + 1]).reshape(-1)
        vi = to_q16(v)
        fixed.rope(vi, self.packed.rope[pos], hs, self.packed.quant.rope_shift)
        return vi / ONE

    def _store(self, layer: int, head: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Cache one kv head's keys and values: as they are, or through store_kv (kept dequantized as well)."""
        at = (layer, head, pos)
        for step, real, store, codes, divisors, shift in (
                ("keys", k, self.keys, self.key_q, self.key_d, fixed.KEY_SHIFT),
                ("values", v, self.values, self.value_q, self.value_d, fixed.VALUE_SHIFT)):
            if step in self.exact:
                store[at] = real
            else:
                divisors[at] = fixed.store_kv(codes[at], to_q16(real), shift)
                store[at] = codes[at] * (divisors[at] / 2.0 ** shift) / ONE

    def _attend(self, layer: int, head: int, q: np.ndarray, pos: int) -> np.ndarray:
        kvh = head // (self.config.n_heads // self.config.n_kv_heads)
        p = self.packed
        bits = p.quant.act_bits_head
        if not self.exact & {"query", "keys", "values", "exp"}:
            out = np.zeros(q.shape[0], np.int32)
            fixed.attention(out, to_q16(q), self.key_q[layer, kvh], self.key_d[layer, kvh], self.value_q[layer, kvh],
                            self.value_d[layer, kvh], pos, bits, p.exp_table, p.quant.exp_shift, self._qa, self._att)
            return out / ONE
        if "query" not in self.exact:
            k = fixed.quantize_act(self._qa, to_q16(q), bits)
            q = self._qa * 2.0 ** k / ONE
        scores = self.keys[layer, kvh, :pos + 1] @ q
        if "exp" in self.exact:
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
        else:
            s = np.floor(scores * ONE).astype(np.int64)  # the engine's truncated Q16.16 scores
            e = np.zeros(pos + 1, np.int64)
            _exp_lookups(e, s.max() - s, p.exp_table, p.quant.exp_shift)
            weights = ((e * (((1 << 48) - 1) // int(e.sum()))) >> 32) / ONE  # the engine's Q16 weights
        return weights @ self.values[layer, kvh, :pos + 1]

    def _swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if "silu" in self.exact:
            return silu(gate) * up
        out = np.zeros(gate.shape[0], np.int32)
        q = self.packed.quant
        _silu_times_up(out, to_q16(gate), to_q16(up), self.packed.silu_table, q.silu_shift, q.silu_lo)
        return out / ONE

    # -- the forward pass ----------------------------------------------------------------------------------------

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) float64 in the fixed engine's Q16.16 units (its very integers when no step is exact)."""
        c = self.config
        d, kv, hs = c.dim, c.kv_dim, c.head_size
        x = self._emb[token].copy()
        for layer in range(c.n_layers):
            qkv = self._matvec("wqkv", self._rmsnorm(x, "att", layer), layer)
            qk = self._rotate(qkv[:d + kv], pos)
            for g in range(c.n_kv_heads):
                self._store(layer, g, pos, qk[d + g * hs:d + (g + 1) * hs], qkv[d + kv + g * hs:d + kv + (g + 1) * hs])
            att = np.concatenate([self._attend(layer, h, qk[h * hs:(h + 1) * hs], pos) for h in range(c.n_heads)])
            x = x + self._matvec("wo", att, layer)
            hb = self._matvec("w13", self._rmsnorm(x, "ffn", layer), layer)
            x = x + self._matvec("w2", self._swiglu(hb[:c.hidden_dim], hb[c.hidden_dim:]), layer)
        return self._matvec("wcls", self._rmsnorm(x, "final", None), None) * ONE

    def prefill(self, tokens: list[int]) -> np.ndarray:
        logits = np.zeros(self.config.vocab_size)
        for pos, token in enumerate(tokens):
            logits = self.forward(token, pos)
        return logits
