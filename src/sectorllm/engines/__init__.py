"""Inference engines: float32 (the spec, token-identical to run.c) and fixed-point (the boot engine's golden model)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..config import ModelConfig


class Engine(Protocol):
    """What the generation loop needs: a context of seq_len positions filled one token or one batch at a time."""

    config: ModelConfig

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Run one token at position pos; returns next-token logits (vocab_size,)."""

    def step(self, token: int, pos: int, sampler) -> int:
        """forward(token, pos), then the sampler's choice of the next token."""

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Run tokens at positions 0..len-1 in one batch; returns the logits after the last one."""
