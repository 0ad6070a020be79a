"""The packed format: a byte-exact round trip, the layout docs/format.md promises, and every kind of bad file."""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from sectorllm.checkpoint import load_checkpoint
from sectorllm.config import ModelConfig
from sectorllm.errors import PackedFormatError
from sectorllm.packed import PackedModel, Section, is_packed, read_packed, write_packed
from sectorllm.quantize import quantize
from sectorllm.tokenizer import load_tokenizer

from .conftest import make_checkpoint

SMALL = ModelConfig(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=32)


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory, tok512) -> tuple[Path, PackedModel]:
    directory = tmp_path_factory.mktemp("packed")
    model, _ = quantize(load_checkpoint(make_checkpoint(directory, SMALL)), load_tokenizer(tok512))
    path = directory / "small.sllm"
    write_packed(path, model)
    return path, model


def _header(data: bytes) -> dict[str, int]:
    """docs/format.md's header table, parsed independently of packed.py."""
    names = ("version", "file_bytes", "crc32", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
             "vocab_size", "seq_len", "flags")
    values = struct.unpack_from("<11I", data, 4)
    fields = dict(zip(names, values))
    fields["n_sections"], fields["table_offset"], fields["head_size"], fields["kv_dim"], fields["kv_mul"] = \
        struct.unpack_from("<5I", data, 92)
    fields["exp_shift"], fields["silu_shift"] = struct.unpack_from("<2I", data, 76)
    return fields


def _entries(data: bytes) -> list[tuple[int, int, int, int]]:
    h = _header(data)
    return [struct.unpack_from("<4I", data, h["table_offset"] + 16 * i) for i in range(h["n_sections"])]


def _with_crc(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[16:])))
    return data


def _base_buffer(array: np.ndarray) -> object:
    while isinstance(array, np.ndarray):
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def test_round_trip_keeps_every_array_and_the_tokenizer(packed_file, tok512):
    path, model = packed_file
    back = read_packed(path)
    assert back.config == model.config and back.quant == model.quant
    for name in ("token_embedding", "wqkv", "wo", "w13", "w2", "wcls", "wcls_residual"):
        a, b = getattr(model, name), getattr(back, name)
        assert a.shift == b.shift and a.q.dtype == b.q.dtype == np.int8
        np.testing.assert_array_equal(a.q, b.q)
        np.testing.assert_array_equal(a.s, b.s)
    for name in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight", "rope", "exp_table", "silu_table"):
        np.testing.assert_array_equal(getattr(model, name), getattr(back, name))
    original = load_tokenizer(tok512)
    tok = back.tokenizer
    assert tok.pieces == original.pieces and tok.ids == original.ids
    assert tok.max_token_length == original.max_token_length
    np.testing.assert_array_equal(tok.scores, original.scores)
    for prompt in ("", "Once upon a time", "Lily's mom said, \"café 日本\"\n  12345"):
        assert tok.encode(prompt) == original.encode(prompt)


def test_read_maps_the_file_without_copies(packed_file):
    back = read_packed(packed_file[0])
    for array in (back.wqkv.q, back.wqkv.s, back.w2.q, back.rope, back.tokenizer.scores):
        assert isinstance(_base_buffer(array), mmap.mmap)
        assert not array.flags.writeable


def test_layout_is_little_endian_paragraph_aligned_and_crc_checked(packed_file):
    path, model = packed_file
    data = path.read_bytes()
    h = _header(data)
    assert data[:4] == b"SLLM" and h["version"] == 2 and h["file_bytes"] == len(data)
    assert h["crc32"] == zlib.crc32(data[16:])
    c = model.config
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["vocab_size"],
            h["seq_len"], h["flags"]) == (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                                           c.vocab_size, c.seq_len, 1)
    assert (h["head_size"], h["kv_dim"], h["kv_mul"]) == (4, 8, 2)
    entries = _entries(data)
    assert all(offset % 16 == 0 and offset + length <= len(data) for _, offset, length, _ in entries)
    by_kind = {kind: (offset, length, param) for kind, offset, length, param in entries}
    offset, length, param = by_kind[Section.WQKV_Q]
    qkv_rows = c.dim + 2 * c.kv_dim
    assert length == c.n_layers * qkv_rows * c.dim
    raw = np.frombuffer(data, dtype=np.int8, count=length, offset=offset).reshape(c.n_layers, qkv_rows, c.dim)
    np.testing.assert_array_equal(raw, model.wqkv.q)
    offset, length, param = by_kind[Section.WQKV_S]
    assert param == model.wqkv.shift and length == 4 * c.n_layers * qkv_rows
    assert [kind for kind, *_ in entries] == list(range(1, len(Section) + 1))  # one entry per kind, in order
    for alias, kind in ((Section.WCLS_Q, Section.TOKEN_EMBEDDING_Q), (Section.WCLS_S, Section.TOKEN_EMBEDDING_S)):
        assert by_kind[alias] == by_kind[kind]  # the classifier is the embedding: its entries repeat the embedding's


