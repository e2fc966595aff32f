"""Registry of decoding methods by name, for the CLI and the benchmark."""

from __future__ import annotations

from typing import Callable

from decodax import sampling
from decodax.decoding import Decoder, autoregressive

# name -> factory(model, params, sampler) -> Decoder
METHODS: dict[str, Callable[..., Decoder]] = {
    "ar": lambda model, params, sampler: autoregressive(model, sampler),
}


def register(name: str, factory: Callable[..., Decoder]) -> None:
    """Add a method factory ``(model, params, sampler) -> Decoder`` under ``name``."""
    METHODS[name] = factory


def make_decoder(name: str, model, params, sampler: sampling.Sampler | None = None) -> Decoder:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](model, params, sampler or sampling.make_sampler(temperature=0.0))


def _speculative_factory(make_drafter, k: int):
    def factory(model, params, sampler):
        from decodax.speculative.decoder import speculative

        return speculative(model, make_drafter(model), k=k, sampler=sampler)

    return factory


def _pld(model):
    from decodax.speculative.drafters import prompt_lookup

    return prompt_lookup(ngram=3)


def _ee(model):
    from decodax.speculative.drafters import early_exit_drafter

    return early_exit_drafter(model, min(8, model.config.n_layers))


# Chain speculative decoding: prompt lookup (Saxena 2023) and a self-speculative
# early-exit draft (the target's first 8 layers + LM head).
register("pld", _speculative_factory(_pld, k=4))
register("ee-draft", _speculative_factory(_ee, k=4))
