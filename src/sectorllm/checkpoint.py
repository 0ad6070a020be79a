"""llama2.c checkpoints (legacy v0, v1 float32, v2 Q8_0): read memory-mapped and validated, write for tests."""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .config import ModelConfig
from .errors import CheckpointError

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
HEADER_BYTES = 256  # v1 and v2 headers are padded to this size
LEGACY_HEADER = struct.Struct("<7i")


@dataclass(frozen=True)
class Weights:
    """Float32 weights in llama2.c's names; arrays are read-only views of the file when it is float32."""

    token_embedding_table: np.ndarray  # (vocab_size, dim)
    rms_att_weight: np.ndarray  # (n_layers, dim)
    wq: np.ndarray  # (n_layers, dim, dim)
    wk: np.ndarray  # (n_layers, kv_dim, dim)
    wv: np.ndarray  # (n_layers, kv_dim, dim)
    wo: np.ndarray  # (n_layers, dim, dim)
    rms_ffn_weight: np.ndarray  # (n_layers, dim)
    w1: np.ndarray  # (n_layers, hidden_dim, dim)
    w2: np.ndarray  # (n_layers, dim, hidden_dim)
    w3: np.ndarray  # (n_layers, hidden_dim, dim)
    rms_final_weight: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab_size, dim): the embedding itself when the classifier is shared


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    weights: Weights
    version: int  # 0 legacy, 1 float32, 2 Q8_0
    path: Path | None = None
    file_bytes: int = 0


def _shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, d, kv, h = c.n_layers, c.dim, c.kv_dim, c.hidden_dim
    return {
        "token_embedding_table": (c.vocab_size, d),
        "rms_att_weight": (L, d),
        "wq": (L, d, d),
        "wk": (L, kv, d),
        "wv": (L, kv, d),
        "wo": (L, d, d),
        "rms_ffn_weight": (L, d),
        "w1": (L, h, d),
        "w2": (L, d, h),
        "w3": (L, h, d),
        "rms_final_weight": (d,),
        "wcls": (c.vocab_size, d),
    }


# The order each format stores its tensors in (llama2.c export.py); "freq_cis" is the legacy RoPE table.
_LEGACY_ORDER = ("token_embedding_table", "rms_att_weight", "wq", "wk", "wv", "wo",
                 "rms_ffn_weight", "w1", "w2", "w3", "rms_final_weight", "freq_cis")
_V1_ORDER = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table",
             "wq", "wk", "wv", "wo", "w1", "w2", "w3")
