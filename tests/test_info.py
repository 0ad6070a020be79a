"""`sectorllm info` on the four kinds of file the project reads or writes, and on files of none of them."""

from __future__ import annotations

import zlib

from sectorllm.boot.session import read_image

from .conftest import require, run_cli


def _rows(*args: str) -> dict[str, str]:
    proc = run_cli("info", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in proc.stdout.decode().splitlines()}


def _one_line_error(*args: str) -> str:
    proc = run_cli("info", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_checkpoints_of_every_version(stories260k, stories260k_q80):
    rows = _rows(str(stories260k))
    assert rows["kind"] == "llama2.c legacy (v0) float32"
    shape = [rows[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")]
    assert shape == ["64", "172", "5", "8", "4", "512", "512"]  # ../shared/models/README.md
    assert rows["size"] == f"{stories260k.stat().st_size:,} bytes"
    assert _rows(str(stories260k_q80))["kind"] == "llama2.c v2 Q8_0"


def test_tokenizers(tok512, llama_tokenizer):
    rows = _rows(str(tok512))
    assert rows["kind"] == "llama2.c tokenizer" and rows["vocab_size"] == "512"
    assert rows["sha256"] == "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"  # the models README
    rows = _rows(str(llama_tokenizer))
    assert rows["vocab_size"] == "32000" and "stories15M" in rows["for models"]


def test_packed_model(tmp_path, stories260k, tok512):
    packed = tmp_path / "m.sllm"
    assert run_cli("quantize", str(stories260k), "-z", str(tok512), "-o", str(packed)).returncode == 0
    rows = _rows(str(packed))
    data = packed.read_bytes()
    assert rows["kind"].startswith("sectorllm packed integer model") and rows["scheme"].startswith("calibrated")
    assert rows["crc32"].startswith(f"{zlib.crc32(data[16:]):08x}")  # docs/format.md: the CRC covers bytes 16..
    assert rows["sections"].startswith("24: TOKEN_EMBEDDING_Q")
    damaged = bytearray(data)
    damaged[4000] ^= 1
    packed.write_bytes(bytes(damaged))
    assert "bad CRC" in _one_line_error(str(packed))


def test_boot_image(tmp_path, stories260k, tok512, reference):
    require("nasm")
    image = tmp_path / "boot.img"
    proc = run_cli("image", str(stories260k), "-z", str(tok512), "-o", str(image), "-t", "0.8", "-s", "5",
                   "-n", "100", "-i", "Once upon a time")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = _rows(str(image))
    (case,) = [c for c in reference["generate_cases"] if c["prompt"] == "Once upon a time" and c["temperature"] == 0]
    assert rows["kind"] == ("sectorllm boot image (disk image for a BIOS and UEFI: the payload's MBR partition and "
                            "an EFI System Partition)")
    assert rows["prompt"].endswith(str(case["prompt_tokens"]))  # run.c's encoding of the same prompt
    assert (rows["temperature"], rows["seed"], rows["steps"]) == ("0.8", "5", "100 (100 forward passes)")
    assert rows["RAM needed"].endswith("KiB (a 386 or later)") and rows["dim"] == "64"
    assert rows["model crc32"].endswith("(matches the contents)")
    damaged = bytearray(image.read_bytes())
    damaged[read_image(image).disk.model_lba * 512 + 10_000] ^= 1  # inside the packed model
    image.write_bytes(bytes(damaged))
    assert _rows(str(image))["model"].startswith("DAMAGED")


def test_other_files_are_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n" * 10)
    assert "none of the files sectorllm reads" in _one_line_error(str(text))
    (tmp_path / "empty.bin").write_bytes(b"")
    assert "none of the files" in _one_line_error(str(tmp_path / "empty.bin"))
    assert "is a directory" in _one_line_error(str(tmp_path))
