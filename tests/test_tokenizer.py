"""Tokenizer: the fast merge loop against a literal transcription of run.c's, and run.c's print rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sectorllm.errors import TokenizerError, UsageError
from sectorllm.tokenizer import BOS, Tokenizer, load_tokenizer


def run_c_merges(tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    """run.c's O(n^2) loop, transcribed literally: rescan every pair, take the best score, leftmost on ties."""
    tokens = list(tokens)
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = tokenizer.ids.get(tokenizer.pieces[tokens[i]] + tokenizer.pieces[tokens[i + 1]])
            if merged is not None and tokenizer.scores[merged] > best_score:
                best_score, best_id, best_idx = tokenizer.scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


@pytest.fixture(scope="module")
def tok(tok512) -> Tokenizer:
    return load_tokenizer(tok512, 512)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(list("abcdeht ons.,!\n'é日") + ["ll", "the", "  "]), max_size=40).map("".join))
def test_fast_merges_equal_run_c_loop(tok, text):
    tokens = tok.encode(text)
    unmerged = [BOS] + ([tok.ids[b" "]] if text else []) + tok._code_point_tokens(text.encode())
    assert tokens == run_c_merges(tok, unmerged)


def test_long_prompt_encodes_quickly_and_correctly(llama_tokenizer):
    tokenizer = load_tokenizer(llama_tokenizer, 32000)
    text = "Once upon a time, a little robot named Zed wandered through the quiet town. " * 140
    assert len(text) > 10_000
    tokens = tokenizer.encode(text)
    assert tokenizer.decode(tokens[1:]).decode() == text


def test_print_rules(tok):
    newline = tok.ids[b"<0x0A>"]
    assert tok.piece_bytes(5, newline) == b"\n"
    assert tok.piece_bytes(5, tok.ids[b"<0xC3>"]) == b""  # raw bytes >= 0x80 are not printed
    assert tok.piece_bytes(5, tok.ids[b"<0x07>"]) == b""  # nor control characters that are not spaces
    assert tok.piece_bytes(BOS, tok.ids[b" a"]) == b"a"  # leading space dropped after BOS only
    assert tok.piece_bytes(7, tok.ids[b" a"]) == b" a"


def test_wrong_tokenizer_is_refused_with_the_right_name(llama_tokenizer):
    with pytest.raises(TokenizerError, match="use tok512.bin"):
        load_tokenizer(llama_tokenizer, 512)


def test_nul_in_prompt_is_refused(tok):
    with pytest.raises(UsageError, match="NUL"):
        tok.encode("a\0b")


def test_non_tokenizer_file_is_refused(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(TokenizerError):
        load_tokenizer(path)