def test_tables_and_rope_are_stored_as_the_engine_reads_them(packed_file):
    """Interpolation tables: mask, last index, shift, 0, then (t[i], t[i+1] - t[i]), the SiLU table as silu(x) - x;
    RoPE: (sin, cos, -sin)."""
    path, model = packed_file
    data = path.read_bytes()
    h, by_kind = _header(data), {kind: (offset, length) for kind, offset, length, _ in _entries(data)}
    silu_lo = struct.unpack_from("<i", data, 84)[0]
    silu_minus_x = model.silu_table - (silu_lo + (np.arange(len(model.silu_table)) << h["silu_shift"]))
    for kind, table, shift in ((Section.EXP_TABLE, model.exp_table, h["exp_shift"]),
                               (Section.SILU_TABLE, silu_minus_x, h["silu_shift"])):
        offset, length = by_kind[kind]
        words = struct.unpack_from(f"<{length // 4}i", data, offset)
        assert words[:4] == ((1 << shift) - 1, len(table) - 1, shift, 0)
        assert words[4::2] == tuple(table[:-1]) and words[5::2] == tuple(np.diff(table))
    assert abs(silu_minus_x[-1]) < 8  # silu(12) - 12 rounds to (nearly) 0: past the table the engine adds 0
    offset, length = by_kind[Section.ROPE]
    c = model.config
    rope = np.frombuffer(data, dtype="<i2", count=length // 2, offset=offset).reshape(c.seq_len, c.head_size // 2, 3)
    np.testing.assert_array_equal(rope[..., 0], model.rope[..., 1])
    np.testing.assert_array_equal(rope[..., 1], model.rope[..., 0])
    np.testing.assert_array_equal(rope[..., 2], -model.rope[..., 1])


def test_bos_skip_leaves_what_run_c_prints_after_bos(packed_file, tok512):
    """After BOS run.c drops a piece's leading space, and then prints nothing for a lone unprintable byte."""
    data = packed_file[0].read_bytes()
    by_kind = {kind: (offset, length) for kind, offset, length, _ in _entries(data)}
    pieces = load_tokenizer(tok512).pieces
    offset, _ = by_kind[Section.PRINTED]
    ends = struct.unpack_from(f"<{len(pieces) + 1}I", data, offset)
    skip_offset, _ = by_kind[Section.BOS_SKIP]
    for i, piece in enumerate(pieces):
        printed = data[offset + ends[i]:offset + ends[i + 1]]
        after_bos = printed[data[skip_offset + i]:]
        stripped = piece[1:] if piece.startswith(b" ") else piece
        byte = re.fullmatch(rb"<0x([0-9A-F]{2})>", stripped)
        expected = bytes([int(byte.group(1), 16)]) if byte else stripped
        if len(expected) == 1 and not (32 <= expected[0] < 127 or expected[0] in b"\t\n\v\f\r"):
            expected = b""
        assert after_bos == expected, (i, piece)
    assert data[skip_offset + pieces.index(b" a")] == 1 and data[skip_offset + pieces.index(b"a")] == 0


def test_printed_table_holds_what_run_c_prints(packed_file, tok512):
    data = packed_file[0].read_bytes()
    offset, length = next((o, n) for kind, o, n, _ in _entries(data) if kind == Section.PRINTED)
    pieces = load_tokenizer(tok512).pieces
    ends = struct.unpack_from(f"<{len(pieces) + 1}I", data, offset)
    for i, piece in enumerate(pieces):
        printed = data[offset + ends[i]:offset + ends[i + 1]]
        byte = re.fullmatch(rb"<0x([0-9A-F]{2})>", piece)
        expected = bytes([int(byte.group(1), 16)]) if byte else piece
        if len(expected) == 1 and not (32 <= expected[0] < 127 or expected[0] in b"\t\n\v\f\r"):
            expected = b""
        assert printed == expected, (i, piece)
    assert data[offset + ends[13]:offset + ends[14]] == b"\n"  # <0x0A>


def test_is_packed(packed_file, tmp_path, stories260k):
    assert is_packed(packed_file[0])
    assert not is_packed(stories260k)
    assert not is_packed(tmp_path / "missing.sllm")


def test_write_is_atomic(packed_file, tmp_path):
    path = tmp_path / "again.sllm"
    write_packed(path, packed_file[1])
    assert [p.name for p in tmp_path.iterdir()] == ["again.sllm"]
    assert path.read_bytes() == packed_file[0].read_bytes()


def _damaged(packed_file, tmp_path, damage) -> Path:
    data = bytearray(packed_file[0].read_bytes())
    path = tmp_path / "bad.sllm"
    path.write_bytes(damage(data))
    return path


def _drop_last_section(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, 92, _header(data)["n_sections"] - 1)
    return _with_crc(data)


def _entry_outside(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, _header(data)["table_offset"] + 4, len(data) - 16)  # first entry's offset
    return _with_crc(data)


def _table_outside(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, 92, 1 << 20)
    return _with_crc(data)


def _version(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, 4, 99)
    return data


def _flip_payload_byte(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0x40
    return data


@pytest.mark.parametrize("damage, words", [
    (lambda d: d[:len(d) // 2], "truncated"),
    (lambda d: d[:100], "truncated"),
    (lambda d: b"", "truncated"),
    (_flip_payload_byte, "bad CRC"),
    (_version, "version 99"),
    (_table_outside, "section table"),
    (_entry_outside, "outside the file"),
    (_drop_last_section, "not one for each of the 24 kinds"),
    (lambda d: b"GGUF" + d[4:], "not a packed"),
])
def test_bad_files_raise_one_line_errors(packed_file, tmp_path, damage, words):
    with pytest.raises(PackedFormatError) as info:
        read_packed(_damaged(packed_file, tmp_path, damage))
    message = str(info.value)
    assert words in message and "\n" not in message
