"""Self-distillation training of Medusa/Hydra heads on the target's own generations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from decodax.heads.medusa import DraftHeads, head_logits
from decodax.model.transformer import Model
from decodax.train.partial import epoch_batches, frozen_base_optimizer

__all__ = ["head_batches", "head_loss", "head_optimizer"]


def head_loss(model: Model, heads: DraftHeads, decay: float = 0.8):
    """``loss_fn(params, batch, key)`` for :func:`decodax.train.make_train_step`.

    ``params = {"heads": [...], "base": {"embed", "final_norm"[, "lm_head"]}}`` (the
    base is frozen: gradients stop there); ``batch = {"hidden": [B, T, D]`` (the
    target's pre-norm last hidden states, teacher-forced), ``"tokens": [B, T]``,
    ``"mask": [B, T]}`` (1 where a token is a label: the target's own
    generation). Head ``k`` at position ``t`` is trained with cross-entropy on
    ``tokens[t + 2 + k]`` (greedy self-distillation: the target's own next
    tokens), weighted ``decay ** k`` as in Medusa; metrics ``acc{k}`` are the
    heads' top-1 accuracies.
    """

    def loss_fn(params, batch, key):
        del key
        base = jax.lax.stop_gradient(params["base"])
        hidden, tokens, mask = batch["hidden"], batch["tokens"], batch["mask"].astype(jnp.float32)
        t = tokens.shape[1]
        total, weights, metrics = 0.0, 0.0, {}
        for k in range(heads.num_heads):
            n = t - 2 - k
            if n <= 0:
                break
            labels, m = tokens[:, 2 + k :], mask[:, 2 + k :]
            path = jnp.stack([tokens[:, 1 + j : 1 + j + n] for j in range(k + 1)], axis=-1) if heads.hydra else None
            logits = head_logits(model, base, heads, params["heads"], k, hidden[:, :n], path).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            denom = jnp.maximum(m.sum(), 1.0)
            total += decay**k * jnp.sum(ce * m) / denom
            weights += decay**k
            metrics[f"acc{k}"] = jnp.sum((logits.argmax(-1) == labels) * m) / denom
        return total / weights, metrics

    return loss_fn


# Heads train on top of the frozen base: the shared trainer's generic pieces.
head_optimizer = frozen_base_optimizer
head_batches = epoch_batches
