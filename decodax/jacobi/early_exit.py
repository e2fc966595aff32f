"""Relaxed convergence for Jacobi decoding: CEED-VLA's early exit.

CEED-VLA (Song et al. 2025, "CEED-VLA: Consistency Vision-Language-Action Model
with Early-Exit Decoding", Sec. 3.3) observes that after consistency
distillation a few slow iterations dominate Jacobi decoding's cost, and stops
iterating on a block once a step budget is reached, taking the current guesses
as they are. In decodax's sliding window (:func:`~decodax.jacobi.jacobi`) the
same rule applies per position: a fed guess is *accepted without verification*
once

* it has had ``max_iters`` Jacobi updates (the step budget), or
* it has kept its value for ``stable_iters`` consecutive iterations (a change
  budget: the position has stopped moving, though its prefix has not been
  verified),

counted over the window's leading positions (acceptance stays a prefix). The
verified prefix is still accepted as usual and the target's token after the
accepted guesses is appended, so every emitted token was fed and its KV entry
is right; the output is no longer exactly greedy decoding's (*lossy*; measure the
quality cost, e.g. ``experiments/jacobi_early_exit.py``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Int

from decodax.jacobi.init import _check_int

__all__ = ["EarlyExit"]


@dataclasses.dataclass(frozen=True)
class EarlyExit:
    """``max_iters``: accept a guess after this many Jacobi updates; ``stable_iters``:
    accept one unchanged for this many consecutive iterations. ``None`` disables a
    criterion; at least one must be set. Called by the chain decoder as
    ``relaxed(jacobi_state, w) -> int32[B]`` (leading guesses accepted regardless)."""

    max_iters: int | None = None
    stable_iters: int | None = None

    def __post_init__(self):
        if self.max_iters is None and self.stable_iters is None:
            raise ValueError("EarlyExit: set max_iters and/or stable_iters")
        if self.max_iters is not None:
            _check_int("EarlyExit", "max_iters", self.max_iters, 1)
        if self.stable_iters is not None:
            _check_int("EarlyExit", "stable_iters", self.stable_iters, 1)

    def __call__(self, js, w: int) -> Int[Array, " B"]:
        ok = jnp.zeros(js.age.shape, bool)
        if self.max_iters is not None:
            ok = ok | (js.age >= self.max_iters)
        if self.stable_iters is not None:
            ok = ok | (js.stable >= self.stable_iters)
        ok = ok[:, :w]
        return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("max_iters", self.max_iters), ("stable_iters", self.stable_iters))
                 if v is not None]
        return f"early_exit({', '.join(parts)})"
