"""Orbax checkpoints of a :class:`TrainState`: save every N steps, keep K, resume exactly."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from decodax.train.state import TrainState

__all__ = ["CheckpointError", "Checkpoints"]


class CheckpointError(ValueError):
    """A checkpoint directory or step that is missing, corrupt or does not fit the state."""


def _arrays(state: TrainState) -> dict[str, Any]:
    # Typed PRNG keys are stored as their raw key data.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "key": jax.random.key_data(state.key)}


class Checkpoints:
    """``CheckpointManager`` over ``directory`` keeping the last ``keep`` checkpoints.

    ``restore(template)`` returns the latest saved state laid out like
    ``template`` (same pytree, dtypes and shardings; its ``tx`` is reused), or
    None when nothing was saved yet.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, keep: int = 3):
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpoints: save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save when the step is a multiple of ``save_every`` (or ``force``); returns whether it did."""
        step = int(state.step)
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.StandardSave(_arrays(state)), force=True)
        return True

    def restore(self, template: TrainState, step: int | None = None) -> TrainState | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = os.path.join(self.directory, str(step))
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} under {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(template))
        try:
            got = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 -- orbax raises many types for unreadable data
            raise CheckpointError(f"checkpoint {path} is corrupt or does not match the state: {e}") from e
        key = jax.random.wrap_key_data(got["key"], impl=jax.random.key_impl(template.key))
        return template.replace(step=got["step"], params=got["params"], opt_state=got["opt_state"], key=key)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
