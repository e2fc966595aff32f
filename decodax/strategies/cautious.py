"""Cautious next-token prediction (CNTP; Wang et al. 2025, "Cautious Next Token Prediction",
Findings of ACL 2025, arXiv 2507.03038) as a Decoder.

At every step, with ``p`` the sampling distribution of the next token (the ``Sampler``'s chain
applied to the model's logits) and ``H = -sum_v p(v) log p(v)`` its entropy, the number of
trials is

    N = floor(1 + (N_max - 1) * clip((H - H_low) / (H_high - H_low), 0, 1))

(our reading of the authors' released code, ``determine_trial_number``: the less confident the
model, the more trials; their defaults ``H_low = 0.01``, ``H_high = 1.5``, ``N_max = 10``). With
``N = 1`` one token is sampled from ``p``, as plain sampling does. With ``N > 1``, ``N`` trials
are sampled independently from the same point, each token by the sampler, until a trial emits a
punctuation token or an EOS id (inclusive) or reaches ``max_trial_len`` tokens (the authors stop
only at punctuation or the generation's stopping criteria; a static cap keeps shapes static).
The trial with the lowest perplexity ``exp(-mean_i log p(t_i | ...))`` over its own tokens (each
under the distribution it was drawn from) is kept and all its tokens are emitted; ties go to the
lowest trial index.

On device, with static shapes: ``DecodeState.extra`` holds the next-token logits after the
context (the last emitted token is already in the cache, as in contrastive search), so ``init``
only prefills and the first step picks the first token. A step where no active row is uncertain
(``lax.cond``) samples one token and feeds it (one ``T = 1`` forward, exactly plain sampling's
token and key schedule). Otherwise the cache rows are repeated ``N_max`` times (``take_rows``;
row ``b * N_max + m`` is trial ``m`` of prompt ``b``) and all trials advance together, one
``T = 1`` forward of ``B * N_max`` rows per token, in a ``lax.while_loop`` that stops when every
trial has ended; trials ``m >= N[b]`` are computed but masked out of the choice. The chosen
trial's cache row is gathered back (``take_rows``) with its entries committed, and the logits
after its last token become the next step's. Trial 0's first token is always the plain sample,
so a row whose ``N = 1`` inside such a step gets the same token and cache as in the plain branch.

Keys: the step splits ``state.key`` as plain sampling does (``key, sub``); trial 0's first token
uses ``sub``, trial ``m >= 1``'s ``fold_in(sub, m)``, and token ``i >= 1`` of every trial
``fold_in(fold_in(sub, TRIAL_STREAM), i)`` (one categorical draw over the ``B * N_max`` rows).
Penalties that need the context (repetition / presence) are not supported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv

__all__ = ["CNTP_PUNCTUATION_SMOLLM2", "ENTROPY_KEY", "CautiousState", "cautious", "entropy", "trial_count",
           "with_entropy_range"]

# The authors' punctuation set (". , \n ? ! : ; ) ] }") in SmolLM2's vocabulary (the default model).
CNTP_PUNCTUATION_SMOLLM2 = (30, 28, 198, 47, 17, 42, 43, 25, 77, 109)
TRIAL_STREAM = 0x7FFF  # fold_in tag of the key stream of trial tokens after the first
ENTROPY_KEY = "cntp_entropy"  # params entry overriding (entropy_low, entropy_high) at run time


class CautiousState(NamedTuple):
    """``logits[b]``: the next-token logits after row b's context (its last emitted token is
    already in the cache)."""

    logits: Float[Array, "B V"]


def entropy(logp: Float[Array, "*B V"]) -> Float[Array, "*B"]:
    """Shannon entropy (nats) of ``exp(logp)``; ``-inf`` entries contribute 0."""
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def trial_count(h: Float[Array, "*B"], *, low, high, max_trials: int) -> Int[Array, "*B"]:
    """CNTP's number of trials ``floor(1 + (max_trials - 1) * clip((h - low) / (high - low), 0, 1))``;
    ``low = inf`` gives 1 (``low`` / ``high`` may be traced)."""
    x = jnp.clip((h - low) / (high - low), 0.0, 1.0)
    x = jnp.where(jnp.isinf(low), 0.0, x)
    return jnp.floor(1.0 + (max_trials - 1) * x).astype(jnp.int32)


def _check_range(low, high, where="cautious"):
    low = _real("entropy_low", low, lambda x: x >= 0 and not math.isnan(x), "a float >= 0 (inf: never branch)")
    high = _real("entropy_high", high, lambda x: not math.isnan(x), "a float > entropy_low")
    if math.isfinite(low) and not high > low:
        raise ValueError(f"{where}: entropy_high must be a float > entropy_low ({low}), got {high!r}")
    return low, high


def with_entropy_range(params: dict, entropy_low: float, entropy_high: float) -> dict:
    """``params`` plus a run-time ``(entropy_low, entropy_high)`` for :func:`cautious` decoders (traced:
    one compilation serves every range; without it the decoder's own values apply)."""
    low, high = _check_range(entropy_low, entropy_high, "with_entropy_range")
    return {**params, ENTROPY_KEY: jnp.asarray([low, high], jnp.float32)}


def _real(name, value, ok, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"cautious: {name} must be {expected}, got {value!r}")
    return float(value)


def _int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo \
            or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"cautious: {name} must be an int {rng}, got {value!r}")
    return int(value)


