"""The error budget's engine: no step exact is the fixed engine bit for bit, every step exact is the float model."""

from __future__ import annotations

import numpy as np
import pytest

from sectorllm.checkpoint import load_checkpoint
from sectorllm.engines.fixed import FixedEngine
from sectorllm.engines.float32 import FloatEngine
from sectorllm.engines.simulate import STEPS, SimulatedEngine
from sectorllm.evaluate import ablate
from sectorllm.quantize import quantize_model
from sectorllm.tokenizer import load_tokenizer

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 365, 259, 297, 414, 261, 318, 47, 13, 400, 356]


@pytest.fixture(scope="module")
def models(stories260k, tok512):
    checkpoint = load_checkpoint(stories260k)
    return checkpoint, quantize_model(checkpoint, load_tokenizer(tok512, 512))


def _logits(engine, tokens=TOKENS) -> np.ndarray:
    return np.array([np.array(engine.forward(t, pos), dtype=np.float64) for pos, t in enumerate(tokens)])


def test_no_step_exact_is_the_fixed_engine_bit_for_bit(models):
    checkpoint, packed = models
    tokens = TOKENS * 6  # 120 positions: long attention spans, far exp-table entries
    np.testing.assert_array_equal(_logits(SimulatedEngine(checkpoint, packed), tokens),
                                  _logits(FixedEngine(packed), tokens))


def test_every_step_exact_is_the_float_model(models):
    checkpoint, packed = models
    simulated = _logits(SimulatedEngine(checkpoint, packed, STEPS)) / 65536
    reference = _logits(FloatEngine(checkpoint))  # run.c's logits, float32
    np.testing.assert_allclose(simulated, reference, rtol=0, atol=1e-4)  # float32 rounding; int8 moves 1e-2


def test_each_switch_changes_the_logits(models):
    checkpoint, packed = models
    fixed = _logits(FixedEngine(packed))
    for step in STEPS:
        simulated = _logits(SimulatedEngine(checkpoint, packed, {step}))
        assert not np.array_equal(simulated, fixed), step
        assert np.abs(simulated - fixed).max() < 0.5 * 65536, step  # one step exact moves logits a little


def test_unknown_step_is_refused(models):
    with pytest.raises(ValueError, match="unknown steps"):
        SimulatedEngine(*models, {"weights"})


def test_ablation_rows_score_the_fixed_engine_and_the_float_model(stories260k, tok512):
    from sectorllm.evaluate import evaluate

    checkpoint, tokenizer = load_checkpoint(stories260k), load_tokenizer(tok512, 512)
    prompts = ["Once upon a time", "The cat"]
    rows = ablate(checkpoint, tokenizer, "row", prompts, 24, greedy_bos=40,
                  rows=[("none", frozenset()), ("all", frozenset(STEPS))])
    report = evaluate(checkpoint, tokenizer, "row", prompts, 24, greedy_bos=40)
    assert (rows[0].top1_agreement, rows[0].mean_kl) == (report.top1_agreement, report.mean_kl)
    assert (rows[0].greedy_prefix_bos, rows[0].greedy_prefix_mean) == (report.greedy_prefix_bos,
                                                                       report.greedy_prefix_mean)
    assert rows[1].top1_agreement == 1 and rows[1].mean_kl < 1e-8 and rows[1].greedy_prefix_bos == 40
    assert rows[1].exact == tuple(STEPS)
