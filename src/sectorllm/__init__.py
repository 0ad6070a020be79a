"""sectorllm: Llama 2 inference from a numpy float engine down to an x86 boot sector."""

from .api import Model, load
from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .errors import SectorLLMError
from .generate import Generation, GenerationResult, Token
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Checkpoint", "Generation", "GenerationResult", "Model", "ModelConfig", "Sampler", "SamplerConfig",
           "SectorLLMError", "Token", "Tokenizer", "load", "load_checkpoint", "load_tokenizer"]
__version__ = "0.1.0"
