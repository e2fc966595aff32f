"""Consistency distillation for Jacobi decoding (CLLM: Kou et al. 2024, "CLLMs: Consistency
Large Language Models").

A model that maps *any* intermediate state of a Jacobi trajectory straight to the
fixed point fixes many tokens per iteration. CLLM collects Jacobi trajectories
from the teacher (here: decodax's own Jacobi decoder, the window fed at every
iteration and the greedy tokens those positions finally took) and trains with

* the **global consistency loss**: at every window position ``i``,
  ``KL(p_θ⁻(. | x, y*_<i) || p_θ(. | x, y_<i))`` where ``y`` is an intermediate
  window, ``y*`` the fixed point and ``θ⁻`` the current parameters under
  ``stop_gradient`` (CLLM, Eq. 6);
* the **AR loss**: next-token cross-entropy on the fixed point
  (``x, y*``), which keeps the model's greedy output close to the teacher's.

CEED-VLA's **mixed-label supervision** (Song et al. 2025, Sec. 3.2) guards the AR
term against the teacher's own errors: a sample whose teacher fixed point departs
from the ground truth by more than ``δ_max`` takes the ground-truth labels for its
AR loss instead. For text, a sample's ground truth is the reference continuation
at the same offset, teacher-forced on the reference prefix (CEED's actions are a
single chunk after the observation; a text trajectory's later windows follow the
teacher's own tokens, to which the reference is not aligned); the departure is
the fraction of window positions where the fixed point and the reference differ.

Samples are a context (prompt plus the tokens emitted before the window) and a
window; contexts are left-padded in a batch (positions start at 0 at the first
real token and padding is masked out of attention), so a sample's logits equal
those of the unpadded sequence.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from decodax import sampling
from decodax.decoding.driver import pad_prompts
from decodax.jacobi.decoder import fed_window, jacobi, jacobi_drafter
from decodax.jacobi.init import WindowInit
from decodax.model.cache import init_cache
from decodax.model.transformer import Model

__all__ = ["JacobiSamples", "collect_jacobi_samples", "consistency_loss", "padded_logits"]


class JacobiSamples(NamedTuple):
    """``context[s, pad[s]:]`` is sample ``s``'s context (left-padded to a common width),
    ``guess[s]`` a window the Jacobi decoder fed after it, ``fixed[s]`` the tokens those
    positions took in the decoded (greedy) output."""

    context: np.ndarray  # [S, C] int32
    pad: np.ndarray  # [S] int32
    guess: np.ndarray  # [S, n] int32
    fixed: np.ndarray  # [S, n] int32
    truth_context: np.ndarray  # [S, C] int32: the reference prefix (left-padded like ``context``)
    truth_pad: np.ndarray  # [S] int32
    truth: np.ndarray  # [S, n] int32: the reference's window; -1 where there is no reference


def collect_jacobi_samples(model: Model, params, prompts: list[list[int]], *, window: int, max_new_tokens: int,
                           init: WindowInit, context: int, key=None,
                           references: list[list[int]] | None = None) -> JacobiSamples:
    """Run greedy Jacobi decoding on ``prompts`` (one ragged batch) and keep every
    iteration's window with its fixed point: the training data of CLLM. Contexts keep
    their last ``context`` tokens. Windows that run past ``max_new_tokens`` are dropped.
    ``references``: each prompt's ground-truth continuation (for mixed-label
    supervision; windows it does not cover get ``truth = -1``).

    A data pipeline, not a decoding loop: it steps the jitted decoder from Python to
    read each iteration's window."""
    dec = jacobi(model, window=window, init=init)
    drafter = jacobi_drafter(window, init, model.config.vocab_size)
    tokens, lengths = pad_prompts(prompts, pad_to=16)
    capacity = tokens.shape[1] + max_new_tokens + window + 1
    state = jax.jit(dec.init, static_argnames=("max_new_tokens", "capacity"))(
        params, jnp.asarray(tokens), jnp.asarray(lengths), key if key is not None else jax.random.key(0),
        max_new_tokens=max_new_tokens, capacity=capacity)
    greedy = sampling.make_sampler(temperature=0.0)
    window_of = jax.jit(lambda state: fed_window(drafter, params, state, window=window, sampler=greedy))
    step = jax.jit(dec.step)
    records = []  # (row, start, guesses)
    while int(np.min(np.asarray(state.num_generated))) < max_new_tokens:
        g = np.asarray(window_of(state))
        start = np.asarray(state.num_generated)
        records.extend((b, int(start[b]), g[b]) for b in range(len(prompts)) if start[b] + window <= max_new_tokens)
        state = step(params, dataclasses.replace(state, done=state.num_generated >= max_new_tokens))
    out = np.asarray(state.tokens)
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"collect_jacobi_samples: {len(references)} references for {len(prompts)} prompts")
    refs = references if references is not None else [[] for _ in prompts]

    def left_pad(seq):
        seq = list(seq)[-context:]
        return [0] * (context - len(seq)) + seq, context - len(seq)

    cols = {f: [] for f in JacobiSamples._fields}
    for b, start, g in records:
        for name, seq in (("", list(prompts[b]) + out[b, :start].tolist()),
                          ("truth_", list(prompts[b]) + list(refs[b][:start]))):
            padded, pad = left_pad(seq)
            cols[name + "context" if name else "context"].append(padded)
            cols[name + "pad"].append(pad)
        truth = list(refs[b][start:start + window])
        cols["truth"].append(truth if len(truth) == window else [-1] * window)
        cols["guess"].append(g)
        cols["fixed"].append(out[b, start:start + window])
    return JacobiSamples(**{f: np.asarray(v, np.int32) for f, v in cols.items()})


