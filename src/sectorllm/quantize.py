"""Float checkpoint -> packed integer model: int8 weights with scales, fixed-point tables, and an error report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibrate import GRAM_INPUTS, calibration_texts, input_grams
from .checkpoint import Checkpoint
from .config import RMS_EPS, ModelConfig
from .engines.fixed import KEY_SHIFT
from .engines.float32 import rope_tables
from .errors import QuantizeError
from .packed import (DEFAULT_SCHEME, SCHEMES, PackedModel, QuantizedMatrix, QuantParams, check_shape, dequantize,
                     packed_bytes)
from .tokenizer import Tokenizer

Q = 127  # int8 weights are symmetric: -127..127, never -128
NORM_SHIFT = 18  # g * sqrt(dim) * 2**18: then (U * G) >> 32 is Q16.16, i.e. EDX after imul (docs/arithmetic.md)
ROPE_SHIFT = 14  # Q14 holds +1.0 exactly in an int16
EXP_SHIFT = 10  # exp table step 2**10 / 65536 = 1/64, linearly interpolated
SILU_SHIFT = 10  # SiLU table step 1/64, linearly interpolated
SILU_RANGE = 12  # the SiLU table covers [-12, 12): outside, silu(x) is 0 or x within 1e-4
KEY_MAX = (1 << KEY_SHIFT) - 1  # cached keys are int16


@dataclass(frozen=True)
class TensorReport:
    name: str
    elements: int
    bytes: int  # in the packed file (values and scales)
    max_abs_error: float  # of the dequantized values against the float checkpoint
    rel_rms_error: float  # sqrt(sum(err^2) / sum(w^2))


@dataclass(frozen=True)
class QuantReport:
    scheme: str
    tensors: list[TensorReport]
    float_bytes: int  # the checkpoint file
    packed_bytes: int  # the packed file, tables and tokenizer included

    def format_table(self) -> str:
        lines = [f"{'tensor':<22}{'elements':>11}{'bytes':>11}{'max |err|':>12}{'rel RMS err':>13}"]
        for t in self.tensors:
            lines.append(f"{t.name:<22}{t.elements:>11,}{t.bytes:>11,}{t.max_abs_error:>12.3g}{t.rel_rms_error:>13.3g}")
        elements = sum(t.elements for t in self.tensors)
        ratio = self.packed_bytes / self.float_bytes if self.float_bytes else float("nan")
        lines.append(f"{'packed file':<22}{elements:>11,}{self.packed_bytes:>11,}"
                     f"   ({ratio:.1%} of the float checkpoint's {self.float_bytes:,} bytes, scheme {self.scheme})")
        return "\n".join(lines)


def act_bits(n: int, other: int = Q) -> int:
    """Magnitude bits of a vector of width n such that its dot product with one of |values| <= other fits an int32."""
    bits = 15  # int16 range: imul eax, [x] sees at most 2**15
    while bits > 1 and other * (1 << bits) * n > (1 << 31) - 1:
        bits -= 1
    return bits


GPTQ_BLOCK = 128  # columns rounded between two matrix-product updates of the rest


def round_to_inputs(w: np.ndarray, step: np.ndarray, gram: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """int8 values q for the rows of w (rows, n) at steps step (rows,) that keep each row's output error
    (q * step - w) . x small for inputs x of mean x x^T = gram, rather than each weight's own error.

    GPTQ's order: columns by decreasing input power, each rounded to nearest and its error pushed onto the
    columns not yet rounded through the Cholesky factor of the inverse Gram matrix (damped by `damp` times its
    mean diagonal). Then coordinate descent: any single +-1 change that lowers a row's error is taken.
    """
    n = w.shape[1]
    order = np.argsort(-np.diag(gram), kind="stable")
    h = gram[np.ix_(order, order)]
    h = h + damp * max(float(np.mean(np.diag(h))), 1e-30) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: inv(h) = u.T @ u
    rest = w[:, order].astype(np.float64)
    q = np.zeros_like(rest)
    for lo in range(0, n, GPTQ_BLOCK):  # errors reach the columns past a block in one matrix product
        hi = min(lo + GPTQ_BLOCK, n)
        block, errors = rest[:, lo:hi].copy(), np.zeros((w.shape[0], hi - lo))
        for j in range(hi - lo):
            q[:, lo + j] = np.clip(np.round(block[:, j] / step), -Q, Q)
            errors[:, j] = (block[:, j] - q[:, lo + j] * step) / u[lo + j, lo + j]
            block[:, j + 1:] -= np.outer(errors[:, j], u[lo + j, lo + j + 1:hi])
        rest[:, hi:] -= errors @ u[lo:hi, hi:]
    q = q[:, np.argsort(order)]
    gram_r = ((q * step[:, None] - w) @ gram)  # the gradient of each row's error / 2, kept up to date
    for _ in range(8):
        changed = False
        for j in range(n):
            for sign in (1.0, -1.0):
                gain = step * step * gram[j, j] + 2 * sign * step * gram_r[:, j]  # the row's error change
                better = (gain < 0) & (np.abs(q[:, j] + sign) <= Q)
                rows = np.flatnonzero(better)
                if rows.size:
                    q[rows, j] += sign
                    gram_r[rows] += (sign * step[rows])[:, None] * gram[j][None, :]
                    changed = True
        if not changed:
            break
    return q


def quantize_matrix(name: str, w: np.ndarray, scales: np.ndarray, min_shift: int) -> QuantizedMatrix:
    """int8 values for rows w[..., i, :] with real scales[..., i]; the scale mantissas share one shift <= 31."""
    top = float(scales.max())
    shift = 31
    while shift > 0 and round(top * 2.0 ** shift) > (1 << 31) - 1:
        shift -= 1
    if shift < min_shift:
        raise QuantizeError(f"{name}: weights up to {top * Q:.4g} overflow the fixed-point range (their row scale "
                            f"needs a shift of {shift}, the arithmetic at least {min_shift})")
    s = np.round(scales.astype(np.float64) * 2.0 ** shift).astype(np.int64)
    step = s.astype(np.float64) / 2.0 ** shift
    safe = np.where(step == 0, 1.0, step)
    q = np.clip(np.round(w / safe[..., None]), -Q, Q)
    return QuantizedMatrix(q.astype(np.int8), s.astype(np.int32), shift)


def calibrate_matrix(name: str, m: QuantizedMatrix, w: np.ndarray, gram: np.ndarray) -> QuantizedMatrix:
    """m's rows (n_layers, rows, n) rounded again, at the same scales, by round_to_inputs on each layer's gram."""
    if not np.all(np.isfinite(gram)):
        raise QuantizeError(f"{name}: the float model's activations overflow on its own calibration stories: "
                            "quantize with --scheme row")
    step = m.s.astype(np.float64) / 2.0 ** m.shift
    step = np.where(step == 0, 1.0, step)  # all-zero rows stay zero
    q = np.stack([round_to_inputs(w[l], step[l], gram[l]) for l in range(w.shape[0])])
    return QuantizedMatrix(q.astype(np.int8), m.s, m.shift)


def _row_scales(w: np.ndarray, scheme: str) -> np.ndarray:
    """absmax / 127 of each row ("row", "calibrated") or of the whole tensor, across layers ("tensor")."""
    if scheme != "tensor":
        return np.abs(w).max(axis=-1) / Q
    return np.full(w.shape[:-1], np.abs(w).max() / Q)


def norm_weights(name: str, g: np.ndarray, dim: int) -> np.ndarray:
    """RMSNorm weights times sqrt(dim) (the engine normalises by the root of the sum, not the mean), Q18."""
    G = np.round(g.astype(np.float64) * np.sqrt(dim) * 2.0 ** NORM_SHIFT)
    if np.abs(G).max() > (1 << 31) - 1:
        raise QuantizeError(f"{name}: a weight of {np.abs(g).max():.4g} times sqrt(dim) overflows Q{NORM_SHIFT} "
                            f"in 32 bits (limit {2 ** (31 - NORM_SHIFT) / np.sqrt(dim):.4g})")
    return G.astype(np.int32)


def rope_table(config: ModelConfig) -> np.ndarray:
    """The float engine's cos and sin, rounded to Q14: (seq_len, head_size // 2, 2)."""
    cos, sin = rope_tables(config.seq_len, config.head_size)
    return np.round(np.stack([cos, sin], axis=-1).astype(np.float64) * (1 << ROPE_SHIFT)).astype(np.int16)


