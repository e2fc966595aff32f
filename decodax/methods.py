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
