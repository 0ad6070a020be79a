"""Float engine: the batched prompt pass agrees with the token-by-token pass, and other shapes load and generate."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sectorllm.checkpoint import Checkpoint, load_checkpoint, random_weights, write_checkpoint
from sectorllm.config import STORIES_SHAPES, ModelConfig
from sectorllm.engines.float32 import FloatEngine
from sectorllm.generate import Generation
from sectorllm.sampling import Sampler, SamplerConfig
from sectorllm.tokenizer import load_tokenizer

from .conftest import make_checkpoint, run_cli

GQA = ModelConfig(dim=48, hidden_dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=512, seq_len=64)


def _sequential_logits(engine: FloatEngine, tokens: list[int]) -> np.ndarray:
    for pos, token in enumerate(tokens):
        logits = engine.forward(token, pos)
    return logits.copy()


@pytest.mark.parametrize("source", ["stories260K", "gqa", "separate_classifier"])
def test_prefill_matches_token_by_token(source, stories260k):
    if source == "stories260K":
        checkpoint = load_checkpoint(stories260k)
    else:
        config = GQA if source == "gqa" else replace(GQA, n_kv_heads=6, shared_classifier=False)
        checkpoint = Checkpoint(config, random_weights(config, seed=7), version=1)
    tokens = [1] + np.random.default_rng(3).integers(3, 512, 40).tolist()
    engine = FloatEngine(checkpoint)
    expected = _sequential_logits(engine, tokens)
    batched = FloatEngine(checkpoint).prefill(tokens)
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-4)
    assert np.argmax(batched) == np.argmax(expected)


def test_legacy_and_v1_files_generate_the_same_tokens(tmp_path, tok512):
    tokenizer = load_tokenizer(tok512, 512)
    results = []
    for version in (0, 1):
        engine = FloatEngine(load_checkpoint(make_checkpoint(tmp_path, GQA, version=version, seed=2)))
        sampler = Sampler(SamplerConfig(temperature=0.9, seed=5))
        results.append(Generation(engine, tokenizer, "Once upon a time", 40, sampler).result.generated_tokens)
    assert results[0] == results[1] and len(results[0]) > 0


def test_context_end_stops_cleanly(tmp_path, tok512):
    """A zero final norm makes every logit 0, so greedy picks token 0 forever and only the context can stop it."""
    config = replace(GQA, seq_len=24)
    weights = replace(random_weights(config), rms_final_weight=np.zeros(config.dim, np.float32))
    path = tmp_path / "flat.bin"
    write_checkpoint(path, config, weights)
    proc = run_cli("run", str(path), "-z", str(tok512), "-t", "0", "-n", "100", "-i", "Hi", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["stop_reason"] == "context"
    assert len(result["prompt_tokens"]) - 1 + len(result["generated_tokens"]) == 24
    assert b"context" in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("shape", ["stories15M", "stories110M"])
def test_random_published_shapes_load_and_generate(tmp_path, llama_tokenizer, shape):
    path = make_checkpoint(tmp_path, STORIES_SHAPES[shape], seed=1)
    proc = run_cli("run", str(path), "-z", str(llama_tokenizer), "-n", "6", "-s", "3", "-i", "Once", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"][0] == 1
    assert len(result["generated_tokens"]) == 6 - (len(result["prompt_tokens"]) - 1) or result["stop_reason"] in (
        "bos", "eos")
    assert all(0 <= t < 32000 for t in result["generated_tokens"])


def test_tokens_stream_before_the_run_ends(stories260k, tok512):
    engine = FloatEngine(load_checkpoint(stories260k))
    generation = Generation(engine, load_tokenizer(tok512, 512), "", 50, Sampler(SamplerConfig(temperature=0)))
    first = next(iter(generation))
    assert first.generated and first.text
    assert generation._result is None  # nothing more has been computed yet
