"""Losses over decodax ``Model.apply`` for the shared trainer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from decodax.model.cache import init_cache
from decodax.model.transformer import Model

__all__ = ["lm_loss", "logits_of"]


def logits_of(model: Model, params: Any, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Teacher-forced logits of a whole sequence (a prefill without a cache)."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model.apply(params, tokens, pos, init_cache(model.config, b, t), empty_cache=True).logits


def lm_loss(model: Model):
    """Next-token cross-entropy: ``loss_fn(params, batch, key)`` for :func:`make_train_step`;
    ``batch = {"tokens": [B, T], "mask": [B, T]}`` (mask: which targets count)."""

    def loss_fn(params, batch, key):
        del key
        tokens = batch["tokens"]
        logits = logits_of(model, params, tokens)[:, :-1]
        mask = batch.get("mask", jnp.ones_like(tokens))[:, 1:].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
        loss = jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0)
        return loss, {"tokens": mask.sum()}

    return loss_fn
