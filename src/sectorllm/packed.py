"""The packed .sllm format: one self-describing little-endian file holding an integer model and its tokenizer."""

from __future__ import annotations

import math
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .config import ModelConfig
from .errors import CheckpointError, PackedFormatError, QuantizeError
from .tokenizer import BOS, EOS, Tokenizer, piece_ids

MAGIC = b"SLLM"
VERSION = 2
ALIGN = 16  # every section starts on a paragraph, so 16-bit code can point a segment register at it
HEADER = struct.Struct("<4s3I 8I 9I i I 2I 3I 16x")  # 128 bytes, see docs/format.md
ENTRY = struct.Struct("<4I")  # kind, offset, length, param: one paragraph per section
CRC_FIELD = 12  # the header's crc32
CRC_START = 16  # the CRC covers everything after magic, version, file_bytes and the CRC itself
SCHEMES = ("tensor", "row", "calibrated")  # stored as the index into this tuple
DEFAULT_SCHEME = "calibrated"
MAX_FILE_BYTES = 0xFFFFFFFF  # offsets are u32 from the start of the file
MAX_VOCAB = 0xFFFF  # the sampler sums vocab_size Q16 exp values (each <= 2**16) in 32 bits


class Section(IntEnum):
    """Section kinds; the file stores them in this order."""

    TOKEN_EMBEDDING_Q = 1
    TOKEN_EMBEDDING_S = 2
    RMS_ATT_WEIGHT = 3
    WQKV_Q = 4
    WQKV_S = 5
    WO_Q = 6
    WO_S = 7
    RMS_FFN_WEIGHT = 8
    W13_Q = 9
    W13_S = 10
    W2_Q = 11
    W2_S = 12
    RMS_FINAL_WEIGHT = 13
    WCLS_Q = 14
    WCLS_S = 15
    WCLS_RESIDUAL_Q = 16
    WCLS_RESIDUAL_S = 17
    ROPE = 18
    EXP_TABLE = 19
    SILU_TABLE = 20
    PIECES = 21
    PRINTED = 22
    SCORES = 23
    BOS_SKIP = 24


@dataclass(frozen=True)
class QuantParams:
    """The integer formats the engine needs besides the model's shape (docs/arithmetic.md gives their use)."""

    scheme: str  # one of SCHEMES: how the weights were rounded; the engine treats all alike
    act_bits_dim: int  # matmul inputs of width dim are shifted down to at most this many magnitude bits
    act_bits_hidden: int  # the same for the w2 input (width hidden_dim)
    act_bits_head: int  # the same for each query head before q.k
    norm_shift: int  # RMSNorm weights are g * sqrt(dim) * 2**norm_shift
    rope_shift: int  # RoPE cos and sin are Q(rope_shift)
    rms_eps: int  # round(1e-5 * dim * 2**32): epsilon added to the sum of squares of Q16.16 values
    exp_shift: int  # exp table index = d >> exp_shift for a Q16.16 distance d >= 0
    silu_shift: int  # SiLU table step is 2**silu_shift in Q16.16 units
    silu_lo: int  # the Q16.16 input of SiLU table entry 0


@dataclass(frozen=True)
class QuantizedMatrix:
    """int8 rows with one scale each: row i of the real matrix is q[i] * s[i] / 2**shift."""

    q: np.ndarray  # int8 (..., rows, cols)
    s: np.ndarray  # int32 (..., rows), >= 0
    shift: int  # the same for every row of the matrix


def dequantize(m: QuantizedMatrix) -> np.ndarray:
    """The real matrix, float64."""
    return m.q.astype(np.float64) * (m.s.astype(np.float64) / 2.0 ** m.shift)[..., None]


