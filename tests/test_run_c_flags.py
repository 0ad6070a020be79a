"""run.c's command line: -m generate|chat, -y, and its corrections of out-of-range -t/-p/-n, against run.c's output.

The expected outputs below were printed by llama2.c run.c (commit 350e04fe, `gcc -O3 -o run run.c -lm`) with the
command line in each test; the float engine's logits are run.c's bit for bit, so the bytes must match exactly.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from sectorllm.checkpoint import random_weights, write_checkpoint
from sectorllm.config import ModelConfig

from .conftest import run_cli

# run stories260K.bin -z tok512.bin -t 0 -m chat -y "Be kind" -i "Tell me a story" -n 200, stdin "What is a cat?\n"
CHAT_GREEDY = (b"Assistant: . All the other animals, but it was too big and small. \nSuddenly, a little bird came and "
               b"asked, \"What are you doing?\" \nThe bird replied, \"I'm sorry, Sue. I'm sorry. I didn't know what is "
               b"not anything.\" \nThe bird was scared and couldn't fly anymozy. Sud\n")
# run stories260K.bin -z tok512.bin -t 1 -s 3 -n 40 -p 0   (and -p 1: both turn top-p off)
SAMPLED_TOPP_OFF = b"Once there was a big river. On the other animals lived in this trumpet. As she yelled\n"
# run RANDOM -z tok512.bin -t 1 -s 7 -m chat -y Sys -i Tell -n 256, stdin "Hi\nMore\nAgain\nAnd again\n": three
# answers, each ended by EOS, on the random-weight model of test_chat_turns_end_at_eos (263 bytes)
CHAT_THREE_TURNS_SHA256 = "f6e4cfd961009449d3f78ecb97c792f1b9c73841ab8275167542c3c8cc444ec4"


def _run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sectorllm", "run", *args], input=stdin, capture_output=True,
                          timeout=600)


def test_chat_matches_run_c(stories260k, tok512):
    proc = _run(str(stories260k), "-z", str(tok512), "-t", "0", "-m", "chat", "-y", "Be kind", "-i",
                "Tell me a story", "-n", "200", stdin=b"What is a cat?\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == CHAT_GREEDY


def test_chat_turns_end_at_eos(tmp_path, tok512):
    """A random-weight model samples EOS now and then: each EOS hands the turn back to the user, as in run.c."""
    config = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=256)
    model = tmp_path / "rand.bin"
    write_checkpoint(model, config, random_weights(config, seed=11), version=0)
    proc = _run(str(model), "-z", str(tok512), "-t", "1", "-s", "7", "-m", "chat", "-y", "Sys", "-i", "Tell",
                "-n", "256", stdin=b"Hi\nMore\nAgain\nAnd again\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.count(b"User: Assistant: ") == 2
    assert hashlib.sha256(proc.stdout).hexdigest() == CHAT_THREE_TURNS_SHA256


def test_chat_asks_for_what_the_command_line_does_not_give(stories260k, tok512):
    proc = _run(str(stories260k), "-z", str(tok512), "-t", "0", "-m", "chat", "-n", "60", stdin=b"\nHello\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"Enter system prompt (optional): User: Assistant: ")
    ended = _run(str(stories260k), "-z", str(tok512), "-m", "chat", stdin=b"")  # stdin ends: so does the chat
    assert ended.returncode == 0 and ended.stdout == b"Enter system prompt (optional): \n"


@pytest.mark.parametrize("topp", ["0", "1"])
def test_top_p_0_and_1_are_off(stories260k, tok512, topp):
    proc = _run(str(stories260k), "-z", str(tok512), "-t", "1", "-s", "3", "-n", "40", "-p", topp)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == SAMPLED_TOPP_OFF


@pytest.mark.parametrize("given, meant, note", [
    (["-t", "-1"], ["-t", "0"], "-t -1 is negative: using 0"),
    (["-p", "1.5"], ["-p", "0.9"], "-p 1.5 is outside [0, 1]: using 0.9"),
    (["-p", "-0.5"], ["-p", "0.9"], "-p -0.5 is outside [0, 1]: using 0.9"),
    (["-n", "-1"], ["-n", "0"], "-n -1 is negative: using 0"),
])
def test_out_of_range_values_are_corrected_as_run_c_does_with_a_note(stories260k, tok512, given, meant, note):
    base = [str(stories260k), "-z", str(tok512), "-s", "5", "-i", "Lily"]
    corrected, expected = _run(*base, *given), _run(*base, *meant)
    assert corrected.returncode == 0 and expected.returncode == 0
    assert corrected.stdout == expected.stdout
    assert f"note: {note}".encode() in corrected.stderr


def test_mode_generate_is_the_default(stories260k, tok512):
    base = [str(stories260k), "-z", str(tok512), "-t", "0", "-n", "30"]
    assert _run(*base, "-m", "generate").stdout == _run(*base).stdout


def test_tiny_temperatures_are_greedy(stories260k, tok512):
    """run.c prints <unk> forever at -t 1e-40 (logits / t overflow); below 1e-4 every engine here takes the argmax."""
    base = [str(stories260k), "-z", str(tok512), "-n", "60", "-s", "9"]
    greedy = _run(*base, "-t", "0").stdout
    for tiny in ("1e-40", "1e-300", "5e-5"):
        assert _run(*base, "-t", tiny).stdout == greedy
    assert _run(*base, "-t", "1e-40", "--engine", "fixed").stdout == _run(*base, "-t", "0", "--engine", "fixed").stdout


@pytest.mark.parametrize("flags, word", [
    (["-m", "talk"], "--mode"), (["-y", "sys"], "-m chat"), (["-m", "chat", "--json"], "--json"),
    (["-t", "nan"], "--temperature"), (["-t", "inf"], "--temperature"), (["-t", "70000"], "65536"),
    (["-p", "nan"], "--topp"), (["-k", str(2**63)], "top-k"), (["-k", "-1"], "top-k"), (["--minp", "1"], "min-p"),
    (["-n", "1.5"], "--steps"), (["-s", "x"], "--seed"),
])
def test_flags_outside_their_range_are_one_line(stories260k, tok512, flags, word):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), *flags)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and word in err, err
