"""Parity with llama2.c run.c: every reference case through the CLI's --json, and every encoder case."""

from __future__ import annotations

import json

import pytest

from sectorllm.tokenizer import load_tokenizer

from .conftest import run_cli

CASE_FIELDS = ("prompt_tokens", "generated_tokens", "text", "stop_reason")


def _cases(reference: dict) -> list[dict]:
    return reference["generate_cases"] + reference["edge_cases"]


def test_every_generate_and_edge_case_matches_run_c(reference, stories260k, tok512):
    for case in _cases(reference):
        proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", str(case["temperature"]),
                       "-p", str(case["topp"]), "-s", str(case["seed"]), "-n", str(case["steps"]),
                       "-i", case["prompt"], "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        got = json.loads(proc.stdout)
        for field in CASE_FIELDS:
            assert got[field] == case[field], f"{field} differs for {case.get('note') or case['prompt']!r}"
        assert got["tok_per_s"] >= 0


@pytest.mark.parametrize("key, tokenizer_fixture",
                         [("encode_cases", "tok512"), ("encode_cases_tokenizer_bin", "llama_tokenizer")])
def test_encoder_matches_run_c(reference, request, key, tokenizer_fixture):
    cases = reference[key]
    tokenizer = load_tokenizer(request.getfixturevalue(tokenizer_fixture), cases[0]["vocab_size"])
    for case in cases:
        assert tokenizer.encode(case["prompt"]) == case["prompt_tokens"], repr(case["prompt"])
