"""Beam search (as in GNMT, Wu et al. 2016, and HF transformers' ``BeamSearchScorer``) as a Decoder.

Algorithm, per batch row, with beam width ``W``:

* ``W`` live beams with their summed log-probabilities (at the first step only
  beam 0 is live: the others start at ``-1e9``). Each step scores every
  continuation ``score(beam) + log p(v | beam)`` over the ``W x V`` candidates
  and keeps the best ``K = max(2, 1 + #eos) * W`` of them.
* A candidate that ends (an EOS id, or the maximum length) and ranks among the
  first ``W`` becomes a *finished hypothesis* with the length-penalised score
  ``sum log p / len ** length_penalty`` (``len`` = generated tokens, EOS
  included). The pool keeps the best ``W`` finished hypotheses.
* The best ``W`` candidates that did not end are the next live beams; the KV
  cache rows are reordered by their parent beams (one gather on the batch axis).
* A row finishes when its pool holds ``W`` hypotheses and the best live beam
  cannot beat the worst of them (``early_stopping``, HF's three rules: ``False``
  judges the live beam's score at the current length (HF's default heuristic);
  ``"never"`` uses the best length it could reach (``max_new_tokens`` when
  ``length_penalty > 0``), an exact bound; ``True`` stops as soon as ``W``
  hypotheses are finished), or at ``max_new_tokens``, where every surviving top
  candidate joins the pool. Its output is the best hypothesis of the pool.

What the Decoder carries (static shapes, no host round trip): the KV cache holds
``B * W`` rows (row ``b * W + w`` is beam ``w`` of prompt ``b``; the prompt is
prefilled once per prompt and its rows repeated), and ``DecodeState.extra`` is
``(BeamState, logp)``: the live beams' tokens and scores, the finished pool, and
the live beams' next-token log-probs ``[B, W, V]``. ``init`` only prefills; a
step expands the beams, reorders the cache rows, then runs the new last tokens
(skipped once every row has finished), so a row makes one forward per token,
the prefill included, as greedy decoding does. While a row searches,
``DecodeState.tokens`` shows its current best live beam (which never contains
an EOS); when the row finishes, the decoder writes the best hypothesis there,
sets its length and marks the row ``done`` (the driver honours a row the
decoder finished itself). Consequences: the driver's
``stop_sequences`` and ``budget`` cut a row's search short and return its best
live beam at that point, and ``generate``'s ``eos_ids`` should be the
decoder's (both default to the model's). Beam search is deterministic: the
``key`` is unused and logits processors (``Sampler``) are not applied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from decodax.decoding.autoregressive import initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv

__all__ = ["BeamState", "beam_search"]

NEG = -1.0e9  # HF's "impossible" score: finite, so sums and divisions never give NaN


class BeamState(NamedTuple):
    """Per prompt row ``b``: ``W`` live beams and the pool of ``W`` finished hypotheses.

    ``seqs[b, w, :length]`` are live beam w's tokens and ``scores[b, w]`` its summed
    log-probability, best first.
    ``fin_seqs[b, j, :fin_len[b, j]]`` is finished hypothesis j with the
    length-penalised score ``fin_scores[b, j]`` (best first; ``fin_valid``
    marks filled entries, the others score ``NEG``).
    """

    seqs: Int[Array, "B W N"]
    scores: Float[Array, "B W"]
    fin_seqs: Int[Array, "B W N"]
    fin_scores: Float[Array, "B W"]
    fin_len: Int[Array, "B W"]
    fin_valid: Bool[Array, "B W"]
    length: Int[Array, ""]


def beam_search(
    model,
    width: int = 4,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_ids: Sequence[int] | None = None,
) -> Decoder:
    """Beam search with beam width ``width`` (module docstring) as a ``Decoder``.

    ``length_penalty`` is the exponent ``alpha`` of ``score / len ** alpha``
    (HF's convention: ``> 0`` favours longer hypotheses, ``0`` ranks by the summed
    log-probability); ``early_stopping`` is ``False`` (HF's default), ``True`` or
    ``"never"``; ``eos_ids`` end a hypothesis (default: the model's). With
    ``width=1`` it is greedy decoding. Memoised on its (hashable) arguments, so
    ``generate`` reuses its compilation. Raises ``ValueError`` on bad arguments.
    """
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"beam_search: width must be an int >= 1, got {width!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"beam_search: length_penalty must be a finite float, got {length_penalty!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"beam_search: early_stopping must be True, False or 'never', got {early_stopping!r}")
    vocab = model.config.vocab_size
    eos = tuple(model.config.eos_ids if eos_ids is None else eos_ids)
    if any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < vocab for e in eos):
        raise ValueError(f"beam_search: eos_ids must be token ids in [0, {vocab}), got {eos!r}")
    return _beam_search(model, int(width), float(length_penalty), early_stopping,
                        tuple(int(e) for e in eos))


def _take(x: Array, idx: Int[Array, "B J"]) -> Array:
    """``x[b, idx[b, j], ...]`` for ``x`` of shape ``[B, K, ...]``."""
    return x[jnp.arange(x.shape[0])[:, None], idx]


def _advance(bs: BeamState, logp: Float[Array, "B W V"], *, eos: tuple[int, ...], alpha: float,
             early_stopping: bool | str) -> tuple[BeamState, Int[Array, "B W"], Bool[Array, " B"]]:
    """One beam-search step from the next-token log-probs of every live beam.

    Returns the new state, each new live beam's parent beam and whether the row
    finished (pool full and unbeatable, or the maximum length reached)."""
    b, w, v = logp.shape
    max_len = bs.seqs.shape[-1]
    n_keep = min(max(2, 1 + len(eos)) * w, w * v)
    top_s, top_i = jax.lax.top_k((bs.scores[:, :, None] + logp).reshape(b, w * v), n_keep)
    parent, tok = top_i // v, (top_i % v).astype(jnp.int32)
    new_len = bs.length + 1
    cand = _take(bs.seqs, parent).at[:, :, bs.length].set(tok)  # [B, K, N]
    ends = jnp.zeros(tok.shape, bool)
    for e in eos:
        ends = ends | (tok == e)
    ends = ends | (new_len >= max_len)

    # next live beams: the best W candidates that did not end
    live_s = top_s + jnp.where(ends, NEG, 0.0)
    live = jax.lax.top_k(live_s, w)[1]
    seqs, scores, parents = _take(cand, live), _take(live_s, live), _take(parent, live)

    # finished pool: the ending candidates among the first W ranks, merged with the pool
    just = ends & (jnp.arange(n_keep) < w)[None, :]
    fin_cand = top_s / new_len.astype(jnp.float32) ** alpha + jnp.where(just, 0.0, NEG)
    merged_s = jnp.concatenate([bs.fin_scores, fin_cand], axis=1)
    best = jax.lax.top_k(merged_s, w)[1]
    pick = lambda old, new: _take(jnp.concatenate([old, new], axis=1), best)  # noqa: E731
    fin_seqs = pick(bs.fin_seqs, cand)
    fin_len = pick(bs.fin_len, jnp.broadcast_to(new_len, tok.shape).astype(jnp.int32))
    fin_valid = pick(bs.fin_valid, just)
    fin_scores = _take(merged_s, best)

    # can the best live beam still beat the worst finished hypothesis?
    full = jnp.all(fin_valid, axis=1)
    hyp_len = max_len if (early_stopping == "never" and alpha > 0.0) else new_len
    best_possible = scores[:, 0] / jnp.asarray(hyp_len, jnp.float32) ** alpha
    worst = jnp.where(full, jnp.min(fin_scores, axis=1), NEG)
    finished = (best_possible <= worst) | (new_len >= max_len)
    if early_stopping is True:
        finished = finished | full
    new = BeamState(seqs=seqs, scores=scores, fin_seqs=fin_seqs, fin_scores=fin_scores,
                    fin_len=fin_len, fin_valid=fin_valid, length=new_len)
    return new, parents, finished


def _publish(state: DecodeState, bs: BeamState, finished: Bool[Array, " B"], frozen: Bool[Array, " B"]
             ) -> DecodeState:
    """Show each searching row's best live beam, or a finished row's best hypothesis.

    Rows already done before this step (``frozen``) keep everything."""
    out = jnp.where(finished[:, None], bs.fin_seqs[:, 0], bs.seqs[:, 0])
    n = jnp.where(finished, bs.fin_len[:, 0], bs.length).astype(jnp.int32)
    width = state.tokens.shape[1]
    out = jnp.pad(out, ((0, 0), (0, width - out.shape[1])))
    last = jnp.take_along_axis(out, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    return dataclasses.replace(
        state,
        tokens=jnp.where(frozen[:, None], state.tokens, out),
        num_generated=jnp.where(frozen, state.num_generated, n),
        last_token=jnp.where(frozen, state.last_token, last),
        done=frozen | finished,
    )


def _freeze(new: BeamState, old: BeamState, frozen: Bool[Array, " B"]) -> BeamState:
    keep = lambda n, o: jnp.where(frozen.reshape(frozen.shape + (1,) * (n.ndim - 1)), o, n)  # noqa: E731
    return BeamState(*(keep(n, o) for n, o in zip(new[:-1], old[:-1])), length=new.length)


def _log_probs(logits: Float[Array, "R 1 V"], b: int, w: int) -> Float[Array, "B W V"]:
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1).reshape(b, w, -1)


@functools.lru_cache(maxsize=32)
def _beam_search(model, width: int, alpha: float, early_stopping, eos: tuple[int, ...]) -> Decoder:
    w = width

    # The extra state is (BeamState, logp): the live beams and their next-token log-probs,
    # not yet expanded. ``init`` only prefills (it emits nothing); a step expands the beams
    # (``_advance``), reorders the cache rows and runs the new last tokens, which gives the
    # next step's log-probs. So a program holds one ``_advance`` and one decode forward,
    # and a row makes one forward per token, the prefill included.

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        b = prompt.shape[0]
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        cache = kv.take_rows(cache, jnp.repeat(jnp.arange(b), w))  # row b * W + w: beam w of prompt b
        bs = BeamState(
            seqs=jnp.zeros((b, w, max_new_tokens), jnp.int32),
            scores=jnp.zeros((b, w), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 is live at first
            fin_seqs=jnp.zeros((b, w, max_new_tokens), jnp.int32),
            fin_scores=jnp.full((b, w), NEG, jnp.float32),
            fin_len=jnp.zeros((b, w), jnp.int32),
            fin_valid=jnp.zeros((b, w), bool),
            length=jnp.zeros((), jnp.int32),
        )
        logp = jnp.repeat(_log_probs(out.logits, b, 1), w, axis=1)
        # every beam row holds the prompt; beams differ from the first token on
        return initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + 1, extra=(bs, logp))

    def step(params, state: DecodeState) -> DecodeState:
        bs, logp = state.extra
        b = state.tokens.shape[0]
        frozen = state.done
        new, parents, finished = _advance(bs, logp, eos=eos, alpha=alpha, early_stopping=early_stopping)
        new = _freeze(new, bs, frozen)
        finished = finished & ~frozen
        # reorder the cache rows by parent beam (frozen rows keep theirs)
        src = jnp.arange(b)[:, None] * w + jnp.where(frozen[:, None], jnp.arange(w)[None, :], parents)
        cache = kv.take_rows(state.cache, src.reshape(b * w))
        going = ~(frozen | finished)  # rows that need the next log-probs

        def forward(cache):
            last = new.seqs[:, :, new.length - 1].reshape(b * w)
            out = model.apply(params, last[:, None], cache.length[:, None], cache)
            return kv.commit(out.cache, jnp.repeat(going, w).astype(jnp.int32)), _log_probs(out.logits, b, w)

        cache, logp = jax.lax.cond(jnp.any(going), forward, lambda c: (c, logp), cache)
        state = dataclasses.replace(state, cache=cache, extra=(new, logp), calls=state.calls + going)
        return _publish(state, new, finished, frozen)

    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name=f"beam{width}")
