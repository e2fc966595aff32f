"""SpecDec++: an acceptance-prediction head that decides when to stop drafting.

Huang et al. 2024, "SpecDec++: Boosting Speculative Decoding via Adaptive
Candidate Lengths". A small head on the draft model's last hidden state
predicts, for every draft token, the probability that the target accepts it
(given that the earlier drafts were accepted). Drafting stops as soon as the
predicted probability of at least one rejection among the drafts so far,
``1 - Π_i p_accept_i``, exceeds a threshold ``h`` (or ``k`` drafts are made):
:func:`~decodax.speculative.draft_model.draft_model_drafter` with
``stop_threshold=h`` and the head under ``params["draft"]["acceptance"]``.

The head is trained on teacher-forced draft states with binary labels
"the draft's token equals the target's" and SpecDec++'s weighted
binary cross-entropy: rejections are rare and matter more, so they are
up-weighted (``w_reject > w_accept``). Verification stays the lossless chain
verifier; only the number of drafts changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["acceptance_logit", "acceptance_loss", "init_acceptance_head", "stop_after"]


def init_acceptance_head(key: PRNGKeyArray, dim: int, hidden: int = 256) -> dict:
    """Params of a one-residual-block MLP head ``D -> 1`` (SpecDec++ uses a small ResNet)."""
    k1, k2 = jax.random.split(key)
    return {"w_in": jax.random.normal(k1, (dim, hidden)) * dim**-0.5, "b_in": jnp.zeros((hidden,)),
            "w_res": jax.random.normal(k2, (hidden, hidden)) * hidden**-0.5 * 0.1, "b_res": jnp.zeros((hidden,)),
            "w_out": jnp.zeros((hidden,)), "b_out": jnp.zeros(())}


def acceptance_logit(head: dict, hidden: Float[Array, "*B D"]) -> Float[Array, "*B"]:
    """Logit of P(accept) from the draft's pre-norm last hidden state (RMS-normalised first)."""
    x = hidden.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    z = jax.nn.silu(x @ head["w_in"] + head["b_in"])
    z = z + jax.nn.silu(z @ head["w_res"] + head["b_res"])
    return z @ head["w_out"] + head["b_out"]


def acceptance_loss(w_accept: float = 1.0, w_reject: float = 3.0):
    """``loss_fn(params, batch, key)``: SpecDec++'s weighted BCE. ``params = {"acceptance": head}``,
    ``batch = {"hidden": [B, D], "accept": [B] (0/1), "mask": [B]}``; metrics: accuracy and
    the mean predicted / observed acceptance."""

    def loss_fn(params, batch, key):
        del key
        logit = acceptance_logit(params["acceptance"], batch["hidden"])
        y, m = batch["accept"].astype(jnp.float32), batch["mask"].astype(jnp.float32)
        ll = w_accept * y * jax.nn.log_sigmoid(logit) + w_reject * (1 - y) * jax.nn.log_sigmoid(-logit)
        denom = jnp.maximum(m.sum(), 1.0)
        acc = ((logit > 0) == (y > 0.5)).astype(jnp.float32)
        return -jnp.sum(ll * m) / denom, {"accuracy": jnp.sum(acc * m) / denom,
                                          "p_accept": jnp.sum(jax.nn.sigmoid(logit) * m) / denom,
                                          "accept_rate": jnp.sum(y * m) / denom}

    return loss_fn


def stop_after(log_p_all: Float[Array, " B"], threshold: float) -> Array:
    """True where drafting stops: ``1 - Π p_accept > threshold`` (``log_p_all = Σ log p_accept``)."""
    return -jnp.expm1(log_p_all) > threshold
