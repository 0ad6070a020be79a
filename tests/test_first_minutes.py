"""A new user's first minutes: the README's commands and snippet work as written, notes start on their own line,
reprs are short."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib import import_module

from sectorllm import load
from sectorllm.checkpoint import random_weights, write_checkpoint
from sectorllm.cli import build_parser
from sectorllm.config import ModelConfig

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_every_readme_command_parses():
    commands = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    commands = [c.split("&&")[-1].strip() for c in commands if "sectorllm " in c]
    assert len(commands) > 10
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "sectorllm", command
        build_parser().parse_args(words[1:])  # argparse exits (fails the test) on a flag that does not exist


def test_readme_python_snippet_runs(stories260k, models_dir):
    (snippet,) = _blocks("python")
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, timeout=300,
                          env={"SECTORLLM_MODELS": str(models_dir), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr.decode()
    *story, last = proc.stdout.decode().rstrip("\n").split("\n")
    assert story and story[0].startswith("Once upon a time")
    assert re.fullmatch(r"(steps|bos|eos|context) \d+ tok/s", last), last  # on its own line, not glued


def test_notes_start_on_a_line_of_their_own(tmp_path, tok512):
    """stdout and stderr into one stream, as on a terminal: the note after the story starts a line. A random-weight
    model with a 32-token context runs into its end (with these seeds, it samples neither BOS nor EOS)."""
    config = ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=512, seq_len=32)
    path = tmp_path / "m.bin"
    write_checkpoint(path, config, random_weights(config, seed=1))
    proc = subprocess.run([sys.executable, "-m", "sectorllm", "run", str(path), "-z", str(tok512), "-s", "3",
                           "-n", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = proc.stdout.decode()
    assert "note: stopped at the end of the model's 32-token context" in text
    assert all(line.startswith("note:") for line in re.findall(r"[^\n]*note:[^\n]*", text)), text


def test_reprs_are_short_with_a_32000_token_tokenizer(tmp_path, llama_tokenizer):
    config = ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, seq_len=16)
    path = tmp_path / "m.bin"
    write_checkpoint(path, config, random_weights(config))
    for engine in ("float", "fixed"):
        model = load(path, llama_tokenizer, engine=engine)
        assert len(repr(model)) < 400 and "32000" in repr(model)
        assert len(repr(model.tokenizer)) < 100
        if model.packed is not None:
            assert len(repr(model.packed)) < 1000


def test_nothing_compiles_inside_the_timed_decode(stories260k, tok512):
    """Loading compiles the engine and generate() the sampler: iterating the generation, where decoding is timed,
    adds no compiled signature to any jitted function."""
    import numba

    dispatchers = [obj for module in ("sectorllm.engines.float32", "sectorllm.engines.fixed", "sectorllm.sampling")
                   for obj in vars(import_module(module)).values() if isinstance(obj, numba.core.dispatcher.Dispatcher)]
    for engine in ("float", "fixed"):
        model = load(stories260k, tok512, engine=engine)
        for temperature, topk, minp in ((0, 0, 0.0), (0.8, 5, 0.05)):
            generation = model.generate("Once upon a time", steps=20, temperature=temperature, topk=topk, minp=minp,
                                        seed=2)
            before = {d: len(d.signatures) for d in dispatchers}
            generation.result  # runs the generation
            assert {d: len(d.signatures) for d in dispatchers} == before, (engine, temperature)
