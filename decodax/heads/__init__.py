"""Trained draft heads over a decodax Model: Medusa and Hydra (see :mod:`decodax.heads.medusa`)."""

from decodax.heads.medusa import PARAMS_KEY, DraftHeads, draft_heads_drafter, head_logits, with_head_params
from decodax.heads.checkpoint import load_heads, save_heads
from decodax.heads.training import head_batches, head_loss, head_optimizer

__all__ = ["PARAMS_KEY", "DraftHeads", "draft_heads_drafter", "head_batches", "head_logits", "head_loss",
           "head_optimizer", "load_heads", "save_heads",
           "with_head_params"]
