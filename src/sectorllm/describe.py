"""What a file is, for `sectorllm info`: a llama2.c checkpoint or tokenizer, a packed .sllm model, or a boot image."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .checkpoint import MAGIC as CHECKPOINT_MAGIC, load_checkpoint
from .config import ModelConfig
from .errors import PackedFormatError, SectorLLMError
from .packed import MAGIC as PACKED_MAGIC, VERSION as PACKED_VERSION, Section, read_packed, read_sections
from .tokenizer import load_tokenizer

Rows = list[tuple[str, object]]
_SECTOR = 512
_MODELS_OF_VOCAB = {512: "stories260K", 32000: "stories15M, stories42M, stories110M"}


def describe(path: str | os.PathLike) -> Rows:
    """(name, value) rows describing the file; SectorLLMError (one line) when it is none of the four kinds."""
    path = Path(path)
    from .boot.image import RUN_MAGIC, image_firmware, payload_lba

    try:
        with open(path, "rb") as f:
            start = f.read(_SECTOR)
            f.seek(payload_lba(start) * _SECTOR)
            run_magic = f.read(len(RUN_MAGIC))
    except OSError as e:
        raise SectorLLMError(f"cannot read {path}: {e.strerror}") from None
    if start[:len(PACKED_MAGIC)] == PACKED_MAGIC:
        return describe_packed(path)
    if run_magic == RUN_MAGIC or image_firmware(start) == "uefi":
        return describe_image(path)
    if int.from_bytes(start[:4], "little") == CHECKPOINT_MAGIC:
        return describe_checkpoint(path)
    # A legacy checkpoint and a tokenizer both start with a small int32 (dim, max token length): a checkpoint's
    # length must match its header exactly, so try that first, then the tokenizer.
    try:
        return describe_checkpoint(path)
    except SectorLLMError as as_checkpoint:
        try:
            return describe_tokenizer(path)
        except SectorLLMError as as_tokenizer:
            raise SectorLLMError(f"{path} is none of the files sectorllm reads: as a llama2.c checkpoint, "
                                 f"{_unnamed(as_checkpoint, path)}; as a tokenizer, {_unnamed(as_tokenizer, path)}"
                                 ) from None


def _unnamed(error: Exception, path: Path) -> str:
    return str(error).replace(f"{path}: ", "").replace(f"{path} ", "it ")


def _shape(config: ModelConfig) -> Rows:
    c = config
    return [("dim", c.dim), ("hidden_dim", c.hidden_dim), ("n_layers", c.n_layers), ("n_heads", c.n_heads),
            ("n_kv_heads", c.n_kv_heads), ("vocab_size", c.vocab_size), ("seq_len", c.seq_len),
            ("head_size", c.head_size),
            ("classifier", "shared with the embedding" if c.shared_classifier else "separate"),
            ("parameters", f"{c.n_params():,}")]


def describe_checkpoint(path: Path) -> Rows:
    checkpoint = load_checkpoint(path)
    version = {0: "llama2.c legacy (v0) float32", 1: "llama2.c v1 float32", 2: "llama2.c v2 Q8_0"}
    rows: Rows = [("file", path), ("kind", version[checkpoint.version])]
    return rows + _shape(checkpoint.config) + [("size", f"{checkpoint.file_bytes:,} bytes")]


def describe_tokenizer(path: Path) -> Rows:
    tokenizer = load_tokenizer(path)
    data = path.read_bytes()
    return [("file", path), ("kind", "llama2.c tokenizer"), ("vocab_size", tokenizer.vocab_size),
            ("max_token_length", tokenizer.max_token_length),
            ("for models", _MODELS_OF_VOCAB.get(tokenizer.vocab_size, f"any with a vocabulary of "
                                                                        f"{tokenizer.vocab_size}")),
            ("sha256", hashlib.sha256(data).hexdigest()), ("size", f"{len(data):,} bytes")]


def _packed_rows(data: bytes, name: str) -> Rows:
    """Header, CRC and section table of packed bytes (read_sections checks all three)."""
    header, entries = read_sections(data, name)
    rows: Rows = [("format version", header[1]), ("crc32", f"{header[3]:08x} (matches the contents)")]
    sections = ", ".join(f"{Section(kind).name} {entry.length:,}" for kind, entry in sorted(entries.items()))
    return rows + [("sections", f"{len(entries)}: {sections} (bytes)")]


def describe_packed(path: Path) -> Rows:
    model = read_packed(path)
    data = path.read_bytes()
    scales = {"tensor": "one scale per tensor", "row": "one scale per row, rounded to nearest",
              "calibrated": "one scale per row, rounded for each row's output on calibration text"}[model.quant.scheme]
    rows: Rows = [("file", path), ("kind", f"sectorllm packed integer model (.sllm, version {PACKED_VERSION})"),
                  ("scheme", f"{model.quant.scheme} (int8 weights, {scales})")]
    rows += _shape(model.config)
    rows += _packed_rows(data, str(path))
    return rows + [("tokenizer", f"inside: {model.tokenizer.vocab_size} pieces, max length "
                                 f"{model.tokenizer.max_token_length}"), ("size", f"{len(data):,} bytes")]


def describe_image(path: Path) -> Rows:
    from .boot.session import read_image

    image = read_image(path)
    run, layout = image.run, image.disk
    blob, size = image.model_blob(), path.stat().st_size
    passes, _ = image.forward_passes
    temperature = "0 (greedy)" if run.inv_temperature_q16 == 0 else f"{65536 / run.inv_temperature_q16:.4g}"
    topp = "off" if run.topp_q16 >= 65536 else f"{run.topp_q16 / 65536:.4g}"
    media = {"bios": "disk image, one MBR partition over the payload",
             "both": "disk image for a BIOS and UEFI: the payload's MBR partition and an EFI System Partition",
             "uefi": "disk image for UEFI: an EFI System Partition"}
    medium = "1.44 MB floppy image" if image.floppy else media[image.firmware]
    rows: Rows = [("file", path), ("kind", f"sectorllm boot image ({medium})"),
                  ("parts", f"boot sector, run block at sector {layout.payload_lba}, engine "
                            f"{layout.engine_sectors * _SECTOR:,} bytes ({layout.engine_sectors} sectors), packed model "
                            f"{layout.model_bytes:,} bytes at sector {layout.model_lba}"),
                  ("prompt", f"{len(run.prompt_tokens)} tokens (BOS first): {list(run.prompt_tokens)}"),
                  ("steps", f"{run.steps} ({passes} forward passes)"),
                  ("temperature", temperature), ("top-p", topp), ("top-k", run.topk or "off"),
                  ("min-p", f"{run.minp_q16 / 65536:.4g}" if run.minp_q16 else "off"), ("seed", run.seed),
                  ("RAM needed", f"{image.memory.memory_end // 1024:,} KiB (a 386 or later)")]
    rows += _shape(image.config)
    try:
        rows += [(f"model {name}", value) for name, value in _packed_rows(blob, "the model")]
    except PackedFormatError as e:
        rows.append(("model", f"DAMAGED: {e}"))
    return rows + [("size", f"{size:,} bytes")]
