"""`sectorllm eval` and `quantize`: the precision targets on stories260K, and the metrics' own plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sectorllm.checkpoint import load_checkpoint
from sectorllm.engines.float32 import FloatEngine
from sectorllm.evaluate import LOGIT_ONE, evaluate, first_difference, reference_text, teacher_forced
from sectorllm.tokenizer import load_tokenizer

from .conftest import run_cli


class _ScaledFloat:
    """The float engine with its logits in the fixed engine's Q16.16 units: a perfect 'fixed' engine."""

    def __init__(self, engine: FloatEngine) -> None:
        self.engine, self.config = engine, engine.config

    def forward(self, token: int, pos: int) -> np.ndarray:
        return self.engine.forward(token, pos) * LOGIT_ONE


def test_metrics_of_an_engine_against_itself(stories260k):
    checkpoint = load_checkpoint(stories260k)
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376]
    reference = reference_text(FloatEngine(checkpoint), tokens, 2, False)
    stats = teacher_forced(reference, _ScaledFloat(FloatEngine(checkpoint)))
    assert stats.agree.size == len(tokens) - 1 - 2 and stats.agree.all()
    np.testing.assert_allclose(stats.kl, 0, atol=1e-9)
    np.testing.assert_allclose(stats.nll_float, stats.nll_fixed, rtol=1e-9)
    assert first_difference(np.array([True, True, False, True])) == 2
    assert first_difference(np.array([True, True])) == 2


def test_default_scheme_meets_the_precision_targets(stories260k, tok512):
    """>= 99% top-1 over 50 prompts, greedy from BOS up to the float engine's first near-tie (token 185, gap 0.004),
    <= 40% size; calibrated rounding cuts the KL of rounding to nearest on eval's texts and on its own stories."""
    checkpoint, tokenizer = load_checkpoint(stories260k), load_tokenizer(tok512, 512)
    report = evaluate(checkpoint, tokenizer, positions=64)
    nearest = evaluate(checkpoint, tokenizer, "row", positions=64)
    assert report.scheme == "calibrated" and report.prompts == 50
    assert report.top1_agreement >= 0.99
    assert report.greedy_prefix_bos >= 185
    assert report.packed_bytes <= 0.40 * report.float_bytes
    assert report.mean_kl < 0.75 * nearest.mean_kl
    assert report.calibration_mean_kl < 0.75 * nearest.calibration_mean_kl


def test_eval_cli_json_and_plot(tmp_path, stories260k, tok512):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe cat\n", encoding="utf-8")
    plot = tmp_path / "eval.png"
    proc = run_cli("eval", str(stories260k), "-z", str(tok512), "--prompts", str(prompts), "--positions", "16",
                   "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    for key in ("top1_agreement", "mean_kl", "greedy_prefix_bos", "greedy_prefix_mean", "ppl_float", "ppl_fixed",
                "packed_bytes", "float_bytes"):
        assert key in report
    assert report["prompts"] == 2 and 0 <= report["top1_agreement"] <= 1 and report["mean_kl"] >= 0
    assert 0 <= report["greedy_prefix_mean"] <= 16 and report["ppl_fixed"] >= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_eval_refuses_an_empty_prompt_file(tmp_path, stories260k, tok512):
    empty = tmp_path / "none.txt"
    empty.write_text("\n\n")
    proc = run_cli("eval", str(stories260k), "-z", str(tok512), "--prompts", str(empty))
    assert proc.returncode == 2 and b"no prompts" in proc.stderr and b"Traceback" not in proc.stderr


def test_quantize_cli_writes_a_runnable_file_and_refuses_bad_output(tmp_path, stories260k, tok512):
    out = tmp_path / "s.sllm"
    proc = run_cli("quantize", str(stories260k), "-z", str(tok512), "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"packed file" in proc.stdout and out.stat().st_size < stories260k.stat().st_size
    run = run_cli("run", str(out), "-t", "0", "-n", "20", "--json")
    assert run.returncode == 0, run.stderr.decode()
    direct = run_cli("run", str(stories260k), "-z", str(tok512), "--engine", "fixed", "-t", "0", "-n", "20", "--json")
    assert json.loads(run.stdout)["generated_tokens"] == json.loads(direct.stdout)["generated_tokens"]
    bad = run_cli("quantize", str(stories260k), "-z", str(tok512), "-o", str(tmp_path / "missing" / "x.sllm"))
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("flags", [["--engine", "float"], ["-z", "tok512.bin"]])
def test_packed_file_refuses_float_engine_and_tokenizer(tmp_path, stories260k, tok512, flags):
    out = tmp_path / "s.sllm"
    assert run_cli("quantize", str(stories260k), "-z", str(tok512), "-o", str(out)).returncode == 0
    proc = run_cli("run", str(out), *flags)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_cli_ablate(tmp_path, stories260k, tok512):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe cat\n", encoding="utf-8")
    proc = run_cli("eval", str(stories260k), "-z", str(tok512), "--prompts", str(prompts), "--positions", "8",
                   "--ablate", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = {r["label"]: r for r in json.loads(proc.stdout)}
    assert rows["all exact (float64 model)"]["top1_agreement"] == 1
    assert rows["all exact (float64 model)"]["greedy_prefix_bos"] == 511
    assert rows["exact wq"]["exact"] == ["wq"]
