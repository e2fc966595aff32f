"""Lexical Unit Decoding (LUD; Sun et al. 2024, "Decoding at the Speed of Thought:
Harnessing Parallel Decoding of Lexical Units for LLMs", LREC-COLING).

A *lexical unit* is a run of contiguous tokens the model predicts with high
confidence; LUD decodes such a run in one forward pass. Each step feeds the
tokens emitted by the previous step (not yet in the KV cache) followed by ``k``
placeholder (``[PAD]``) tokens; the logits at the last real token give the next
token ``y_1`` (exactly the greedy token) and the logits at placeholder ``j`` a
guess ``y_{j+1}``. ``y_1`` is always kept; ``y_2, y_3, ..`` are kept while each
one's probability exceeds the threshold ``alpha`` (adaptive span) and differs
from the token before it (repetition control). Nothing is verified: the method
is *lossy* (its quality cost must be measured, ``experiments/lexical_units.py``).
The kept tokens are fed at the next step, so their KV entries are computed from
the real tokens; the placeholder entries are never committed.

A plain LM has not learnt to predict through placeholders, hence LUD's
data-driven fine-tuning: under teacher forcing, mark lexical units in the
training text (a token joins the unit of the token before it when the model
gives it probability >= ``alpha``; at most ``k + 1`` tokens a unit), then train
on examples ``x_<s, [PAD] x k`` whose labels are the unit ``x_s .. x_{s+L-1}``
(the placeholders learn the unit's later tokens), plus the AR loss on
``x_<s``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import emit, prefill
from decodax.decoding.state import Decoder, DecodeState
from decodax.jacobi.consistency import padded_logits
from decodax.jacobi.init import _check_int
from decodax.model import cache as kv
from decodax.model.transformer import Model

__all__ = ["LudExamples", "lexical_unit_decoding", "lexical_units", "lud_examples", "lud_loss"]


def _check_alpha(owner: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"{owner}: alpha must lie in (0, 1), got {alpha!r}")
    return float(alpha)


def lexical_unit_decoding(model, *, k: int, alpha: float, pad_id: int) -> Decoder:
    """Greedy LUD (module docstring) with ``k`` placeholders per step and confidence
    threshold ``alpha``; ``pad_id``: the placeholder token (the id the model was
    fine-tuned with). A step feeds ``T = 2k + 1`` tokens (up to ``k + 1`` pending
    tokens, ``k`` placeholders, filler) and emits ``1 .. k + 1``."""
    _check_int("lexical_unit_decoding", "k", k, 1)
    alpha = _check_alpha("lexical_unit_decoding", alpha)
    vocab = model.config.vocab_size
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
        raise ValueError(f"lexical_unit_decoding: pad_id must be a token id in [0, {vocab}), got {pad_id!r}")
    if 2 * k + 1 > model.config.max_seq_len:
        raise ValueError(f"lexical_unit_decoding: 2k + 1 = {2 * k + 1} exceeds the model's context")
    return _lud(model, k, alpha, pad_id)


class LudState(NamedTuple):
    """Tokens emitted by the last step and not yet in the KV cache (``pending[:, :count]``)."""

    pending: Int[Array, "B K1"]
    count: Int[Array, " B"]


@functools.lru_cache(maxsize=32)
def _lud(model, k: int, alpha: float, pad_id: int) -> Decoder:
    t = 2 * k + 1

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        state = prefill(model, params, prompt, prompt_len, key, sampler=sampling.make_sampler(temperature=0.0), max_new_tokens=max_new_tokens,
                        capacity=capacity, max_step_tokens=t)
        b = prompt.shape[0]
        pending = jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(state.last_token)
        return dataclasses.replace(state, extra=LudState(pending, jnp.ones((b,), jnp.int32)))

    def step(params, state: DecodeState) -> DecodeState:
        ls: LudState = state.extra
        b = ls.count.shape[0]
        idx = jnp.arange(t, dtype=jnp.int32)[None, :]
        pend = jnp.concatenate([ls.pending, jnp.zeros((b, t - k - 1), jnp.int32)], axis=1)
        tokens = jnp.where(idx < ls.count[:, None], pend, pad_id)
        positions = state.cache.length[:, None] + idx
        at = ls.count[:, None] - 1 + jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # last real token, placeholders
        out = model.apply(params, tokens, positions, state.cache, logits_at=at)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        guess = jnp.argmax(logp, axis=-1).astype(jnp.int32)  # [B, k + 1]
        conf = jnp.exp(jnp.max(logp, axis=-1))
        keep = (conf[:, 1:] > alpha) & (guess[:, 1:] != guess[:, :-1])
        count = 1 + jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
        active = ~state.done
        state = dataclasses.replace(state, cache=kv.commit(out.cache, jnp.where(active, ls.count, 0)),
                                    calls=state.calls + active)
        state = emit(state, guess, count)
        return dataclasses.replace(state, extra=LudState(guess, jnp.where(active, count, ls.count)))

    return Decoder(init=init, step=step, model=model, max_step_tokens=t,
                   name=f"lud[k={k}, alpha={alpha:g}]")


# --------------------------------------------------------------------------- data-driven fine-tuning


def lexical_units(probs: Float[np.ndarray, " L"], *, alpha: float, max_len: int) -> list[tuple[int, int]]:
    """Split a sequence into lexical units ``(start, length)`` given each token's
    teacher-forced probability ``probs[i] = p(x_i | x_<i)``: token ``i`` extends the unit of
    token ``i - 1`` when ``probs[i] >= alpha`` and the unit is shorter than ``max_len``."""
    alpha = _check_alpha("lexical_units", alpha)
    _check_int("lexical_units", "max_len", max_len, 1)
    units: list[tuple[int, int]] = []
    for i, p in enumerate(np.asarray(probs, np.float64)):
        if units and p >= alpha and units[-1][1] < max_len:
            units[-1] = (units[-1][0], units[-1][1] + 1)
        else:
            units.append((i, 1))
    return units


@functools.partial(jax.jit, static_argnums=0)
def _token_probs(model: Model, params, seq: Int[Array, " L"]) -> Float[Array, " L-1"]:
    """Teacher-forced ``p(seq[i + 1] | seq[:i + 1])``."""
    s = seq.shape[0]
    logits = model.apply(params, seq[None], jnp.arange(s)[None], kv.init_cache(model.config, 1, s),
                         empty_cache=True).logits[0, :-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.exp(jnp.take_along_axis(lp, seq[1:, None], axis=1)[:, 0])


class LudExamples(NamedTuple):
    """``tokens[e]``: a left-padded context ``x_<s`` followed by ``k`` placeholders
    (``pad[e]`` padding slots on the left); ``labels[e]``: ``x_s .. x_{s+k}``, the
    prediction targets of the last context token and the placeholders; ``weights[e]``:
    1 inside the unit, 0 after it."""

    tokens: np.ndarray  # [E, C + k] int32
    pad: np.ndarray  # [E] int32
    labels: np.ndarray  # [E, k + 1] int32
    weights: np.ndarray  # [E, k + 1] float32


def lud_examples(model: Model, params, sequences: list[list[int]], starts: list[int], *, k: int, alpha: float,
                 pad_id: int, context: int) -> tuple[LudExamples, dict]:
    """LUD's training data: mark lexical units of ``sequences[i][starts[i]:]`` (the part
    to learn, e.g. a continuation after its prompt) with the model's own teacher-forced
    probabilities, and turn every unit of two or more tokens into an example (contexts
    keep their last ``context`` tokens). Returns the examples and unit statistics."""
    _check_int("lud_examples", "k", k, 1)
    rows: dict[str, list] = {f: [] for f in LudExamples._fields}
    lengths = []
    for seq, start in zip(sequences, starts):
        if not 1 <= start < len(seq):
            raise ValueError(f"lud_examples: start {start} must lie in [1, {len(seq)}) for a sequence of {len(seq)}")
        probs = np.asarray(_token_probs(model, params, jnp.asarray(seq, jnp.int32)))
        for u0, length in lexical_units(probs[start - 1:], alpha=alpha, max_len=k + 1):
            u0 += start
            lengths.append(length)
            if length < 2:
                continue
            ctx = list(seq[max(0, u0 - context):u0])
            labels = list(seq[u0:u0 + k + 1])
            weights = [1.0] * length + [0.0] * (k + 1 - length)
            labels += [0] * (k + 1 - len(labels))
            rows["tokens"].append([0] * (context - len(ctx)) + ctx + [pad_id] * k)
            rows["pad"].append(context - len(ctx))
            rows["labels"].append(labels)
            rows["weights"].append(weights)
    if not rows["tokens"]:
        raise ValueError("lud_examples: no lexical unit of two or more tokens at this alpha")
    ex = LudExamples(np.asarray(rows["tokens"], np.int32), np.asarray(rows["pad"], np.int32),
                     np.asarray(rows["labels"], np.int32), np.asarray(rows["weights"], np.float32))
    lengths = np.asarray(lengths)
    stats = {"units": int(len(lengths)), "multi_token_units": int(np.sum(lengths >= 2)),
             "tokens_in_multi_token_units": float(np.sum(lengths[lengths >= 2]) / max(np.sum(lengths), 1)),
             "mean_unit_length": float(lengths.mean())}
    return ex, stats


def lud_loss(model: Model, *, context: int, ar_weight: float = 1.0):
    """LUD's fine-tuning loss, ``loss_fn(params, batch, key)`` for
    :func:`decodax.train.make_train_step`: cross-entropy of the unit's tokens at the last
    context token and the placeholders (weighted, per unit token), plus ``ar_weight`` x
    next-token cross-entropy over the context (teacher forcing; keeps the model's
    ordinary predictions). ``batch``: the fields of :class:`LudExamples`."""

    def loss_fn(params, batch, key):
        del key
        toks, pad = batch["tokens"], batch["pad"]
        logits = padded_logits(model, params, toks, pad).astype(jnp.float32)  # [B, C + k, V]
        unit = logits[:, context - 1:]  # last context token, then the k placeholders
        ce = optax.softmax_cross_entropy_with_integer_labels(unit, batch["labels"])
        w = batch["weights"]
        unit_loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
        ctx_ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :context - 1], toks[:, 1:context])
        real = (jnp.arange(1, context)[None, :] > pad[:, None]).astype(jnp.float32)  # label and input both real
        ar = jnp.sum(ctx_ce * real) / jnp.maximum(jnp.sum(real), 1.0)
        return unit_loss + ar_weight * ar, {"unit": unit_loss, "ar": ar}

    return loss_fn
