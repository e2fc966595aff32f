"""The toy vocabulary and tiny model shared by the constrained-decoding tests."""

import jax

from decodax.constrained import TokenVocabulary
from decodax.model.config import tiny_config
from decodax.model.transformer import Model

TOKENS = ["<eos>", "a", "b", "c", "ab", "bc", "abc", "x", "ca", "aa", "cc", "y", "z", "bb", "ba", "cab"]
EOS = 0


def toy_vocab() -> TokenVocabulary:
    return TokenVocabulary.from_strings(TOKENS, eos_ids=[EOS])


def tiny_model(embed_scale: float = 1.0):
    """A one-layer model over ``TOKENS``; ``embed_scale`` sharpens its distributions."""
    model = Model(tiny_config(vocab_size=len(TOKENS), dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              hidden_dim=32, eos_ids=(EOS,)))
    params = model.init(jax.random.key(0))
    return model, {**params, "embed": params["embed"] * embed_scale}
