"""The command line as a user meets it: bad input gets one line and exit code 2, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import run_cli


def _assert_one_line_error(proc, *words: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: loading")]
    assert len(lines) == 1 and lines[0].startswith("sectorllm"), err
    for word in words:
        assert word in lines[0], err


def test_truncated_checkpoint(tmp_path, stories260k, tok512):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(stories260k.read_bytes()[:-100])
    _assert_one_line_error(run_cli("run", str(bad), "-z", str(tok512)), "truncated")


def test_random_bytes_checkpoint(tmp_path, tok512):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    _assert_one_line_error(run_cli("run", str(bad), "-z", str(tok512)))


def test_wrong_tokenizer(stories260k, llama_tokenizer):
    _assert_one_line_error(run_cli("run", str(stories260k), "-z", str(llama_tokenizer)), "tok512.bin")


def test_prompt_longer_than_context(stories260k, tok512):
    _assert_one_line_error(run_cli("run", str(stories260k), "-z", str(tok512), "-i", "word " * 2000), "context")


def test_unknown_model_name():
    _assert_one_line_error(run_cli("run", "stories7B"), "stories260K")


def test_unknown_flag_is_one_line():
    _assert_one_line_error(run_cli("run", "--frobnicate"), "--help")


def test_steps_beyond_context_are_clamped_with_a_note(stories260k, tok512):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "5000", "-i", "Lily", "--json")
    assert proc.returncode == 0
    assert b"beyond the model's 512-token context" in proc.stderr
    assert json.loads(proc.stdout)["stop_reason"] in ("bos", "eos", "context")


def test_plain_run_streams_text_and_reports_speed(stories260k, tok512):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "30")
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"Once upon a time") and proc.stdout.endswith(b"\n")
    assert b"achieved tok/s:" in proc.stderr


def test_bench_json(stories260k):
    proc = run_cli("bench", str(stories260k), "--decode", "16", "--prefill", "16", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)
    assert result["engine"] == "float" and result["decode_tokens"] == 16
    assert result["decode_tok_per_s"] > 0 and result["prefill_tok_per_s"] > 0


def test_run_on_export_py_q8_0_file_tells_runq_story(stories260k_q80, tok512, runq_reference):
    """runq.c's greedy story from "Once upon a time" (its int8 activations never flip a token of this one)."""
    (case,) = [c for c in runq_reference["generate_cases"] if c["prompt"] == "Once upon a time"]
    proc = run_cli("run", str(stories260k_q80), "-z", str(tok512), "-t", "0", "-n", str(case["steps"]),
                   "-i", case["prompt"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == case["text"]


def test_non_finite_weights_are_refused_by_every_engine(tmp_path, stories260k, tok512):
    data = bytearray(stories260k.read_bytes())
    data[28 + 4 * 1000:28 + 4 * 1001] = np.float32(np.nan).tobytes()  # one value of the token embedding
    bad = tmp_path / "nan.bin"
    bad.write_bytes(bytes(data))
    for engine in ("float", "fixed"):
        _assert_one_line_error(run_cli("run", str(bad), "-z", str(tok512), "--engine", engine), "NaN or infinite")
    _assert_one_line_error(run_cli("info", str(bad)), "NaN or infinite")


def test_header_sizes_past_64_bits_are_one_line(tmp_path):
    bad = tmp_path / "huge.bin"
    bad.write_bytes(np.array([2**20, 2**20, 2**24, 2**19, 1, 2, 1], "<i4").tobytes() + bytes(4096))
    _assert_one_line_error(run_cli("info", str(bad)), "truncated")
    _assert_one_line_error(run_cli("run", str(bad)), "truncated")


@pytest.mark.parametrize("flags", [["--decode", "0"], ["--prefill", "0"], ["--decode", "-5"], ["--prefill", "x"]])
def test_bench_sizes_below_one_are_one_line(stories260k, flags):
    _assert_one_line_error(run_cli("bench", str(stories260k), *flags), flags[0])


def test_eval_positions_below_one_is_one_line(stories260k):
    _assert_one_line_error(run_cli("eval", str(stories260k), "--positions", "0"), "--positions")


def test_eval_plot_with_ablate_is_one_line(stories260k, tmp_path):
    _assert_one_line_error(run_cli("eval", str(stories260k), "--ablate", "--plot", str(tmp_path / "p.png")), "--ablate")
