"""The training state and the pure training step shared by every trainer in decodax."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = ["LossFn", "TrainState", "create_state", "make_train_step"]

# loss_fn(params, batch, key) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, PRNGKeyArray], tuple[Float[Array, ""], dict[str, Array]]]


@struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: step, params, optimizer state and
    the PRNG key (``tx`` is static: rebuild it from the same config to resume)."""

    step: Int[Array, ""]
    params: Any
    opt_state: Any
    key: PRNGKeyArray
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_state(params: Any, tx: optax.GradientTransformation, key: PRNGKeyArray) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=key, tx=tx)


def make_train_step(loss_fn: LossFn) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """``train_step(state, batch) -> (state, metrics)``: one optax update of ``loss_fn``.

    Pure and jittable; the step's key is ``fold_in(state.key, step)`` so a
    resumed run draws the same randomness as an uninterrupted one. Metrics are
    the loss function's plus ``loss`` and the global ``grad_norm``.
    """

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(state.key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
