"""The shared trainer: ``TrainState``, a pure ``train_step``, optax, orbax checkpoints,
a ``(data, fsdp)`` mesh, ``fit`` with resume, progress bar and a JSONL metrics log."""

from decodax.train.checkpoint import CheckpointError, Checkpoints
from decodax.train.loop import fit
from decodax.train.losses import lm_loss, logits_of
from decodax.train.partial import epoch_batches, frozen_base_optimizer
from decodax.train.mesh import initialize_distributed, make_mesh, shard_batch, shard_params
from decodax.train.state import TrainState, create_state, make_train_step

__all__ = ["CheckpointError", "Checkpoints", "TrainState", "create_state", "epoch_batches", "fit", "frozen_base_optimizer", "initialize_distributed",
           "lm_loss", "logits_of", "make_mesh", "make_train_step", "shard_batch", "shard_params"]
