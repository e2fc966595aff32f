"""Window initialisers for Jacobi decoding: the guesses for window positions that
no earlier iteration has predicted yet (the whole window at the start, the tail
after each acceptance).

Each initialiser is a hashable, frozen dataclass called as
``init(state, key, n) -> int32[B, n]``: ``n`` guesses for the positions right
after ``state.last_token`` (the decoder keeps the previous iteration's
predictions where it has them and takes the initialiser's tokens elsewhere,
position by position). :class:`SpatialInit` is Speculative Jacobi decoding's
spatial-neighbour initialiser for raster-ordered image tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from decodax.decoding.state import DecodeState

__all__ = ["NgramInit", "PadInit", "RandomInit", "RepeatLast", "SpatialInit", "WindowInit"]


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


@dataclasses.dataclass(frozen=True)
class SpatialInit(WindowInit):
    """Spatial-neighbour guesses for raster-ordered image tokens (the locality-aware token
    initialisation studied by Speculative Jacobi Decoding, Teng et al. 2024, and SJD++'s
    spatial-prior initialisation): the guess at raster position ``r`` copies the token
    one row above (``r - width``) or the one to its left (``r - 1``, same row) -- the
    preferred one (``prefer``) where it exists, else the other -- whether that neighbour is
    already emitted or is itself a guess of this window (guesses resolve left to
    right); a position with neither (raster 0) gets a uniform random token over
    ``[0, vocab_size)``.

    The emitted tokens are the image's codes from raster 0 on (the prompt holds the
    conditioning), so window position ``j`` of row ``b`` is raster
    ``num_generated[b] + j``. The guesses are a function of the emitted tokens and the
    initialiser's own key, drawn independently of the verification, so SJD keeps the
    target law with them.

    Raises ``ValueError`` for ``width < 1``, ``vocab_size < 1`` or an unknown ``prefer``.
    """

    width: int
    vocab_size: int
    prefer: str = "above"  # "above" | "left"

    def __post_init__(self):
        _check_int("SpatialInit", "width", self.width, 1)
        _check_int("SpatialInit", "vocab_size", self.vocab_size, 1)
        if self.prefer not in ("above", "left"):
            raise ValueError(f"SpatialInit: prefer must be 'above' or 'left', got {self.prefer!r}")

    def sources(self, raster: Int[Array, "*S"]) -> Int[Array, "*S"]:
        """The raster index each position copies (``-1``: none, a random guess)."""
        above = jnp.where(raster >= self.width, raster - self.width, -1)
        left = jnp.where(raster % self.width != 0, raster - 1, -1)
        first, second = (above, left) if self.prefer == "above" else (left, above)
        return jnp.where(first >= 0, first, second).astype(jnp.int32)

    def __call__(self, state: DecodeState, key: PRNGKeyArray, n: int) -> Int[Array, "B n"]:
        b = state.last_token.shape[0]
        g = state.num_generated.astype(jnp.int32)[:, None]  # [B, 1] raster of window position 0
        src = self.sources(g + jnp.arange(n, dtype=jnp.int32)[None, :])  # [B, n]
        emitted = jnp.take_along_axis(state.tokens, jnp.clip(src, 0, state.tokens.shape[1] - 1), axis=1)
        out = jax.random.randint(key, (b, n), 0, self.vocab_size, dtype=jnp.int32)
        out = jnp.where((src >= 0) & (src < g), emitted.astype(jnp.int32), out)
        for j in range(1, n):  # a neighbour inside the window is an earlier guess of this window
            col = jnp.take_along_axis(out, jnp.clip(src[:, j:j + 1] - g, 0, j - 1), axis=1)
            out = out.at[:, j:j + 1].set(jnp.where(src[:, j:j + 1] >= g, col, out[:, j:j + 1]))
        return out
