"""Window initialisers for Jacobi decoding: the guesses for window positions that
no earlier iteration has predicted yet (the whole window at the start, the tail
after each acceptance).

Each initialiser is a hashable, frozen dataclass called as
``init(state, key, n) -> int32[B, n]``: ``n`` guesses for the positions right
after ``state.last_token`` (the decoder keeps the previous iteration's
predictions where it has them and takes the initialiser's tokens elsewhere,
position by position). Speculative Jacobi decoding's spatial-neighbour
initialiser for image tokens plugs in the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from decodax.decoding.state import DecodeState

__all__ = ["NgramInit", "PadInit", "RandomInit", "RepeatLast", "WindowInit"]


def _check_int(owner: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")


class WindowInit:
    """Base class: ``__call__(state, key, n) -> int32[B, n]``."""

    def __call__(self, state: DecodeState, key: PRNGKeyArray, n: int) -> Int[Array, "B n"]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class RandomInit(WindowInit):
    """Uniform random tokens over ``[0, vocab_size)`` (Santilli et al. 2023; SJD's default)."""

    vocab_size: int

    def __post_init__(self):
        _check_int("RandomInit", "vocab_size", self.vocab_size, 1)

    def __call__(self, state, key, n):
        b = state.last_token.shape[0]
        return jax.random.randint(key, (b, n), 0, self.vocab_size, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class RepeatLast(WindowInit):
    """The last emitted token repeated."""

    def __call__(self, state, key, n):
        return jnp.broadcast_to(state.last_token[:, None], (state.last_token.shape[0], n)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PadInit(WindowInit):
    """A fixed token (e.g. the pad or EOS id) everywhere."""

    token: int

    def __post_init__(self):
        _check_int("PadInit", "token", self.token, 0)

    def __call__(self, state, key, n):
        return jnp.full((state.last_token.shape[0], n), self.token, jnp.int32)


@dataclasses.dataclass(frozen=True)
class NgramInit(WindowInit):
    """The n-gram pool of the context: what followed the most recent earlier occurrence
    of the context's last ``ngram`` tokens (prompt lookup, Saxena 2023; longest match
    first, the last token repeated where nothing matches)."""

    ngram: int = 2

    def __post_init__(self):
        _check_int("NgramInit", "ngram", self.ngram, 1)

    def __call__(self, state, key, n):
        from decodax.speculative.drafters import prompt_lookup

        return prompt_lookup(self.ngram).propose(None, state, None, key, k=n).tokens
