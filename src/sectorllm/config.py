"""ModelConfig: the shape of a Llama 2 model, with llama2.c's field names."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CheckpointError

RMS_EPS = 1e-5  # llama2.c's RMSNorm epsilon (run.c hard-codes it)


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # transformer width
    hidden_dim: int  # feed-forward width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int
    seq_len: int  # context length
    shared_classifier: bool = True  # classifier weights are the token embedding

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    @property
    def kv_mul(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        """Number of weights, llama2.c layout (norms included, RoPE tables excluded)."""
        d, h, l, kv = self.dim, self.hidden_dim, self.n_layers, self.kv_dim
        per_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * h
        classifier = 0 if self.shared_classifier else self.vocab_size * d
        return self.vocab_size * d + l * per_layer + d + classifier

    def context_bytes(self) -> int:
        """What an engine allocates for a whole context besides the weights, in float32: the KV cache, attention
        scores and a prompt batch of seq_len positions (activations of the widest layer, logits)."""
        per_position = 2 * self.n_layers * self.kv_dim + self.n_heads + 4 * self.dim + 2 * self.hidden_dim
        return 4 * (self.seq_len * per_position + self.vocab_size)

    def validate(self) -> None:
        """Refuse shapes no engine can run, or that this machine cannot hold; raises CheckpointError naming the field."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if value <= 0:
                raise CheckpointError(f"impossible model config: {name} = {value} (must be positive)")
        if self.dim % self.n_heads:
            raise CheckpointError(f"impossible model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"impossible model config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_size % 2:
            raise CheckpointError(f"impossible model config: head size {self.head_size} is odd (RoPE rotates pairs)")
        memory = physical_memory()
        if memory and self.context_bytes() > memory:
            raise CheckpointError(
                f"a {self.seq_len}-token context of this model (dim {self.dim}, {self.n_layers} layers, vocab "
                f"{self.vocab_size}) needs {self.context_bytes() / 2**30:,.1f} GiB of buffers, more than this "
                f"machine's {memory / 2**30:,.1f} GiB of memory: a corrupt header, or a model too large for this machine"
            )


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# The published tinyllamas shapes (karpathy/tinyllamas), for random-weight stand-ins of models we cannot download.
STORIES_SHAPES: dict[str, ModelConfig] = {
    "stories260K": ModelConfig(64, 172, 5, 8, 4, 512, 512),
    "stories15M": ModelConfig(288, 768, 6, 6, 6, 32000, 256),
    "stories42M": ModelConfig(512, 1376, 8, 8, 8, 32000, 1024),
    "stories110M": ModelConfig(768, 2048, 12, 12, 12, 32000, 1024),
}