def cautious(
    model,
    *,
    entropy_low: float = 0.01,
    entropy_high: float = 1.5,
    max_trials: int = 10,
    max_trial_len: int = 16,
    punctuation: Sequence[int] = (),
    eos_ids: Sequence[int] | None = None,
    sampler: sampling.Sampler | None = None,
) -> Decoder:
    """Cautious next-token prediction (module docstring) as a ``Decoder``.

    ``entropy_low < entropy_high`` (nats; ``entropy_low = inf`` never branches) map the entropy to
    ``1 .. max_trials`` trials (:func:`with_entropy_range` overrides them at run time);
    ``max_trial_len`` caps a trial's tokens (it is also the most tokens one step emits);
    ``punctuation`` and ``eos_ids`` (default: the model's) end a trial. ``sampler`` (default:
    temperature 1) draws every token; repetition / presence penalties are rejected. Memoised on
    its (hashable) arguments. Raises ``ValueError`` on bad arguments."""
    vocab = model.config.vocab_size
    low, high = _check_range(entropy_low, entropy_high)
    trials = _int("max_trials", max_trials, 1)
    length = _int("max_trial_len", max_trial_len, 1, model.config.max_seq_len)
    eos = tuple(model.config.eos_ids if eos_ids is None else eos_ids)
    stops = tuple(punctuation) + eos
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab for t in stops):
        raise ValueError(f"cautious: punctuation and eos_ids must be token ids in [0, {vocab}), got {stops!r}")
    sampler = sampler or sampling.make_sampler(temperature=1.0)
    if not isinstance(sampler, sampling.Sampler):
        raise ValueError(f"cautious: sampler must be a Sampler, got {type(sampler).__name__}")
    if sampler.needs_context:
        raise ValueError("cautious: repetition / presence penalties are not supported (a trial's context changes "
                         "inside the step)")
    return _cautious(model, low, high, trials, length, tuple(sorted({int(t) for t in stops})), sampler)