def padded_logits(model: Model, params, tokens: Int[Array, "B T"], pad: Int[Array, " B"],
                  at: Int[Array, "B K"] | None = None) -> Float[Array, "B K V"]:
    """Logits of left-padded sequences (at indices ``at``, default all): positions count from
    each row's first real token and padding is hidden from attention (equal to the
    unpadded sequences' logits)."""
    b, t = tokens.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    positions = jnp.maximum(idx[None, :] - pad[:, None], 0)
    real = idx[None, :] >= pad[:, None]  # [B, T]
    mask = (idx[None, :, None] >= idx[None, None, :]) & real[:, None, :]
    mask = mask | (idx[None, :, None] == idx[None, None, :])  # padding rows attend to themselves
    return model.apply(params, tokens, positions, init_cache(model.config, b, t), attn_mask=mask,
                       empty_cache=True, logits_at=at).logits


def consistency_loss(model: Model, *, ar_weight: float = 1.0, mixed_delta: float | None = None):
    """CLLM's loss, ``loss_fn(params, batch, key)`` for :func:`decodax.train.make_train_step`:
    global consistency (KL from the fixed point's stop-gradient distribution to the
    intermediate window's, summed over the window, averaged over samples) plus
    ``ar_weight`` x next-token cross-entropy on the fixed point. ``batch``: the fields of
    :class:`JacobiSamples` as arrays. ``mixed_delta`` (CEED-VLA's ``δ_max`` in [0, 1]):
    samples whose fixed point differs from the reference at more than this fraction of
    the window take the reference's labels for the AR term (module docstring); the
    metrics report the fraction that did (``truth_frac``)."""
    if mixed_delta is not None and not 0.0 <= mixed_delta <= 1.0:
        raise ValueError(f"consistency_loss: mixed_delta must lie in [0, 1], got {mixed_delta!r}")

    def loss_fn(params, batch, key):
        del key
        ctx, pad = batch["context"], batch["pad"]
        n = batch["guess"].shape[1]
        c = ctx.shape[1]
        at = jnp.broadcast_to(jnp.arange(c - 1, c + n - 1, dtype=jnp.int32), (ctx.shape[0], n))  # window preds
        fixed_logits = padded_logits(model, params, jnp.concatenate([ctx, batch["fixed"]], axis=1), pad, at)
        guess_logits = padded_logits(model, params, jnp.concatenate([ctx, batch["guess"]], axis=1), pad, at)
        teacher = jax.nn.log_softmax(jax.lax.stop_gradient(fixed_logits).astype(jnp.float32))
        student = jax.nn.log_softmax(guess_logits.astype(jnp.float32))
        kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)  # [B, n]
        consistency = jnp.mean(jnp.sum(kl, axis=1))
        metrics = {"consistency": consistency}
        ar_logits, labels = fixed_logits, batch["fixed"]
        if mixed_delta is not None:
            truth = batch["truth"]
            off = jnp.mean((truth != batch["fixed"]).astype(jnp.float32), axis=1)
            use = jnp.all(truth >= 0, axis=1) & (off > mixed_delta)  # [B]
            seq = jnp.where(use[:, None], jnp.concatenate([batch["truth_context"], jnp.maximum(truth, 0)], axis=1),
                            jnp.concatenate([ctx, batch["fixed"]], axis=1))
            ar_logits = padded_logits(model, params, seq, jnp.where(use, batch["truth_pad"], pad), at)
            labels = jnp.where(use[:, None], truth, batch["fixed"])
            metrics["truth_frac"] = jnp.mean(use.astype(jnp.float32))
        ar = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(ar_logits.astype(jnp.float32), labels))
        metrics["ar"] = ar
        return consistency + ar_weight * ar, metrics

    return loss_fn