_V2_FLOAT_ORDER = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")
_V2_QUANT_ORDER = ("token_embedding_table", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _tensor_order(version: int, config: ModelConfig) -> tuple[str, ...]:
    """The tensors a file of this version stores (for v2, its int8 ones), in order; wcls last when not shared."""
    order = {0: _LEGACY_ORDER, 1: _V1_ORDER, 2: _V2_QUANT_ORDER}[version]
    return order if config.shared_classifier else order + ("wcls",)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # Python integers: a header's product of sizes can pass 2**63, and must not wrap


def _legacy_rope_shape(c: ModelConfig) -> tuple[int, ...]:
    return (2, c.seq_len, c.head_size // 2)  # cos table then sin table


def read_header(data: bytes | mmap.mmap, file_bytes: int) -> tuple[ModelConfig, int, int]:
    """Parse a checkpoint header: returns (config, version, Q8_0 group size or 0)."""
    if file_bytes < LEGACY_HEADER.size:
        raise CheckpointError(f"file is {file_bytes} bytes, too short for a llama2.c header")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MAGIC:
        if file_bytes < HEADER_BYTES:
            raise CheckpointError(f"file is {file_bytes} bytes, shorter than the 256-byte v1/v2 header")
        (version,) = struct.unpack_from("<i", data, 4)
        if version not in (1, 2):
            raise CheckpointError(f"unknown llama2.c checkpoint version {version} (sectorllm reads 0, 1 and 2)")
        dims = struct.unpack_from("<7i", data, 8)
        shared = data[36] != 0
        group_size = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        config = ModelConfig(*dims, shared_classifier=shared)
    else:
        version, group_size = 0, 0
        dims = list(LEGACY_HEADER.unpack_from(data, 0))
        shared = dims[5] > 0
        dims[5] = abs(dims[5])
        config = ModelConfig(*dims, shared_classifier=shared)
    config.validate()
    if version == 2 and (group_size <= 0 or config.dim % group_size):
        raise CheckpointError(f"Q8_0 group size {group_size} does not divide dim {config.dim}: corrupt header")
    return config, version, group_size


def _shapes_with_rope(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = _shapes(config)
    shapes["freq_cis"] = _legacy_rope_shape(config)
    return shapes


def _expected_bytes(config: ModelConfig, version: int, group_size: int) -> int:
    shapes = _shapes_with_rope(config)
    stored = sum(_numel(shapes[n]) for n in _tensor_order(version, config))
    if version != 2:
        return (LEGACY_HEADER.size if version == 0 else HEADER_BYTES) + 4 * stored
    floats = sum(_numel(shapes[n]) for n in _V2_FLOAT_ORDER)
    return HEADER_BYTES + 4 * floats + stored + 4 * (stored // group_size)


def _read_f32(data: mmap.mmap, names: tuple[str, ...], shapes: dict[str, tuple[int, ...]], offset: int,
              arrays: dict[str, np.ndarray]) -> int:
    """Views of consecutive float32 tensors from offset into arrays; returns the offset after them."""
    for name in names:
        count = _numel(shapes[name])
        arrays[name] = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shapes[name])
        offset += 4 * count
    return offset


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Memory-map a llama2.c checkpoint and return read-only views of its weights."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            if file_bytes == 0:
                raise CheckpointError(f"{path} is empty: not a llama2.c checkpoint")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    config, version, group_size = read_header(data, file_bytes)
    expected = _expected_bytes(config, version, group_size)
    if file_bytes != expected:
        how = "truncated" if file_bytes < expected else "padded"
        raise CheckpointError(
            f"{path} is {file_bytes} bytes but its header (dim {config.dim}, {config.n_layers} layers, "
            f"vocab {config.vocab_size}) needs {expected}: the file is {how} or not a llama2.c checkpoint"
        )
    if version == 2:
        weights = _read_q8_0(data, config, group_size)
    else:
        weights = _read_float(data, config, version)
    _check_finite(weights, path)
    return Checkpoint(config, weights, version, path, file_bytes)


def _check_finite(weights: Weights, path: Path) -> None:
    """Refuse NaN or infinite weights, which no engine can run: they would print <unk> (or garbage) and exit 0."""
    for f in fields(Weights):
        # A float64 sum of float32 values cannot overflow, so it is finite exactly when every value is, and it
        # needs no boolean copy of the tensor.
        if not np.isfinite(np.sum(getattr(weights, f.name), dtype=np.float64)):
            raise CheckpointError(f"{path}: {f.name} holds NaN or infinite values: the checkpoint is damaged, "
                                  f"download or export it again")


def _read_float(data: mmap.mmap, config: ModelConfig, version: int) -> Weights:
    arrays: dict[str, np.ndarray] = {}
    _read_f32(data, _tensor_order(version, config), _shapes_with_rope(config),
              LEGACY_HEADER.size if version == 0 else HEADER_BYTES, arrays)
    arrays.pop("freq_cis", None)  # run.c recomputes RoPE; so do we
    arrays.setdefault("wcls", arrays["token_embedding_table"])
    return Weights(**arrays)


def _q8_0_tensors(config: ModelConfig) -> Iterator[tuple[str, int | None, tuple[int, ...]]]:
    """v2's int8 tensors in export.py's order, each stored as its int8 values then its scales: (name, layer or
    None, shape). The per-layer weights are one tensor per layer, all layers of wq before those of wk, and so on."""
    shapes = _shapes(config)
    for name in _tensor_order(2, config):
        if name in ("token_embedding_table", "wcls"):
            yield name, None, shapes[name]
        else:
            for layer in range(config.n_layers):
                yield name, layer, shapes[name][1:]


def _read_q8_0(data: mmap.mmap, config: ModelConfig, group_size: int) -> Weights:
    """Q8_0 tensors are dequantized to float32 (q * scale, as runq.c does for the embedding)."""
    shapes = _shapes(config)
    arrays: dict[str, np.ndarray] = {}
    offset = _read_f32(data, _V2_FLOAT_ORDER, shapes, HEADER_BYTES, arrays)
    for name, layer, shape in _q8_0_tensors(config):
        count = _numel(shape)
        q = np.frombuffer(data, dtype=np.int8, count=count, offset=offset).reshape(-1, group_size)
        offset += count
        scales = np.frombuffer(data, dtype="<f4", count=count // group_size, offset=offset)
        offset += 4 * (count // group_size)
        with np.errstate(invalid="ignore"):  # 0 x inf in a damaged file: _check_finite refuses it in one line
            tensor = (q.astype(np.float32) * scales[:, None]).reshape(shape)
        if layer is None:
            arrays[name] = tensor
        else:
            arrays.setdefault(name, np.empty(shapes[name], dtype=np.float32))[layer] = tensor
    arrays.setdefault("wcls", arrays["token_embedding_table"])
    return Weights(**arrays)


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.02) -> Weights:
    """Random-weight model of a given shape, for tests and benchmarks of shapes we cannot download."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in _shapes(config).items():
        if name.startswith("rms_"):
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arrays[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    if config.shared_classifier:
        arrays["wcls"] = arrays["token_embedding_table"]
    return Weights(**arrays)


def write_checkpoint(path: str | os.PathLike, config: ModelConfig, weights: Weights,
                     version: int = 0, group_size: int = 64) -> None:
    """Write a llama2.c checkpoint (as export.py lays it out), atomically."""
    write_atomically(path, _checkpoint_parts(config, weights, version, group_size))


def _checkpoint_parts(config: ModelConfig, weights: Weights, version: int, group_size: int) -> Iterator[bytes]:
    tensors = {f.name: np.ascontiguousarray(getattr(weights, f.name), dtype="<f4") for f in fields(Weights)}
    dims = (config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads)
    if version == 0:
        vocab = config.vocab_size if config.shared_classifier else -config.vocab_size
        yield LEGACY_HEADER.pack(*dims, vocab, config.seq_len)
        tensors["freq_cis"] = _legacy_rope_table(config)
        for name in _tensor_order(0, config):
            yield tensors[name].tobytes()
        return
    header = struct.pack("<Ii7iB", MAGIC, version, *dims, config.vocab_size, config.seq_len,
                         int(config.shared_classifier))
    if version == 2:
        header += struct.pack("<i", group_size)
    yield header.ljust(HEADER_BYTES, b"\0")
    if version == 1:
        for name in _tensor_order(1, config):
            yield tensors[name].tobytes()
        return
    for name in _V2_FLOAT_ORDER:
        yield tensors[name].tobytes()
    for name, layer, _ in _q8_0_tensors(config):
        groups = (tensors[name] if layer is None else tensors[name][layer]).reshape(-1, group_size)
        scale = np.abs(groups).max(axis=1) / np.float32(127.0)  # float32 throughout, as export.py's torch code
        safe = np.where(scale == 0, np.float32(1), scale)
        yield np.round(groups / safe[:, None]).astype(np.int8).tobytes()
        yield scale.astype("<f4").tobytes()


def _legacy_rope_table(config: ModelConfig) -> np.ndarray:
    hs = config.head_size
    freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2, dtype=np.float64) / hs))
    angles = np.outer(np.arange(config.seq_len), freqs)
    return np.stack([np.cos(angles), np.sin(angles)]).astype(np.float32)
