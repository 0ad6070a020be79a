"""The quantizer: error bounds against independent numpy arithmetic, its tables, its report and its refusals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sectorllm.checkpoint import Checkpoint, load_checkpoint, random_weights
from sectorllm.config import ModelConfig
from sectorllm.errors import QuantizeError
from sectorllm.packed import write_packed
from sectorllm.quantize import act_bits, dequantize, quantize
from sectorllm.tokenizer import load_tokenizer

SMALL = ModelConfig(dim=32, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=16)


@pytest.fixture(scope="module")
def tokenizer(tok512):
    return load_tokenizer(tok512)


def _checkpoint(config: ModelConfig = SMALL, **replace: np.ndarray) -> Checkpoint:
    weights = dataclasses.replace(random_weights(config, seed=3), **replace)
    return Checkpoint(config, weights, version=1)


@pytest.mark.parametrize("n", [1, 8, 64, 288, 516, 517, 768, 2048, 11008])
def test_act_bits_keeps_int32_sums_exact(n):
    bits = act_bits(n)
    assert 127 * 2 ** bits * n < 2 ** 31
    assert bits == 15 or 127 * 2 ** (bits + 1) * n >= 2 ** 31


def test_row_scheme_rounds_each_weight_to_half_a_step(tokenizer):
    ckpt = _checkpoint()
    model, _ = quantize(ckpt, tokenizer, "row")
    w2 = np.asarray(ckpt.weights.w2, dtype=np.float64)
    step = np.abs(w2).max(axis=-1, keepdims=True) / 127  # absmax / 127 per row, computed here independently
    err = np.abs(dequantize(model.w2) - w2)
    assert np.all(err <= step / 2 * (1 + 1e-6) + 2.0 ** -model.w2.shift * 127)
    assert np.abs(model.w2.q).max() == 127 and model.w2.q.min() >= -127


def test_fused_matrices_hold_the_checkpoint_rows(tokenizer):
    ckpt = _checkpoint()
    model, _ = quantize(ckpt, tokenizer, "row")
    c, w = SMALL, ckpt.weights
    qkv, w13 = dequantize(model.wqkv), dequantize(model.w13)
    tol = 1.0 / 127  # relative to each row's absmax
    wq_scaled = w.wq / math.sqrt(c.head_size)  # the engine's scores need no 1/sqrt(head_size) multiply
    for got, want in ((qkv[:, :c.dim], wq_scaled), (qkv[:, c.dim:c.dim + c.kv_dim], w.wk),
                      (qkv[:, c.dim + c.kv_dim:], w.wv), (w13[:, :c.hidden_dim], w.w1), (w13[:, c.hidden_dim:], w.w3)):
        bound = np.abs(want).max(axis=-1, keepdims=True) * tol
        assert np.all(np.abs(got - want) <= bound)


def test_row_beats_tensor_and_the_classifier_residual_gives_about_15_bits(tokenizer):
    ckpt = _checkpoint()
    _, row = quantize(ckpt, tokenizer, "row")
    _, tensor = quantize(ckpt, tokenizer, "tensor")
    by_name = {t.name: t for t in row.tensors}
    for r, t in zip(row.tensors, tensor.tensors):
        assert r.name == t.name and r.rel_rms_error <= t.rel_rms_error * 1.0001
    assert by_name["wcls (with residual)"].rel_rms_error < 1e-4
    assert 0.001 < by_name["wo"].rel_rms_error < 0.01


def test_tables_follow_their_formulas(tokenizer):
    model, _ = quantize(_checkpoint(), tokenizer)
    p = model.quant
    step = 2 ** p.exp_shift / 65536
    assert model.exp_table[0] == 65536 and model.exp_table[-1] == 0 and model.exp_table[-2] > 0
    for i in (0, 1, 64, 300, len(model.exp_table) - 2):
        assert model.exp_table[i] == round(math.exp(-i * step) * 65536)
    for i in (0, 100, len(model.silu_table) // 2, len(model.silu_table) - 1):
        x = (p.silu_lo + i * 2 ** p.silu_shift) / 65536
        assert model.silu_table[i] == round(x / (1 + math.exp(-x)) * 65536)
    pos, pair = 7, 1
    angle = pos * 10000.0 ** (-2 * pair / SMALL.head_size)
    cos, sin = model.rope[pos, pair] / 2 ** p.rope_shift
    assert abs(cos - math.cos(angle)) < 1e-4 and abs(sin - math.sin(angle)) < 1e-4


def test_report_sizes_match_the_file(tmp_path, tokenizer, stories260k, tok512):
    ckpt = load_checkpoint(stories260k)
    model, report = quantize(ckpt, load_tokenizer(tok512))
    path = tmp_path / "s.sllm"
    write_packed(path, model)
    assert report.packed_bytes == path.stat().st_size
    assert report.float_bytes == 1_056_540 and report.packed_bytes <= 0.40 * report.float_bytes
    table = report.format_table()
    for name in ("token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "rms_final_weight"):
        assert name in table
    weights = {t.name: t for t in report.tensors}
    c = ckpt.config
    assert weights["w1"].elements == c.n_layers * c.hidden_dim * c.dim
    assert weights["w1"].bytes == c.n_layers * c.hidden_dim * (c.dim + 4)


def test_overflowing_weights_are_refused_by_name(tokenizer):
    huge = np.array(random_weights(SMALL, seed=3).wo)
    huge[1, 2, 3] = 1e7
    with pytest.raises(QuantizeError, match="^wo: "):
        quantize(_checkpoint(wo=huge), tokenizer)
    norm = np.array(random_weights(SMALL, seed=3).rms_ffn_weight)
    norm[0, 0] = 5000.0
    with pytest.raises(QuantizeError, match="^rms_ffn_weight: "):
        quantize(_checkpoint(rms_ffn_weight=norm), tokenizer)
    nan = np.array(random_weights(SMALL, seed=3).w3)
    nan[0, 0, 0] = np.nan
    with pytest.raises(QuantizeError, match="w3 holds NaN"):
        quantize(_checkpoint(w3=nan), tokenizer)


def test_shapes_the_format_cannot_hold_are_refused(tokenizer):
    wide_vocab = ModelConfig(dim=8, hidden_dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=70000, seq_len=8)
    with pytest.raises(QuantizeError, match="vocab_size 70000"):
        quantize(_checkpoint(wide_vocab), tokenizer)
    other_vocab = dataclasses.replace(SMALL, vocab_size=600)
    with pytest.raises(QuantizeError, match="600"):
        quantize(_checkpoint(other_vocab), tokenizer)
    with pytest.raises(QuantizeError, match="scheme"):
        quantize(_checkpoint(), tokenizer, "group")
