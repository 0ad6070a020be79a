"""Shared fixtures: where the real model files and run.c's reference outputs are, and random-weight checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sectorllm.checkpoint import random_weights, write_checkpoint
from sectorllm.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
# No test downloads anything: a model name that is not found locally fails at once against an endpoint nobody
# listens on, in this process and in every CLI child (test_hub.py points them at its own loopback server).
DEAD_ENDPOINT = "http://127.0.0.1:9"
os.environ.update(HF_ENDPOINT=DEAD_ENDPOINT, SECTORLLM_LLAMA2_C_URL=DEAD_ENDPOINT, HF_HUB_DISABLE_TELEMETRY="1")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        message = f"{what} not found at {path} (set SECTORLLM_MODELS to ../shared/models)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _require(Path(os.environ.get("SECTORLLM_MODELS", ROOT.parent / "shared" / "models")), "the model folder")


@pytest.fixture(scope="session")
def stories260k(models_dir: Path) -> Path:
    return _require(models_dir / "stories260K.bin", "stories260K.bin")


@pytest.fixture(scope="session")
def stories260k_q80(models_dir: Path) -> Path:
    return _require(models_dir / "stories260K_q80.bin", "stories260K_q80.bin")


@pytest.fixture(scope="session")
def tok512(models_dir: Path) -> Path:
    return _require(models_dir / "tok512.bin", "tok512.bin")


@pytest.fixture(scope="session")
def llama_tokenizer(models_dir: Path) -> Path:
    return _require(models_dir / "tokenizer.bin", "tokenizer.bin")


def _reference_dir() -> Path:
    return Path(os.environ.get("SECTORLLM_REFERENCE", ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(_require(_reference_dir() / "run_c_stories260K.json", "run.c reference outputs").read_text())


@pytest.fixture(scope="session")
def runq_reference() -> dict:
    """llama2.c runq.c's outputs on stories260K_q80.bin."""
    path = _reference_dir() / "runq_stories260K_q80.json"
    return json.loads(_require(path, "runq.c reference outputs").read_text())


def require(tool: str) -> None:
    """Skip without the tool, except in CI, where a missing tool is a failure."""
    if shutil.which(tool) is None:
        if IN_CI:
            pytest.fail(f"{tool} is missing in CI: .ci/run must install it")
        pytest.skip(f"{tool} is not installed")


def emulator_module():
    """sectorllm.boot.emulator, which needs unicorn: skipped without it, except in CI."""
    if IN_CI:
        from sectorllm.boot import emulator
        return emulator
    return pytest.importorskip("sectorllm.boot.emulator", reason="unicorn is not installed")


def make_checkpoint(directory: Path, config: ModelConfig, version: int = 0, seed: int = 0) -> Path:
    """A random-weight llama2.c checkpoint of the given shape, written as export.py would."""
    path = directory / f"random_v{version}_d{config.dim}_l{config.n_layers}_v{config.vocab_size}.bin"
    write_checkpoint(path, config, random_weights(config, seed), version=version)
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m sectorllm ARGS` in a child process, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sectorllm", *args], capture_output=True, env=full_env, timeout=600)
