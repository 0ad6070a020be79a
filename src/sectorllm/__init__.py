"""sectorllm: Llama 2 inference from a numpy float engine down to an x86 boot sector."""

from importlib import import_module

_EXPORTS = {  # public name -> the module that defines it, imported on first use so the CLI starts fast
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "Model": "api", "load": "api",
    "ModelConfig": "config", "SectorLLMError": "errors", "Generation": "generate", "GenerationResult": "generate",
    "Token": "generate", "Sampler": "sampling", "SamplerConfig": "sampling", "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
