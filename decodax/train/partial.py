"""Pieces for training a few new weights on top of a frozen model: an optimizer that leaves
``params["base"]`` alone and deterministic epoch batches (a function of the step, so resumes
replay them)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

__all__ = ["epoch_batches", "frozen_base_optimizer"]


def frozen_base_optimizer(learning_rate: float, steps: int, warmup: int = 10,
                          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay on every top-level entry of the params except
    ``"base"``, which gets no updates (and no optimizer state)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, steps), max(steps, 1))
    return optax.multi_transform(
        {"train": optax.adamw(schedule, weight_decay=weight_decay), "frozen": optax.set_to_zero()},
        lambda params: {name: jax.tree.map(lambda _, f=name == "base": "frozen" if f else "train", sub)
                        for name, sub in params.items()},
    )


def epoch_batches(data: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> Callable[[int], dict[str, Any]]:
    """``batch_fn(step)``: epochs of shuffled rows of the arrays in ``data`` (same first axis), a
    deterministic function of the step (so a resumed run sees the same batches)."""
    n = len(next(iter(data.values())))
    if not 1 <= batch_size <= n:
        raise ValueError(f"epoch_batches: batch_size must be in [1, {n}], got {batch_size}")
    per_epoch = n // batch_size

    def batch_fn(step: int) -> dict[str, Array]:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(n)
        rows = order[i * batch_size : (i + 1) * batch_size]
        return {k: jnp.asarray(v[rows]) for k, v in data.items()}

    return batch_fn
