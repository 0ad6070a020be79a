"""Calibration: the float64 whole-text forward is the float model, and calibrated rounding lowers each row's output
error on the calibration stories compared with rounding to nearest at the same scales."""

from __future__ import annotations

import numpy as np
import pytest

from sectorllm.calibrate import CALIBRATION_SEEDS, calibration_texts, forward_text, input_grams
from sectorllm.checkpoint import load_checkpoint
from sectorllm.engines.float32 import FloatEngine
from sectorllm.packed import dequantize
from sectorllm.quantize import quantize_model
from sectorllm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def checkpoint(stories260k):
    return load_checkpoint(stories260k)


def test_whole_text_forward_is_the_float_model(checkpoint):
    engine = FloatEngine(checkpoint)
    tokens = calibration_texts(checkpoint, CALIBRATION_SEEDS[:1])[0][:300]
    reference = np.array([np.array(engine.forward(t, pos), dtype=np.float64) for pos, t in enumerate(tokens)])
    np.testing.assert_allclose(forward_text(checkpoint, tokens), reference, rtol=0, atol=1e-4)  # run.c is float32


def test_calibration_stories_fill_the_context_and_differ(checkpoint):
    texts = calibration_texts(checkpoint)
    assert len(texts) == len(CALIBRATION_SEEDS) >= 8
    assert all(t[0] == 1 and len(t) == checkpoint.config.seq_len for t in texts)
    assert len({tuple(t) for t in texts}) == len(texts)


def test_calibrated_rounding_halves_the_output_error(checkpoint, tok512):
    tokenizer = load_tokenizer(tok512, 512)
    row, calibrated = quantize_model(checkpoint, tokenizer, "row"), quantize_model(checkpoint, tokenizer, "calibrated")
    grams = input_grams(checkpoint, calibration_texts(checkpoint))
    w = checkpoint.weights
    hs = checkpoint.config.head_size
    exact = {"wqkv": np.concatenate([np.asarray(w.wq, np.float64) / np.sqrt(hs), w.wk, w.wv], axis=1),
             "wo": w.wo, "w13": np.concatenate([w.w1, w.w3], axis=1), "w2": w.w2}
    for name, want in exact.items():
        a, b = getattr(row, name), getattr(calibrated, name)
        np.testing.assert_array_equal(a.s, b.s)  # the same scales: only the rounding differs
        for layer in range(checkpoint.config.n_layers):
            def error(m):
                d = dequantize(m)[layer] - want[layer]
                return np.einsum("ij,jk,ik->", d, grams[name][layer], d)  # sum over rows of E[(d . x)^2]
            assert error(b) < 0.75 * error(a), (name, layer)
    np.testing.assert_array_equal(row.token_embedding.q, calibrated.token_embedding.q)
    assert calibrated.quant.scheme == "calibrated"
