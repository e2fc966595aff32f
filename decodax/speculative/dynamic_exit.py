"""DEL: context-aware dynamic exit layer for self-speculative decoding.

Zarch et al. 2025, "DEL: Context-Aware Dynamic Exit Layer for Efficient
Self-Speculative Decoding". The draft is the target's first ``l`` layers with
its final norm and LM head (as :func:`~decodax.speculative.drafters.early_exit_drafter`);
DEL picks ``l`` and the speculation length ``γ`` every step from acceptance
statistics of the current sequence:

1. **Shadow tokens.** The verify forward already computes every layer's hidden
   state at the verified positions (``Drafter.taps``). For each candidate exit
   layer ``l`` the LM head on layer ``l``'s state at a position the target
   decided (accepted drafts and the correction) gives the token an ``l``-layer
   draft would have proposed there; it counts as accepted when it equals the
   target's token. Per-row counts decay by ``decay`` per step, so the rates
   follow the context.
2. **Token-per-layer (TPL).** With acceptance rate ``α_l``, a chain of ``γ``
   drafts yields ``E = Σ_{i=0..γ} α_l^i`` tokens per step (the bonus token
   included) for a cost of ``γ·l + L·c(γ)`` layer forwards (``c(γ)``: the
   verify forward of ``γ + 1`` tokens relative to one token, 1 in the paper;
   pass measured step costs as ``verify_cost``). DEL drafts with the
   ``(l, γ)`` maximising ``E / cost``; ``γ = 0`` (plain decoding, TPL ``1/L``)
   wins when no layer drafts well enough.

One exit layer serves the whole batch (it is a ``lax.switch`` branch): the
rates are pooled over the active rows. Verification is the lossless chain
verifier, with verify widths following ``γ`` (``speculative(..., widths=)``).
Shadow matches use the greedy token, so under sampling ``α_l`` estimates the
greedy agreement rather than ``Σ min(p, q)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.decoding.state import DecodeState
from decodax.speculative.drafters import Drafter, Proposal, exit_layer_drafts

__all__ = ["DelState", "dynamic_exit_drafter", "tpl_choice"]


class DelState(NamedTuple):
    hits: Float[Array, "B N"]  # decayed shadow-token matches per candidate exit layer
    trials: Float[Array, "B N"]  # decayed shadow-token trials
    pending: Float[Array, "N B M D"]  # last verify's tapped states, scored at the next propose (it has params)
    target: Int[Array, "B M"]  # the target's tokens at those positions
    valid: Float[Array, "B M"]  # 1 where the target decided that position
    exit_layer: Int[Array, ""]  # the choice of the last step (0: no draft), for inspection
    gamma: Int[Array, ""]


def tpl_choice(alpha: Float[Array, " N"], layers: tuple[int, ...], n_layers: int, k: int,
               verify_cost: tuple[float, ...]) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """DEL's token-per-layer rule: ``argmax_{l, γ} Σ_{i<=γ} α_l^i / (γ l + L c(γ))`` over the
    candidate layers and ``γ = 0 .. k`` (``γ = 0``: no draft). Returns ``(index, γ)``."""
    a = jnp.clip(alpha, 0.0, 1.0)[:, None]  # [N, 1]
    g = jnp.arange(k + 1)[None, :]  # [1, K+1]
    powers = a ** jnp.arange(k + 1)[None, :]  # α^i
    expected = jnp.cumsum(powers, axis=1)  # Σ_{i<=γ} α^i
    cost = g * jnp.asarray(layers, jnp.float32)[:, None] + n_layers * jnp.asarray(verify_cost, jnp.float32)[None, :]
    tpl = jnp.where(g == 0, 1.0 / n_layers, expected / cost)
    best = jnp.argmax(tpl.reshape(-1))
    return (best // (k + 1)).astype(jnp.int32), (best % (k + 1)).astype(jnp.int32)


def dynamic_exit_drafter(model, exit_layers: tuple[int, ...] = (4, 6, 8, 10, 12), *, k: int = 4,
                         decay: float = 0.9, prior: tuple[float, float] = (0.5, 2.0),
                         verify_cost: tuple[float, ...] | None = None, stat_rows: int = 8) -> Drafter:
    """DEL drafter (see the module docstring) for :func:`decodax.speculative.speculative`
    with the same ``k`` and ``widths`` covering ``1 .. k`` (e.g. ``(1, 2, 3, 4)``).

    ``exit_layers``: candidate draft depths; ``decay``: per-step forgetting of the
    statistics; ``prior``: (rate, weight) the rates start from; ``verify_cost``:
    ``k + 1`` relative costs of verifying ``γ`` drafts (default all 1, the
    paper's); ``stat_rows``: the shadow LM head runs on at most this many rows
    per step (candidates x batch x positions), so its cost stays one streaming
    of the head's weights.
    """
    n_layers = model.config.n_layers
    layers = tuple(sorted({int(l) for l in exit_layers}))
    if not layers or layers[0] < 1 or layers[-1] >= n_layers:
        raise ValueError(f"dynamic_exit_drafter: exit_layers must lie in [1, {n_layers - 1}], got {exit_layers!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"dynamic_exit_drafter: k must be an int >= 1, got {k!r}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"dynamic_exit_drafter: decay must be in (0, 1], got {decay}")
    rate, weight = (float(x) for x in prior)
    if not (0.0 <= rate <= 1.0 and weight > 0.0):
        raise ValueError(f"dynamic_exit_drafter: prior must be (rate in [0, 1], weight > 0), got {prior!r}")
    cost = (1.0,) * (k + 1) if verify_cost is None else tuple(float(c) for c in verify_cost)
    if len(cost) != k + 1 or min(cost) <= 0:
        raise ValueError(f"dynamic_exit_drafter: verify_cost needs k + 1 = {k + 1} positive entries, got {verify_cost!r}")
    return _dynamic_exit_drafter(model, layers, k, float(decay), (rate, weight), cost, int(stat_rows))


@functools.lru_cache(maxsize=32)
def _dynamic_exit_drafter(model, layers, k, decay, prior, cost, stat_rows) -> Drafter:
    n = len(layers)
    k_max = k
    n_layers = model.config.n_layers
    dim = model.config.dim

    def rows(b: int) -> int:
        return max(1, min(k + 1, stat_rows // (n * b)))

    def init(params, state: DecodeState) -> DelState:
        b = state.prompt.shape[0]
        m = rows(b)
        rate, weight = prior
        return DelState(hits=jnp.full((b, n), rate * weight, jnp.float32), trials=jnp.full((b, n), weight, jnp.float32),
                        pending=jnp.zeros((n, b, m, dim), jnp.float32), target=jnp.zeros((b, m), jnp.int32),
                        valid=jnp.zeros((b, m), jnp.float32), exit_layer=jnp.int32(0), gamma=jnp.int32(0))

    def score(params, ds: DelState) -> DelState:
        """Fold the pending shadow tokens into the decayed counts."""
        _, b, m, d = ds.pending.shape
        logits = model.logits(params, ds.pending.reshape(1, n * b * m, d))
        shadow = jnp.argmax(logits[0], axis=-1).reshape(n, b, m)
        hit = (shadow == ds.target[None]).astype(jnp.float32) * ds.valid[None]  # [N, B, M]
        hits = decay * ds.hits + hit.sum(-1).T
        trials = decay * ds.trials + jnp.broadcast_to(ds.valid.sum(-1)[:, None], ds.trials.shape)
        # decay only where there was data, so idle rows keep their estimates
        seen = ds.valid.sum(-1)[:, None] > 0
        return ds._replace(hits=jnp.where(seen, hits, ds.hits), trials=jnp.where(seen, trials, ds.trials))

    def propose(params, state: DecodeState, ds: DelState, key, *, k: int, sampler) -> Proposal:
        if k != k_max:
            raise ValueError(f"dynamic_exit_drafter was built for k = {k_max}, the decoder uses k = {k}")
        ds = score(params, ds)
        active = (~state.done).astype(jnp.float32)[:, None]
        alpha = jnp.sum(ds.hits * active, 0) / jnp.maximum(jnp.sum(ds.trials * active, 0), 1e-6)
        index, gamma = tpl_choice(alpha, layers, n_layers, k, cost)
        branches = [functools.partial(_draft, layer, sampler) for layer in layers]
        drafts, probs = jax.lax.switch(index, branches, params, state, key, gamma)  # gamma = 0: no draft forward
        b = drafts.shape[0]
        chosen = jnp.asarray(layers, jnp.int32)[index]
        ds = ds._replace(exit_layer=jnp.where(gamma > 0, chosen, 0), gamma=gamma)
        return Proposal(drafts, probs, jnp.full((b,), gamma, jnp.int32), ds)

    def _draft(layer, sampler, params, state, key, count):
        return exit_layer_drafts(model, params, state, key, k=k_max, sampler=sampler, exit_layer=layer, count=count)

    def update(ds: DelState, state: DecodeState, accepted, *, taps, tokens, path) -> DelState:
        """Keep the tapped states of the positions the target decided, and its tokens there."""
        _, b, t, d = taps.shape
        m = rows(b)
        j = jnp.arange(m)[None, :]
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, max(0, m + 1 - t)), jnp.int32)], axis=1)[:, :m]
        target = jnp.where(j < accepted[:, None], nxt, state.last_token[:, None])
        valid = (j <= accepted[:, None]) & (j < t) & ~state.done[:, None]
        pending = taps[:, :, :m]
        if t < m:
            pending = jnp.concatenate([pending, jnp.zeros((n, b, m - t, d), pending.dtype)], axis=2)
        return ds._replace(pending=pending.astype(jnp.float32), target=target.astype(jnp.int32),
                           valid=valid.astype(jnp.float32))

    return Drafter(init=init, propose=propose, update=update, taps=layers,
                   name=f"del(layers={','.join(map(str, layers))}, k={k})", may_be_empty=True)

