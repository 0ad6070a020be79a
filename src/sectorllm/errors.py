"""The errors sectorllm raises on bad input; only cli.py turns them into exit codes."""


class SectorLLMError(Exception):
    """Bad input the user can fix: the message names the problem and the fix, in one line."""


class CheckpointError(SectorLLMError):
    """A model file that cannot be read as a llama2.c checkpoint."""


class TokenizerError(SectorLLMError):
    """A tokenizer file that cannot be read, or that does not fit the model."""


class PackedFormatError(SectorLLMError):
    """A packed .sllm file that is truncated, corrupt or of an unknown version."""


class QuantizeError(SectorLLMError):
    """A model the quantizer or the packed format cannot hold."""


class ModelNotFoundError(SectorLLMError):
    """A model name or path that resolves to no file."""


class UsageError(SectorLLMError):
    """An argument outside its range (temperature, top-p, steps, prompt length...)."""


class BootError(SectorLLMError):
    """The boot image cannot be built or run (missing nasm/QEMU, model too large, timeout)."""


class OutputError(SectorLLMError):
    """A file we were asked to write that must not be written (a device, a folder, an input) or has no folder."""