def exp_table(shift: int = EXP_SHIFT) -> np.ndarray:
    """exp(-i * step) in Q16 for step = 2**shift / 65536, up to and including the first entry that rounds to 0."""
    n = int(np.ceil(np.log(2.0 * 65536) * 65536 / 2 ** shift)) + 1
    values = np.round(np.exp(-np.arange(n) * 2.0 ** shift / 65536) * 65536)
    last = int(np.argmax(values == 0))
    return values[:last + 1].astype(np.int32)


def silu_table(shift: int = SILU_SHIFT, lo: int = -SILU_RANGE * 65536) -> np.ndarray:
    """silu(x) in Q16.16 for x = lo, lo + 2**shift, ..., -lo (Q16.16), both ends included."""
    x = (lo + np.arange(2 * -lo // 2 ** shift + 1) * 2 ** shift) / 65536
    return np.round(x / (1 + np.exp(-x)) * 65536).astype(np.int32)


def _report(name: str, w: np.ndarray, deq: np.ndarray, nbytes: int | None = None) -> TensorReport:
    """Errors of one tensor; its packed bytes default to an int8 matrix's: values plus an int32 scale per row."""
    w = np.asarray(w, dtype=np.float64)
    err = deq - w
    power = float(np.sum(w ** 2))
    rel = float(np.sqrt(np.sum(err ** 2) / power)) if power else 0.0
    if nbytes is None:
        nbytes = w.size + 4 * (w.size // w.shape[-1])
    return TensorReport(name, int(w.size), nbytes, float(np.abs(err).max()), rel)


def quantize(checkpoint: Checkpoint, tokenizer: Tokenizer,
             scheme: str = DEFAULT_SCHEME) -> tuple[PackedModel, QuantReport]:
    """quantize_model, with the report of what it cost in precision and bytes (sectorllm quantize prints it)."""
    model = quantize_model(checkpoint, tokenizer, scheme)
    return model, QuantReport(scheme, _tensor_reports(checkpoint, model), checkpoint.file_bytes, packed_bytes(model))


def quantize_model(checkpoint: Checkpoint, tokenizer: Tokenizer, scheme: str = DEFAULT_SCHEME) -> PackedModel:
    """Quantize a float checkpoint to the packed format; refuses (QuantizeError) what it cannot hold.

    Scheme "calibrated" rounds wqkv, wo, w13 and w2 for their outputs on the float model's own stories
    (calibrate.py); the embedding and the classifier (its residual holds ~15 bits) are rounded to nearest."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    c, w = checkpoint.config, checkpoint.weights
    check_shape(c)
    if tokenizer.vocab_size != c.vocab_size:
        raise QuantizeError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                            f"{c.vocab_size}: use the model's own tokenizer")
    tensors = {name: np.asarray(getattr(w, name), dtype=np.float64)
               for name in ("token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls",
                            "rms_att_weight", "rms_ffn_weight", "rms_final_weight")}
    for name, t in tensors.items():
        if not np.all(np.isfinite(t)):
            raise QuantizeError(f"{name} holds NaN or infinite values: the checkpoint is damaged")
    bits_dim, bits_hidden = act_bits(c.dim), act_bits(c.hidden_dim)
    min_dim, min_hidden = 33 - bits_dim, 33 - bits_hidden  # keeps every rescale shift in 1..31
    inv_sqrt_hs = 1.0 / np.sqrt(c.head_size)  # folded into the wq rows, so scores need no extra multiply
    scales = {name: _row_scales(tensors[name], scheme) for name in
              ("token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls")}
    fused = {
        "wqkv": (np.concatenate([tensors["wq"] * inv_sqrt_hs, tensors["wk"], tensors["wv"]], axis=1),
                 np.concatenate([scales["wq"] * inv_sqrt_hs, scales["wk"], scales["wv"]], axis=1), min_dim),
        "wo": (tensors["wo"], scales["wo"], min_dim),
        "w13": (np.concatenate([tensors["w1"], tensors["w3"]], axis=1),
                np.concatenate([scales["w1"], scales["w3"]], axis=1), min_dim),
        "w2": (tensors["w2"], scales["w2"], min_hidden),
        "token_embedding": (tensors["token_embedding_table"], scales["token_embedding_table"], min_dim),
    }
    if not c.shared_classifier:
        fused["wcls"] = (tensors["wcls"], scales["wcls"], min_dim)
    matrices = {name: quantize_matrix(name, *args) for name, args in fused.items()}
    if scheme == "calibrated":  # after every range check: the float model then runs on weights that fit
        grams = input_grams(checkpoint, calibration_texts(checkpoint))
        for name in GRAM_INPUTS:
            matrices[name] = calibrate_matrix(name, matrices[name], fused[name][0], grams[name])
    matrices.setdefault("wcls", matrices["token_embedding"])
    # int8 logits flip near-ties (greedy from BOS parts from float at token 61 with any int8 classifier, at 235
    # with a float one): a second int8 matrix holding the rounding error gives the classifier ~15 bits
    residual = tensors["wcls"] - dequantize(matrices["wcls"])
    matrices["wcls_residual"] = quantize_matrix("wcls_residual", residual, _row_scales(residual, scheme), min_dim)
    norms = {name: norm_weights(name, tensors[name], c.dim)
             for name in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")}
    rms_eps = round(RMS_EPS * c.dim * 2.0 ** 32)  # on the sum (not the mean) of squares of Q16.16 values
    if rms_eps >= 1 << 32:
        raise QuantizeError(f"dim {c.dim} is too wide: RMSNorm's epsilon term would not fit its 32-bit field")
    params = QuantParams(scheme, bits_dim, bits_hidden, act_bits(c.head_size, KEY_MAX), NORM_SHIFT, ROPE_SHIFT,
                         rms_eps, EXP_SHIFT, SILU_SHIFT, -SILU_RANGE * 65536)
    return PackedModel(c, params, rope=rope_table(c), exp_table=exp_table(), silu_table=silu_table(),
                       tokenizer=tokenizer, **matrices, **norms)


def _matrix_bytes(m: QuantizedMatrix) -> int:
    """An int8 matrix's packed bytes: its values and an int32 scale per row."""
    return m.q.size + 4 * m.s.size


def _tensor_reports(checkpoint: Checkpoint, model: PackedModel) -> list[TensorReport]:
    """Errors in the checkpoint's own tensors: the fused matrices are split back into wq, wk, ..., w3."""
    c, w = checkpoint.config, checkpoint.weights
    d, kv, h = c.dim, c.kv_dim, c.hidden_dim
    qkv, w13 = dequantize(model.wqkv), dequantize(model.w13)
    rows = [
        _report("token_embedding_table", w.token_embedding_table, dequantize(model.token_embedding)),
        _report("wq", w.wq, qkv[:, :d] * np.sqrt(c.head_size)),
        _report("wk", w.wk, qkv[:, d:d + kv]),
        _report("wv", w.wv, qkv[:, d + kv:]),
        _report("wo", w.wo, dequantize(model.wo)),
        _report("w1", w.w1, w13[:, :h]),
        _report("w2", w.w2, dequantize(model.w2)),
        _report("w3", w.w3, w13[:, h:]),
    ]
    classifier = dequantize(model.wcls) + dequantize(model.wcls_residual)
    rows.append(_report("wcls (with residual)", w.wcls, classifier, _matrix_bytes(model.wcls_residual)
                        + (0 if c.shared_classifier else _matrix_bytes(model.wcls))))
    for name in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight"):
        G = getattr(model, name)
        rows.append(_report(name, getattr(w, name), G / (np.sqrt(c.dim) * 2.0 ** NORM_SHIFT), 4 * G.size))
    cos, sin = rope_tables(c.seq_len, c.head_size)
    rope = model.rope
    rows.append(_report("rope (cos, sin)", np.stack([cos, sin], axis=-1), rope / 2.0 ** ROPE_SHIFT, 2 * rope.size))
    return rows
