"""llama2.c checkpoints: the three formats read back what export.py's layout wrote, and bad files are refused."""

from __future__ import annotations

import struct
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sectorllm.checkpoint import MAGIC, Weights, load_checkpoint, random_weights, write_checkpoint
from sectorllm.config import ModelConfig
from sectorllm.errors import CheckpointError, SectorLLMError, TokenizerError
from sectorllm.tokenizer import load_tokenizer

from .conftest import make_checkpoint

SMALL = ModelConfig(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_float_formats_round_trip(tmp_path, version, shared):
    config = replace(SMALL, shared_classifier=shared)
    weights = random_weights(config, seed=3)
    path = tmp_path / "m.bin"
    write_checkpoint(path, config, weights, version=version)
    loaded = load_checkpoint(path)
    assert loaded.config == config and loaded.version == version
    for f in fields(Weights):
        np.testing.assert_array_equal(getattr(loaded.weights, f.name), getattr(weights, f.name), err_msg=f.name)
    assert (loaded.weights.wcls is loaded.weights.token_embedding_table) == shared


def test_legacy_layout_is_export_py_order(tmp_path):
    """Hand-built legacy file (header, then each tensor in export.py's order) reads back tensor by tensor."""
    c = SMALL
    rng = np.random.default_rng(0)
    order = [("token_embedding_table", (c.vocab_size, c.dim)), ("rms_att_weight", (2, 16)), ("wq", (2, 16, 16)),
             ("wk", (2, 8, 16)), ("wv", (2, 8, 16)), ("wo", (2, 16, 16)), ("rms_ffn_weight", (2, 16)),
             ("w1", (2, 40, 16)), ("w2", (2, 16, 40)), ("w3", (2, 40, 16)), ("rms_final_weight", (16,)),
             ("freq_cis", (2, 32, 2))]
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in order}
    blob = struct.pack("<7i", 16, 40, 2, 4, 2, 300, 32) + b"".join(t.tobytes() for t in tensors.values())
    (tmp_path / "hand.bin").write_bytes(blob)
    loaded = load_checkpoint(tmp_path / "hand.bin")
    for name, _ in order[:-1]:
        np.testing.assert_array_equal(getattr(loaded.weights, name), tensors[name], err_msg=name)


def test_q8_0_dequantizes_within_half_a_step(tmp_path):
    weights = random_weights(SMALL, seed=1)
    path = tmp_path / "q.bin"
    write_checkpoint(path, SMALL, weights, version=2, group_size=8)
    loaded = load_checkpoint(path)
    assert loaded.version == 2
    for name in ("wq", "w2", "token_embedding_table"):
        exact = getattr(weights, name).reshape(-1, 8)
        step = np.abs(exact).max(axis=1, keepdims=True) / 127
        error = np.abs(getattr(loaded.weights, name).reshape(-1, 8) - exact)
        assert np.all(error <= step / 2 + 1e-7), name
    np.testing.assert_array_equal(loaded.weights.rms_att_weight, weights.rms_att_weight)


def test_real_stories260k_header(stories260k):
    c = load_checkpoint(stories260k).config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert c.shared_classifier and c.n_params() == 260_032


def test_weights_are_memory_mapped_not_copied(stories260k):
    w = load_checkpoint(stories260k).weights
    assert not w.wq.flags.owndata and not w.wq.flags.writeable


@pytest.mark.parametrize("cut", [1, 4, 1000])
def test_truncated_and_padded_files_are_refused(tmp_path, cut):
    path = make_checkpoint(tmp_path, SMALL)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    path.write_bytes(data + b"\0" * cut)
    with pytest.raises(CheckpointError, match="padded"):
        load_checkpoint(path)


@pytest.mark.parametrize("dims, problem", [
    ((0, 40, 2, 4, 2, 300, 32), "dim = 0"),
    ((16, 40, 2, 3, 3, 300, 32), "not divisible by n_heads"),
    ((16, 40, 2, 4, 3, 300, 32), "not divisible by n_kv_heads"),
    ((16, -40, 2, 4, 2, 300, 32), "hidden_dim"),
])
def test_impossible_configs_are_refused(tmp_path, dims, problem):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *dims) + b"\0" * 4096)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path)


def test_unknown_version_is_refused(tmp_path):
    path = tmp_path / "v9.bin"
    path.write_bytes(struct.pack("<Ii", MAGIC, 9).ljust(4096, b"\0"))
    with pytest.raises(CheckpointError, match="version 9"):
        load_checkpoint(path)


def test_random_bytes_and_empty_files_are_refused(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(5).bytes(50_000))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


_corruption = st.one_of(
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=10**7)),
    st.tuples(st.just("flip"), st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=8)),
)


def _corrupt(data: bytes, how: tuple) -> bytes:
    kind, where = how
    if kind == "truncate":
        return data[: where % (len(data) + 1)]
    buf = bytearray(data)
    for bit in where:
        buf[(bit // 8) % len(buf)] ^= 1 << (bit % 8)
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=_corruption)
def test_corrupt_checkpoints_raise_only_our_errors(tmp_path, how):
    original = make_checkpoint(tmp_path, SMALL).read_bytes()
    target = tmp_path / "corrupt.bin"
    target.write_bytes(_corrupt(original, how))
    try:
        load_checkpoint(target)
    except SectorLLMError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=_corruption)
def test_corrupt_tokenizers_raise_only_our_errors(tmp_path, tok512, how):
    target = tmp_path / "corrupt_tok.bin"
    target.write_bytes(_corrupt(tok512.read_bytes(), how))
    try:
        tokenizer = load_tokenizer(target, 512)
        tokenizer.encode("Once upon a time, 日本")
    except (TokenizerError, SectorLLMError):
        pass