@functools.lru_cache(maxsize=32)
def _cautious(model, low: float, high: float, m: int, length: int, stops: tuple[int, ...],
              sampler: sampling.Sampler) -> Decoder:
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)

    def draw(logits, key):
        return sampling.sample_with(sampler, logits, None if sampler.is_greedy else key)

    def log_p(logits):
        return sampling.log_probs(sampler, logits)

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        # the key is split by the first step as plain sampling's prefill splits it
        return initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + length,
                             extra=CautiousState(out.logits[:, 0]))

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        one = active.astype(jnp.int32)
        b = state.last_token.shape[0]
        key, sub = jax.random.split(state.key)
        logits = state.extra.logits
        logp0 = log_p(logits)
        lo, hi = params[ENTROPY_KEY] if isinstance(params, dict) and ENTROPY_KEY in params else (low, high)
        n = jnp.where(active, trial_count(entropy(logp0), low=lo, high=hi, max_trials=m), 1)
        first = draw(logits, sub)  # plain sampling's token (trial 0's first token)
        cache = state.cache

        def plain(_):
            out = model.apply(params, first[:, None], cache.length[:, None], cache)
            toks = jnp.zeros((b, length), jnp.int32).at[:, 0].set(first)
            return kv.commit(out.cache, one), out.logits[:, 0], toks, jnp.ones((b,), jnp.int32), one

        def branch(_):
            r = b * m
            rows = jnp.repeat(jnp.arange(b), m)
            firsts = [first] + [draw(logits, jax.random.fold_in(sub, j)) for j in range(1, m)]
            tok0 = jnp.stack(firsts, axis=1).reshape(r)  # row b * m + j: trial j of prompt b
            lp0 = jnp.take_along_axis(logp0[rows], tok0[:, None], axis=1)[:, 0]
            stream = jax.random.fold_in(sub, TRIAL_STREAM)
            v = logits.shape[-1]
            carry = dict(
                i=jnp.zeros((), jnp.int32), cache=kv.take_rows(cache, rows), tok=tok0,
                toks=jnp.zeros((r, length), jnp.int32), lps=jnp.zeros((r, length), jnp.float32).at[:, 0].set(lp0),
                fin=jnp.zeros((r,), bool), n=jnp.full((r,), length, jnp.int32),
                nxt=jnp.zeros((r, v), logits.dtype), first_logits=jnp.zeros((r, v), logits.dtype),
            )

            def body(c):
                i = c["i"]
                out = model.apply(params, c["tok"][:, None], c["cache"].length[:, None], c["cache"])
                lg = out.logits[:, 0]
                ends = jnp.isin(c["tok"], stop_ids) | (i == length - 1)
                new = ~c["fin"] & ends
                nxt_tok = draw(lg, jax.random.fold_in(stream, i + 1))
                lp = jnp.take_along_axis(log_p(lg), nxt_tok[:, None], axis=1)[:, 0]
                return dict(
                    i=i + 1, cache=kv.commit(out.cache, 1), tok=nxt_tok,
                    toks=c["toks"].at[:, i].set(c["tok"]),
                    lps=c["lps"].at[:, jnp.minimum(i + 1, length - 1)].set(
                        jnp.where(i + 1 < length, lp, c["lps"][:, length - 1])),
                    fin=c["fin"] | ends, n=jnp.where(new, i + 1, c["n"]),
                    nxt=jnp.where(new[:, None], lg, c["nxt"]),
                    first_logits=jnp.where(i == 0, lg, c["first_logits"]),
                )

            c = jax.lax.while_loop(lambda c: (c["i"] < length) & ~jnp.all(c["fin"]), body, carry)
            valid = jnp.arange(length)[None, :] < c["n"][:, None]
            ppl = -jnp.sum(jnp.where(valid, c["lps"], 0.0), axis=1) / c["n"]  # log-perplexity
            ppl = jnp.where(jnp.arange(m)[None, :] < n[:, None], ppl.reshape(b, m), jnp.inf)
            branching = n > 1
            best = jnp.where(branching, jnp.argmin(ppl, axis=1), 0)
            pick = jnp.arange(b) * m + best
            count = jnp.where(branching, c["n"][pick], 1)
            toks = c["toks"][pick]
            nxt = jnp.where(branching[:, None], c["nxt"][pick], c["first_logits"][pick])
            kept = kv.take_rows(c["cache"], pick)
            kept = kv.rollback(kept, cache.length + jnp.where(active, count, 0))
            return kept, nxt, toks, count, one * c["i"]

        new_cache, nxt, toks, count, forwards = jax.lax.cond(jnp.any(active & (n > 1)), branch, plain, None)
        state = dataclasses.replace(
            state, cache=new_cache, key=key, calls=state.calls + forwards,
            extra=CautiousState(jnp.where(active[:, None], nxt, logits)),
        )
        return emit(state, toks, count)

    name = f"cntp(trials<={m}, H in [{low:g}, {high:g}], len<={length})"
    # a step writes up to max_trial_len entries past the committed length
    return Decoder(init=init, step=step, model=model, max_step_tokens=length, name=name)