@dataclass(frozen=True)
class PackedModel:
    config: ModelConfig
    quant: QuantParams
    token_embedding: QuantizedMatrix  # (vocab_size, dim)
    rms_att_weight: np.ndarray  # int32 (n_layers, dim)
    wqkv: QuantizedMatrix  # (n_layers, dim + 2 * kv_dim, dim): wq rows (times 1/sqrt(head_size)), wk rows, wv rows
    wo: QuantizedMatrix  # (n_layers, dim, dim)
    rms_ffn_weight: np.ndarray  # int32 (n_layers, dim)
    w13: QuantizedMatrix  # (n_layers, 2 * hidden_dim, dim): w1 rows, then w3 rows
    w2: QuantizedMatrix  # (n_layers, dim, hidden_dim)
    rms_final_weight: np.ndarray  # int32 (dim,)
    wcls: QuantizedMatrix  # (vocab_size, dim): token_embedding itself when config.shared_classifier
    wcls_residual: QuantizedMatrix  # (vocab_size, dim): the classifier minus wcls, in int8 again
    rope: np.ndarray  # int16 (seq_len, head_size // 2, 2): cos, sin
    exp_table: np.ndarray  # int32 (n,): exp(-i * 2**exp_shift / 65536) in Q16, last entry 0
    silu_table: np.ndarray  # int32 (n,): silu at silu_lo + i * 2**silu_shift, Q16.16
    tokenizer: Tokenizer

    def __repr__(self) -> str:
        return f"PackedModel({self.config}, {self.quant}, {self.tokenizer})"


@dataclass(frozen=True)
class SectionEntry:
    kind: int
    offset: int  # from the start of the file, a multiple of ALIGN
    length: int  # bytes, without padding
    param: int  # the scale shift for the *_S sections, 0 otherwise


_MATRICES = {  # matrix field -> its (values, scales) sections
    "token_embedding": (Section.TOKEN_EMBEDDING_Q, Section.TOKEN_EMBEDDING_S),
    "wqkv": (Section.WQKV_Q, Section.WQKV_S),
    "wo": (Section.WO_Q, Section.WO_S),
    "w13": (Section.W13_Q, Section.W13_S),
    "w2": (Section.W2_Q, Section.W2_S),
    "wcls": (Section.WCLS_Q, Section.WCLS_S),
    "wcls_residual": (Section.WCLS_RESIDUAL_Q, Section.WCLS_RESIDUAL_S),
}
_CLASSIFIER_ALIASES = tuple(zip(_MATRICES["wcls"], _MATRICES["token_embedding"]))  # a shared classifier's entries
_NORMS = {"rms_att_weight": Section.RMS_ATT_WEIGHT, "rms_ffn_weight": Section.RMS_FFN_WEIGHT,
          "rms_final_weight": Section.RMS_FINAL_WEIGHT}


def _matrix_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, d, h = c.n_layers, c.dim, c.hidden_dim
    return {"token_embedding": (c.vocab_size, d), "wqkv": (L, d + 2 * c.kv_dim, d), "wo": (L, d, d),
            "w13": (L, 2 * h, d), "w2": (L, d, h), "wcls": (c.vocab_size, d), "wcls_residual": (c.vocab_size, d)}


def _stored_matrices(c: ModelConfig) -> list[str]:
    """The matrices with sections of their own: all but a classifier shared with the embedding."""
    return [name for name in _MATRICES if not (name == "wcls" and c.shared_classifier)]


