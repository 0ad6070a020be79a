"""Inference engines: float32 (the spec, token-identical to run.c) and fixed-point (the boot engine's golden model)."""

from __future__ import annotations

import os
from typing import Protocol

import numba
import numpy as np

from ..config import ModelConfig
from ..errors import UsageError

# Below this many multiply-adds a matrix product runs on one thread: waking the others costs more than it saves.
PARALLEL_WORK = 1 << 19
# OpenMP threads that spin while they wait for the next parallel loop take the core from the thread still working
# whenever cores are shared (a busy machine, or more threads than cores): they sleep instead, unless told otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def thread_count(threads: int) -> int:
    """The threads an engine's parallel loops use: threads, or every one numba has for 0.

    Also starts numba's thread pool (get_num_threads does): the engines' parallel loops run inside compiled calls
    from compiled code, which expects the pool and does not start it.
    """
    if not 0 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise UsageError(f"threads {threads} is outside 0..{numba.config.NUMBA_NUM_THREADS}: use 0 for all cores, "
                         "or fewer")
    numba.get_num_threads()
    return threads or numba.config.NUMBA_NUM_THREADS


class Engine(Protocol):
    """What the generation loop needs: a context of seq_len positions filled one token or one batch at a time."""

    config: ModelConfig

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Run one token at position pos; returns next-token logits (vocab_size,)."""

    def step(self, token: int, pos: int, sampler) -> int:
        """forward(token, pos), then the sampler's choice of the next token."""

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Run tokens at positions 0..len-1 in one batch; returns the logits after the last one."""
