"""decodax: accelerated and controlled decoding as pure, composable JAX transforms."""

from decodax import jacobi, speculative, strategies
from decodax.decoding import Decoder, DecodeState, GenerateOutput, autoregressive, generate
from decodax.methods import make_decoder, register
from decodax.model.cache import KVCache, commit, gather, init_cache, rollback
from decodax.model.config import ModelConfig, tiny_config
from decodax.model.default import default_model_path, load_default
from decodax.model.gguf import load_gguf
from decodax.model.tokenizer import Tokenizer
from decodax.model.transformer import Model, ModelOutput
from decodax.sampling import Sampler, make_sampler, sample, sample_with

__version__ = "0.1.0"

__all__ = [
    "Decoder", "DecodeState", "GenerateOutput", "KVCache", "Model", "ModelConfig", "ModelOutput",
    "Sampler", "Tokenizer", "autoregressive", "commit", "default_model_path", "gather",
    "generate", "init_cache", "load_default", "load_gguf", "make_decoder", "make_sampler",
    "jacobi", "register", "rollback", "sample", "sample_with", "speculative", "strategies",
    "tiny_config",
]