def _fixed_sections(c: ModelConfig) -> dict[Section, tuple[np.dtype, tuple[int, ...]]]:
    """dtype and shape of every section whose size the config fixes."""
    out: dict[Section, tuple[np.dtype, tuple[int, ...]]] = {}
    shapes = _matrix_shapes(c)
    for name in _stored_matrices(c):
        q_kind, s_kind = _MATRICES[name]
        shape = shapes[name]
        out[q_kind] = (np.dtype(np.int8), shape)
        out[s_kind] = (np.dtype("<i4"), shape[:-1])
    out[Section.RMS_ATT_WEIGHT] = out[Section.RMS_FFN_WEIGHT] = (np.dtype("<i4"), (c.n_layers, c.dim))
    out[Section.RMS_FINAL_WEIGHT] = (np.dtype("<i4"), (c.dim,))
    out[Section.ROPE] = (np.dtype("<i2"), (c.seq_len, c.head_size // 2, 3))
    out[Section.SCORES] = (np.dtype("<f4"), (c.vocab_size,))
    out[Section.BOS_SKIP] = (np.dtype(np.uint8), (c.vocab_size,))
    return out


def check_shape(config: ModelConfig) -> None:
    """Refuse a shape this format (or the arithmetic it carries) cannot hold; raises QuantizeError with the reason."""
    if config.vocab_size > MAX_VOCAB:
        raise QuantizeError(f"vocab_size {config.vocab_size} > {MAX_VOCAB}: the sampler's 32-bit sum of "
                            "Q16 probabilities would overflow")
    if config.seq_len > 0x7FFF:
        raise QuantizeError(f"seq_len {config.seq_len} > 32767: attention's 32-bit sum of Q16 weights would overflow")


def _string_table(strings: list[bytes]) -> bytes:
    """(n + 1) u32 offsets from the section start, then the bytes: string i is [off[i], off[i+1])."""
    base = 4 * (len(strings) + 1)
    ends = np.cumsum([0] + [len(s) for s in strings], dtype=np.int64) + base
    return ends.astype("<u4").tobytes() + b"".join(strings)


def _read_string_table(data: memoryview, count: int, what: str) -> list[bytes]:
    if len(data) < 4 * (count + 1):
        raise PackedFormatError(f"the {what} section is too short for {count} offsets: the file is damaged")
    ends = np.frombuffer(data, dtype="<u4", count=count + 1)
    if ends[0] != 4 * (count + 1) or ends[-1] != len(data) or np.any(np.diff(ends.astype(np.int64)) < 0):
        raise PackedFormatError(f"the {what} section's offsets are inconsistent: the file is damaged")
    raw = bytes(data)
    return [raw[ends[i]:ends[i + 1]] for i in range(count)]


def _lookup_form(table: np.ndarray, shift: int) -> bytes:
    """An interpolation table as the engine reads it: mask 2**shift - 1, the last index n - 1, shift, 0, then the
    n - 1 pairs (t[i], t[i+1] - t[i])."""
    t = np.asarray(table, dtype=np.int64)
    pairs = np.stack([t[:-1], np.diff(t)], axis=1)
    head = np.array([(1 << shift) - 1, len(t) - 1, shift, 0], dtype=np.int64)
    return np.concatenate([head, pairs.ravel()]).astype("<i4").tobytes()


def _read_lookup_form(data: bytes | mmap.mmap, entry: SectionEntry, shift: int, name: str) -> np.ndarray:
    """The table t back from _lookup_form's layout, checking its head."""
    kind = Section(entry.kind).name
    if entry.length < 24 or entry.length % 8:
        raise PackedFormatError(f"{name}: section {kind} is {entry.length} bytes: the file is damaged")
    words = np.frombuffer(data, dtype="<i4", count=entry.length // 4, offset=entry.offset).astype(np.int64)
    pairs = words[4:].reshape(-1, 2)
    if list(words[:4]) != [(1 << shift) - 1, len(pairs), shift, 0]:
        raise PackedFormatError(f"{name}: section {kind} has a head that does not match its length and shift: "
                                "the file is damaged")
    return np.append(pairs[:, 0], pairs[-1, 0] + pairs[-1, 1]).astype(np.int32)


def _silu_inputs(p: QuantParams, n: int) -> np.ndarray:
    """The Q16.16 inputs x_i = silu_lo + i * 2**silu_shift of the SiLU table's entries."""
    return p.silu_lo + (np.arange(n, dtype=np.int64) << p.silu_shift)


def bos_skips(tok: Tokenizer, printed: list[bytes]) -> np.ndarray:
    """Per token, how many leading bytes of its PRINTED string run.c leaves out right after BOS (0, 1 or all)."""
    skips = np.zeros(tok.vocab_size, dtype=np.uint8)
    for i, full in enumerate(printed):
        after_bos = tok.piece_bytes(BOS, i)
        if not full.endswith(after_bos):
            raise QuantizeError(f"token {i}'s bytes after BOS are not a suffix of its bytes elsewhere")
        skips[i] = len(full) - len(after_bos)
    return skips


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _payloads(model: PackedModel) -> list[tuple[Section, bytes, int]]:
    c = model.config
    expected = _fixed_sections(c)
    parts: dict[Section, tuple[bytes, int]] = {}

    def put(kind: Section, array: np.ndarray, param: int = 0) -> None:
        dtype, shape = expected[kind]
        if array.shape != shape:
            raise QuantizeError(f"section {kind.name} has shape {array.shape}, the format needs {shape}")
        parts[kind] = (np.ascontiguousarray(array, dtype=dtype).tobytes(), param)

    for name in _stored_matrices(c):
        q_kind, s_kind = _MATRICES[name]
        matrix: QuantizedMatrix = getattr(model, name)
        put(q_kind, matrix.q)
        put(s_kind, matrix.s, matrix.shift)
    for name, kind in _NORMS.items():
        put(kind, getattr(model, name))
    rope = np.asarray(model.rope)
    put(Section.ROPE, np.stack([rope[..., 1], rope[..., 0], -rope[..., 1]], axis=-1))  # sin, cos, -sin
    put(Section.SCORES, np.asarray(model.tokenizer.scores))
    parts[Section.EXP_TABLE] = (_lookup_form(model.exp_table, model.quant.exp_shift), 0)
    silu_inputs = _silu_inputs(model.quant, len(model.silu_table))  # stored as silu(x) - x, which is 0 past the end
    parts[Section.SILU_TABLE] = (_lookup_form(model.silu_table - silu_inputs, model.quant.silu_shift), 0)
    parts[Section.PIECES] = (_string_table(model.tokenizer.pieces), 0)
    tok = model.tokenizer  # what run.c prints for each token after any token but BOS, and what it leaves out after BOS
    printed = [tok.piece_bytes(EOS, i) for i in range(tok.vocab_size)]
    parts[Section.PRINTED] = (_string_table(printed), 0)
    put(Section.BOS_SKIP, bos_skips(tok, printed))
    return [(kind, *parts[kind]) for kind in Section if kind in parts]


def _header(model: PackedModel, file_bytes: int, crc: int, n_sections: int) -> bytes:
    c, p = model.config, model.quant
    return HEADER.pack(MAGIC, VERSION, file_bytes, crc,
                       c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len,
                       int(c.shared_classifier),
                       SCHEMES.index(p.scheme), p.act_bits_dim, p.act_bits_hidden, p.act_bits_head, p.norm_shift,
                       p.rope_shift, p.rms_eps, p.exp_shift, p.silu_shift, p.silu_lo, model.tokenizer.max_token_length,
                       n_sections, HEADER.size, c.head_size, c.kv_dim, c.kv_mul)


def _layout(payloads: list[tuple[Section, bytes, int]]) -> tuple[list[SectionEntry], int]:
    """Each section's place (paragraph-aligned, in kind order after the table) and the file size; the table has an
    entry for every kind, a shared classifier's two entries repeating the embedding's."""
    offset = _align(HEADER.size + ENTRY.size * len(Section))
    placed = {}
    for kind, data, param in payloads:
        placed[kind] = SectionEntry(kind, offset, len(data), param)
        offset = _align(offset + len(data))
    for alias, kind in _CLASSIFIER_ALIASES:
        if alias not in placed:
            placed[alias] = replace(placed[kind], kind=alias)
    return [placed[kind] for kind in Section], offset


def packed_bytes(model: PackedModel) -> int:
    """The size write_packed would give the file."""
    return _layout(_payloads(model))[1]


def pack(model: PackedModel) -> bytearray:
    """The packed file's bytes for a model: what write_packed writes, and what a boot image holds."""
    check_shape(model.config)
    if model.tokenizer.vocab_size != model.config.vocab_size:
        raise QuantizeError(f"the tokenizer has {model.tokenizer.vocab_size} pieces but the model's vocabulary "
                            f"is {model.config.vocab_size}")
    payloads = _payloads(model)
    entries, file_bytes = _layout(payloads)
    if file_bytes > MAX_FILE_BYTES:
        raise QuantizeError(f"the packed model would be {file_bytes} bytes: u32 offsets reach only 4 GiB")
    image = bytearray(file_bytes)
    data_of = {kind: data for kind, data, _ in payloads}  # an aliased classifier has none of its own
    for i, entry in enumerate(entries):
        ENTRY.pack_into(image, HEADER.size + ENTRY.size * i, entry.kind, entry.offset, entry.length, entry.param)
        if entry.kind in data_of:
            image[entry.offset:entry.offset + entry.length] = data_of[entry.kind]
    image[:HEADER.size] = _header(model, file_bytes, 0, len(entries))
    struct.pack_into("<I", image, CRC_FIELD, zlib.crc32(memoryview(image)[CRC_START:]))
    return image


def write_packed(path: str | os.PathLike, model: PackedModel) -> None:
    """Write a packed model atomically (a temporary file, then os.replace)."""
    write_atomically(path, (pack(model),))


def is_packed(path: str | os.PathLike) -> bool:
    """True when the file starts with the packed magic (whatever its version or state)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_sections(data: bytes | mmap.mmap, name: str = "packed file") -> tuple[tuple, dict[int, SectionEntry]]:
    """Check magic, version, size, CRC and the section table; returns (header fields, kind -> entry)."""
    size = len(data)
    if size < HEADER.size:
        if size >= len(MAGIC) and data[:len(MAGIC)] != MAGIC:
            raise PackedFormatError(f"{name} is not a packed sectorllm model (no SLLM magic)")
        raise PackedFormatError(f"{name} is truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
    header = HEADER.unpack_from(data, 0)
    magic, version, file_bytes, crc = header[:4]
    if magic != MAGIC:
        raise PackedFormatError(f"{name} is not a packed sectorllm model (no SLLM magic)")
    if version != VERSION:
        raise PackedFormatError(f"{name} has format version {version}; this sectorllm reads version {VERSION}: "
                                "re-pack the model with this version")
    if size < file_bytes:
        raise PackedFormatError(f"{name} is truncated: {size} bytes, its header says {file_bytes}")
    if size > file_bytes:
        raise PackedFormatError(f"{name} is {size} bytes, its header says {file_bytes}: trailing data, damaged")
    if zlib.crc32(memoryview(data)[CRC_START:]) != crc:
        raise PackedFormatError(f"{name} has a bad CRC: the file is corrupt, re-pack or re-download it")
    n_sections, table_offset = header[-5:-3]
    if n_sections != len(Section):
        raise PackedFormatError(f"{name}'s section table has {n_sections} entries, not one for each of the "
                                f"{len(Section)} kinds: the file is damaged")
    if table_offset + ENTRY.size * n_sections > size:
        raise PackedFormatError(f"{name}'s section table ({n_sections} entries at {table_offset}) lies outside "
                                "the file: the file is damaged")
    entries: dict[int, SectionEntry] = {}
    for i in range(n_sections):
        entry = SectionEntry(*ENTRY.unpack_from(data, table_offset + ENTRY.size * i))
        if entry.offset + entry.length > size or entry.offset < table_offset + ENTRY.size * n_sections:
            raise PackedFormatError(f"{name}: section {entry.kind} ({entry.length} bytes at {entry.offset}) "
                                    "points outside the file's data: the file is damaged")
        if entry.offset % ALIGN:
            raise PackedFormatError(f"{name}: section {entry.kind} at {entry.offset} is not paragraph-aligned")
        if entry.kind != i + 1:
            raise PackedFormatError(f"{name}: table entry {i} is for section kind {entry.kind}, not {i + 1}: "
                                    "the file is damaged")
        entries[entry.kind] = entry
    return header, entries


def header_config(header: tuple) -> ModelConfig:
    """The model shape from the header's fields (HEADER.unpack): dims at 4..10, flags (bit 0: shared classifier) at 11."""
    return ModelConfig(*header[4:11], shared_classifier=bool(header[11] & 1))


def read_packed(path: str | os.PathLike) -> PackedModel:
    """Memory-map a packed model: every array is a read-only view of the file, except the two small interpolation
    tables, rebuilt from their lookup form."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise PackedFormatError(f"{path} is empty (truncated): not a packed model")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise PackedFormatError(f"cannot read packed model {path}: {e.strerror}") from None
    header, entries = read_sections(data, str(path))
    scheme, *quant, max_token_length = header[12:-5]
    config = header_config(header)
    try:
        config.validate()
    except CheckpointError as e:
        raise PackedFormatError(f"{path}: {e}") from None
    if tuple(header[-3:]) != (config.head_size, config.kv_dim, config.kv_mul):
        raise PackedFormatError(f"{path}: the header's head_size, kv_dim and kv_mul {tuple(header[-3:])} do not "
                                "follow from its shape: the file is damaged")
    if scheme >= len(SCHEMES):
        raise PackedFormatError(f"{path}: unknown quantization scheme {scheme}: the file is damaged")
    params = QuantParams(SCHEMES[scheme], *quant)

    arrays: dict[Section, np.ndarray] = {}
    for kind, (dtype, shape) in _fixed_sections(config).items():
        entry = entries[kind]  # read_sections saw an entry for every kind
        count = math.prod(shape)  # Python integers: a damaged header must not wrap past 2**63
        if entry.length != count * dtype.itemsize:
            raise PackedFormatError(f"{path}: section {kind.name} is {entry.length} bytes, the config needs "
                                    f"{count * dtype.itemsize}: the file is damaged")
        arrays[kind] = np.frombuffer(data, dtype=dtype, count=count, offset=entry.offset).reshape(shape)
    tables = {kind: _read_lookup_form(data, entries[kind], shift, str(path))
              for kind, shift in ((Section.EXP_TABLE, params.exp_shift), (Section.SILU_TABLE, params.silu_shift))}
    silu = tables[Section.SILU_TABLE]
    tables[Section.SILU_TABLE] = (silu + _silu_inputs(params, len(silu))).astype(np.int32)
    rope = arrays[Section.ROPE]
    if np.any(rope[..., 2] != -rope[..., 0]):
        raise PackedFormatError(f"{path}: the ROPE section's -sin column is not the negated sin: the file is damaged")
    pieces_entry = entries[Section.PIECES]
    view = memoryview(data)[pieces_entry.offset:pieces_entry.offset + pieces_entry.length]
    pieces = _read_string_table(view, config.vocab_size, "PIECES")
    tokenizer = Tokenizer(pieces, arrays[Section.SCORES], max_token_length, piece_ids(pieces))

    if config.shared_classifier and any(
            (entries[alias].offset, entries[alias].length) != (entries[kind].offset, entries[kind].length)
            for alias, kind in _CLASSIFIER_ALIASES):
        raise PackedFormatError(f"{path}: the shared classifier's entries are not the embedding's: the file is damaged")
    matrices = {}
    for name, (q_kind, s_kind) in _MATRICES.items():
        if name == "wcls" and config.shared_classifier:
            matrices[name] = matrices["token_embedding"]
        else:
            matrices[name] = QuantizedMatrix(arrays[q_kind], arrays[s_kind], entries[s_kind].param)
    norms = {name: arrays[kind] for name, kind in _NORMS.items()}
    _check_params(params, matrices, str(path))
    return PackedModel(config, params, rope=rope[..., 1::-1],  # cos, sin: a view
                       exp_table=tables[Section.EXP_TABLE],
                       silu_table=tables[Section.SILU_TABLE], tokenizer=tokenizer, **matrices, **norms)


def _check_params(p: QuantParams, matrices: dict[str, QuantizedMatrix], name: str) -> None:
    """Refuse parameters that would make a shift negative or a table lookup read outside its table."""
    bits = (p.act_bits_dim, p.act_bits_hidden, p.act_bits_head)
    problems = []
    if not all(1 <= b <= 15 for b in bits):
        problems.append(f"activation bits {bits} outside 1..15")
    if not (0 < p.norm_shift < 32 and 0 < p.rope_shift < 16 and 0 < p.exp_shift < 16 and 0 < p.silu_shift < 16):
        problems.append("a table or weight shift is outside its range")
    for mname, m in matrices.items():
        if not 33 - min(bits) <= m.shift <= 31:
            problems.append(f"{mname} scale shift {m.shift} outside {33 - min(bits)}..31")
    if problems:
        raise PackedFormatError(f"{name}: {'; '.join(problems)}: the file is damaged or from another packer")
