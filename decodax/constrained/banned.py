"""Banned tokens and banned token sequences as a jit-compatible logits mask.

Vulnerability-constrained decoding (Storhaug, Li & Hu 2023, "Efficient
Avoidance of Vulnerabilities in Auto-completed Smart Contract Code Using
Vulnerability-constrained Decoding") forbids token sequences outright: the
last token of a banned sequence is masked whenever the context (prompt plus
emitted tokens) ends with the rest of it, so the sequence can never be
completed; a banned token is a banned sequence of length one (HF's
``NoBadWordsLogitsProcessor`` rule). The table is small and static, so it is a
hashable part of the decoder (a jit constant), and the mask costs one gather
of the context's last ``L - 1`` tokens per step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

__all__ = ["BanList", "ban_mask"]


def _ids(seq, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in seq)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of token ids, got {seq!r}") from None
    if any(t < 0 for t in out):
        raise ValueError(f"{what} must hold token ids >= 0, got {list(out)}")
    return out


@dataclasses.dataclass(frozen=True)
class BanList:
    """Token ids that must never be emitted (``tokens``) and token sequences that must
    never appear in the context (``sequences``). Frozen and hashable."""

    tokens: tuple[int, ...] = ()
    sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tokens", _ids(self.tokens, "banned tokens"))
        seqs = tuple(_ids(s, "a banned sequence") for s in self.sequences)
        if any(len(s) == 0 for s in seqs):
            raise ValueError("banned sequences must be non-empty")
        object.__setattr__(self, "sequences", seqs)

    def check(self, vocab_size: int) -> None:
        """ValueError if an id is outside ``[0, vocab_size)``."""
        ids = list(self.tokens) + [t for s in self.sequences for t in s]
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"banned token ids must be in [0, {vocab_size}), got {bad[:5]}")

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(prefixes int32[K, L-1] right-aligned, -1 padded; last int32[K])."""
        seqs = [(t,) for t in self.tokens] + list(self.sequences)
        width = max((len(s) for s in seqs), default=1)
        prefix = np.full((len(seqs), width - 1), -1, np.int32)
        last = np.array([s[-1] for s in seqs], np.int32)
        for k, s in enumerate(seqs):
            if len(s) > 1:
                prefix[k, width - len(s):] = s[:-1]
        return prefix, last


def ban_mask(
    ban: BanList,
    vocab_size: int,
    prompt: Int[Array, "B P"],
    prompt_len: Int[Array, " B"],
    tokens: Int[Array, "B N"] | None = None,
    num_generated: Int[Array, " B"] | None = None,
) -> Bool[Array, "B V"]:
    """True where a token is banned next, given each row's context
    ``prompt[b, :prompt_len[b]] + tokens[b, :num_generated[b]]``."""
    b = prompt.shape[0]
    prefix, last = ban.table()
    if last.shape[0] == 0:
        return jnp.zeros((b, vocab_size), bool)
    if prefix.shape[1] == 0:
        match = jnp.ones((b, last.shape[0]), bool)
    else:
        if tokens is None:
            tokens = jnp.zeros((b, 1), jnp.int32)
            num_generated = jnp.zeros((b,), jnp.int32)
        width = prefix.shape[1]
        n = prompt_len + num_generated
        pos = n[:, None] - width + jnp.arange(width)[None, :]  # [B, L-1] context positions
        from_prompt = jnp.take_along_axis(prompt, jnp.clip(pos, 0, prompt.shape[1] - 1), axis=1)
        gen = pos - prompt_len[:, None]
        from_gen = jnp.take_along_axis(tokens, jnp.clip(gen, 0, tokens.shape[1] - 1), axis=1)
        tail = jnp.where(pos < prompt_len[:, None], from_prompt, from_gen)
        tail = jnp.where(pos >= 0, tail, -2)  # before the context: matches only padding
        pre = jnp.asarray(prefix)
        match = jnp.all((pre[None] < 0) | (pre[None] == tail[:, None, :]), axis=-1)  # [B, K]
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab_size), bool).at[rows, jnp.asarray(last)[None, :]].max(match)
