"""Contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization", ACL) and USCD's uncertainty-selective variant (Wang et al. 2024, "USCD: Improving
Code Generation of LLMs by Uncertainty-Aware Selective Contrastive Decoding") as Decoders.

Contrastive decoding scores every token ``v`` of the expert's plausibility set

    V_head = {v : p_exp(v) >= alpha * max_w p_exp(w)}

by ``log p_exp(v) - log p_ama(v)`` (``-inf`` outside ``V_head``; the amateur's distribution
optionally at a temperature ``tau``) and takes the argmax (or, with a non-greedy ``Sampler``,
samples: the sampler's chain is applied to the scores as logits, with an explicit key). The
paper searches the score with beam search; this is its greedy / sampling form. The amateur is
one of:

* a separate small ``Model`` with its own params (read from the params pytree given to
  ``generate``: a key, default ``"amateur"``, or a hashable selector such as
  ``decodax.speculative.draft_model.FirstLayers``) and its own KV cache (``DecodeState.extra``),
  fed the same tokens as the expert;
* an early-exit amateur: the expert's first ``exit_layer`` layers + final norm + LM head. Its
  hidden state is a tap of the expert's own forward (``Model.apply(..., taps=)``), and its KV
  entries are the expert's first layers', so it costs one more LM head per step, no forward;
* the expert itself on a "lame" prompt (USCD: the prompt with its in-context examples
  removed, given by the caller as a second token sequence per row, see
  :func:`with_lame_prompts`). Expert and lame rows share one cache of ``2B`` rows and one
  ``2B``-row forward per step.

USCD contrasts only where the expert is uncertain. Our reading: the paper's abstract says
the noise induced by the lame prompt is removed "based on the uncertainty of the prediction
distribution from the standard prompt"; the authors' released code
(alphadl/CodeGen-USCD, ``bigcode_eval/contrast.py``) measures it as the standard deviation
of the expert's next-token *probability vector* over the vocabulary (``torch.std``, ddof 1)
and contrasts when it is ``<=`` a threshold (0.005 in their scripts; a flat, uncertain
distribution has a small deviation), otherwise it keeps the expert's distribution. That is
``uncertainty="std"`` here (``"entropy"``: contrast when the entropy in nats is ``>=`` the
threshold; ``"max_prob"``: when the top probability is ``<=`` it). At uncertain steps we apply
Li et al.'s score above; the released code instead combines probabilities,
``log(p_exp - 0.7 p_lame)`` over ``{p_exp >= (2/3) mean p_exp}`` -- a documented deviation,
so that USCD with an always-reached threshold *is* contrastive decoding with the lame-prompt
amateur, and with a never-reached one is plain decoding with the sampler.

One expert forward per emitted token (``init`` prefills and emits the first token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit, initial_state, run_prompt
from decodax.decoding.driver import pad_prompts
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.model.transformer import Model

__all__ = [
    "LAME_KEY",
    "UNCERTAINTY_MEASURES",
    "contrastive_decoding",
    "contrastive_scores",
    "expert_uncertain",
    "uscd",
    "with_lame_prompts",
]

LAME_KEY = "uscd_lame"  # where with_lame_prompts puts the lame prompts in the params pytree
UNCERTAINTY_MEASURES = ("std", "entropy", "max_prob")


def contrastive_scores(expert_logits: Float[Array, "B V"], amateur_logits: Float[Array, "B V"],
                       alpha: float, amateur_temperature: float = 1.0) -> Float[Array, "B V"]:
    """Li et al.'s CD score: ``log p_exp(v) - log p_ama(v)`` on ``V_head = {v : p_exp(v) >=
    alpha * max p_exp}``, ``-inf`` elsewhere (``p_ama`` at temperature ``amateur_temperature``).
    ``V_head`` always holds the expert's argmax, so a row is never all ``-inf``."""
    lp_e = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
    lp_a = jax.nn.log_softmax(amateur_logits.astype(jnp.float32) / amateur_temperature, axis=-1)
    cut = -jnp.inf if alpha == 0.0 else math.log(alpha)
    head = lp_e >= jnp.max(lp_e, axis=-1, keepdims=True) + cut
    score = lp_e - lp_a
    return jnp.where(head & ~jnp.isnan(score), score, -jnp.inf)


def expert_uncertain(expert_logits: Float[Array, "B V"], measure: str, threshold: float) -> Bool[Array, " B"]:
    """USCD's gate: True where the expert's next-token distribution is uncertain --
    ``"std"``: the standard deviation (ddof 1) of its probability vector is ``<= threshold``
    (the authors' code); ``"entropy"``: its entropy (nats) is ``>= threshold``;
    ``"max_prob"``: its top probability is ``<= threshold``."""
    lp = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(lp)
    if measure == "std":
        return jnp.std(p, axis=-1, ddof=1) <= threshold
    if measure == "entropy":
        return -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1) >= threshold
    if measure == "max_prob":
        return jnp.max(p, axis=-1) <= threshold
    raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")


def with_lame_prompts(model: Model, params: dict, lame_prompts: Sequence[Sequence[int]] | np.ndarray, *,
                      pad_to: int = 32) -> dict:
    """The params with USCD's lame prompts (one per prompt row, e.g. the prompt without its
    in-context examples) added under :data:`LAME_KEY` (right-padded like the driver pads
    prompts; a new dict, the weights are not copied)."""
    if not isinstance(params, dict):
        raise ValueError(f"with_lame_prompts: params must be a dict, got {type(params).__name__}")
    tokens, lengths = pad_prompts(lame_prompts, pad_to=pad_to)
    vocab = model.config.vocab_size
    bad = tokens[(np.arange(tokens.shape[1])[None, :] < lengths[:, None]) & ((tokens < 0) | (tokens >= vocab))]
    if bad.size:
        raise ValueError(f"with_lame_prompts: token ids must be in [0, {vocab}), got {int(bad[0])}")
    return {**params, LAME_KEY: {"tokens": jnp.asarray(tokens), "lengths": jnp.asarray(lengths)}}


@dataclasses.dataclass(frozen=True)
class _ParamsAt:
    """Hashable selector: the amateur's params are ``params[key]``."""

    key: str

    def __call__(self, params: dict) -> dict:
        if not isinstance(params, dict) or self.key not in params:
            raise ValueError(f"contrastive_decoding: the params passed to generate have no {self.key!r} entry "
                             f"(the amateur's params): pass {{**params, {self.key!r}: amateur_params}}")
        return params[self.key]


def _check_unit(name: str, value, lo_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and (
        0.0 < value <= 1.0 if lo_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"contrastive_decoding: {name} must be a float in {'(0' if lo_open else '[0'}, 1], "
                         f"got {value!r}")
    return float(value)


def contrastive_decoding(model: Model, amateur: Model | None = None, *,
                         amateur_params: str | Callable[[Any], Any] = "amateur",
                         exit_layer: int | None = None, lame_prompt: bool = False,
                         alpha: float = 0.1, amateur_temperature: float = 1.0,
                         sampler: sampling.Sampler | None = None,
                         uncertainty: str | None = None, threshold: float | None = None) -> Decoder:
    """Contrastive decoding (Li et al. 2023; module docstring) with exactly one amateur:
    ``amateur`` (a separate ``Model`` of the same vocabulary, params at ``amateur_params``),
    ``exit_layer`` (the expert's first ``exit_layer < n_layers`` layers), or ``lame_prompt=True``
    (the expert on the lame prompts of :func:`with_lame_prompts`). ``alpha`` in [0, 1] is the
    plausibility cut-off (the paper's 0.1), ``amateur_temperature`` > 0 the amateur's
    temperature; ``sampler`` (default greedy) draws from the scores. ``uncertainty`` /
    ``threshold`` (USCD, see :func:`uscd`) contrast only where :func:`expert_uncertain`.
    Memoised on its (hashable) arguments. Raises ``ValueError`` on bad arguments."""
    if not isinstance(model, Model):
        raise ValueError(f"contrastive_decoding: model must be a decodax Model, got {type(model).__name__}")
    kinds = [amateur is not None, exit_layer is not None, bool(lame_prompt)]
    if sum(kinds) != 1:
        raise ValueError("contrastive_decoding: give exactly one amateur: amateur=Model, exit_layer=int "
                         "or lame_prompt=True")
    alpha = _check_unit("alpha", alpha)
    t = amateur_temperature
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"contrastive_decoding: amateur_temperature must be a finite float > 0, got {t!r}")
    select = None
    if amateur is not None:
        kind = "model"
        if not isinstance(amateur, Model):
            raise ValueError("contrastive_decoding: amateur must be a decodax Model, got "
                             f"{type(amateur).__name__}")
        va, ve = amateur.config.vocab_size, model.config.vocab_size
        if va != ve:
            raise ValueError(f"contrastive_decoding: the amateur's vocabulary ({va}) differs from the "
                             f"expert's ({ve})")
        if isinstance(amateur_params, str):
            select = _ParamsAt(amateur_params)
        else:
            try:
                hash(amateur_params)
            except TypeError as e:
                raise ValueError("contrastive_decoding: amateur_params must be a key or a hashable callable") \
                    from e
            if not callable(amateur_params):
                raise ValueError("contrastive_decoding: amateur_params must be a key or a callable, got "
                                 f"{amateur_params!r}")
            select = amateur_params
    elif exit_layer is not None:
        kind = "exit"
        n = model.config.n_layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, numbers.Integral) or not 1 <= exit_layer < n:
            raise ValueError(f"contrastive_decoding: exit_layer must be an int in [1, {n - 1}] (fewer layers than "
                             f"the expert's {n}), got {exit_layer!r}")
        exit_layer = int(exit_layer)
    else:
        kind = "lame"
    gate = None
    if uncertainty is not None or threshold is not None:
        if uncertainty not in UNCERTAINTY_MEASURES:
            raise ValueError(f"contrastive_decoding: uncertainty must be one of {UNCERTAINTY_MEASURES}, "
                             f"got {uncertainty!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"contrastive_decoding: threshold must be a finite float >= 0, got {threshold!r}")
        gate = (uncertainty, float(threshold))
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    if not isinstance(sampler, sampling.Sampler):
        raise ValueError(f"contrastive_decoding: sampler must be a Sampler, got {type(sampler).__name__}")
    return _contrastive_decoding(model, kind, amateur, select, exit_layer, alpha, float(t), sampler, gate)


def uscd(model: Model, *, threshold: float = 0.005, uncertainty: str = "std", alpha: float = 0.1,
         sampler: sampling.Sampler | None = None) -> Decoder:
    """USCD (Wang et al. 2024): contrastive decoding against the expert on the lame prompt
    (:func:`with_lame_prompts`), applied only at steps where the expert is uncertain
    (:func:`expert_uncertain`; default: the authors' standard-deviation test at 0.005)."""
    return contrastive_decoding(model, lame_prompt=True, alpha=alpha, sampler=sampler,
                                uncertainty=uncertainty, threshold=threshold)


def _lame_rows(params, prompt, prompt_len, *, max_new_tokens: int, capacity: int):
    """Prompt rows then lame rows, as one ``[2B, W]`` batch (trace-time checks)."""
    if not isinstance(params, dict) or LAME_KEY not in params:
        raise ValueError("contrastive_decoding(lame_prompt=True): the params have no lame prompts; build them "
                         "with with_lame_prompts(model, params, lame_prompts)")
    lame, lame_len = params[LAME_KEY]["tokens"], params[LAME_KEY]["lengths"]
    b, p = prompt.shape
    if lame.shape[0] != b:
        raise ValueError(f"contrastive_decoding: {lame.shape[0]} lame prompts for {b} prompts")
    if lame.shape[1] + max_new_tokens + 1 > capacity:
        raise ValueError(f"contrastive_decoding: the lame prompts ({lame.shape[1]} tokens, padded) plus "
                         f"max_new_tokens ({max_new_tokens}) exceed the cache capacity {capacity}")
    w = max(p, lame.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, w - x.shape[1])))  # noqa: E731
    return (jnp.concatenate([pad(prompt), pad(lame.astype(jnp.int32))], axis=0),
            jnp.concatenate([prompt_len, lame_len.astype(jnp.int32)]))


@functools.lru_cache(maxsize=32)
def _contrastive_decoding(model: Model, kind: str, amateur: Model | None, select, exit_layer: int | None,
                          alpha: float, tau: float, sampler: sampling.Sampler, gate) -> Decoder:
    taps = (exit_layer,) if kind == "exit" else ()

    def pick(state: DecodeState, expert_logits, amateur_logits, key) -> Int[Array, " B"]:
        score = contrastive_scores(expert_logits, amateur_logits, alpha, tau)
        if gate is not None:
            plain = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
            score = jnp.where(expert_uncertain(expert_logits, *gate)[:, None], score, plain)
        ctx, mask = context_of(state) if sampler.needs_context else (None, None)
        tok = sampling.sample_with(sampler, score, None if sampler.is_greedy else key, context=ctx,
                                   context_mask=mask)
        return tok.astype(jnp.int32)

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        b, p = prompt.shape
        extra = None
        if kind == "model":
            out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
            ap = select(params)
            c = amateur.config
            if tuple(ap["embed"].shape) != (c.vocab_size, c.dim) or len(ap["layers"]) < c.n_layers:
                raise ValueError(f"contrastive_decoding: the amateur params (embed {tuple(ap['embed'].shape)}, "
                                 f"{len(ap['layers'])} layers) do not fit the amateur model (vocab "
                                 f"{c.vocab_size}, dim {c.dim}, {c.n_layers} layers)")
            aout, extra = run_prompt(amateur, ap, prompt, prompt_len, capacity)
            e_logits, a_logits = out.logits[:, 0], aout.logits[:, 0]
        elif kind == "exit":
            positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
            out = model.apply(params, prompt, positions, model.init_cache(b, capacity), compute_logits=False,
                              empty_cache=True, taps=taps)
            at = (prompt_len - 1)[:, None, None]
            e_logits = model.logits(params, jnp.take_along_axis(out.hidden, at, axis=1))[:, 0]
            a_logits = model.logits(params, jnp.take_along_axis(out.taps[0], at, axis=1))[:, 0]
            cache = kv.commit(out.cache, prompt_len)
        else:
            rows, lens = _lame_rows(params, prompt, prompt_len, max_new_tokens=max_new_tokens, capacity=capacity)
            out, cache = run_prompt(model, params, rows, lens, capacity)
            e_logits, a_logits = out.logits[:b, 0], out.logits[b:, 0]
        key, sub = jax.random.split(key)
        state = initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + 1, extra=extra)
        first = pick(state, e_logits, a_logits, sub)
        return emit(state, first[:, None], jnp.ones((b,), jnp.int32))

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        one = active.astype(jnp.int32)
        b = state.last_token.shape[0]
        key, sub = jax.random.split(state.key)
        cache, extra = state.cache, state.extra
        if kind == "lame":
            tokens = jnp.concatenate([state.last_token, state.last_token])[:, None]
            out = model.apply(params, tokens, cache.length[:, None], cache)
            e_logits, a_logits = out.logits[:b, 0], out.logits[b:, 0]
            cache = kv.commit(out.cache, jnp.concatenate([one, one]))
        else:
            out = model.apply(params, state.last_token[:, None], cache.length[:, None], cache, taps=taps)
            e_logits = out.logits[:, 0]
            cache = kv.commit(out.cache, one)
            if kind == "exit":
                a_logits = model.logits(params, out.taps[0])[:, 0]
            else:
                aout = amateur.apply(select(params), state.last_token[:, None], extra.length[:, None], extra)
                a_logits, extra = aout.logits[:, 0], kv.commit(aout.cache, one)
        tok = pick(state, e_logits, a_logits, sub)
        state = dataclasses.replace(state, cache=cache, extra=extra, key=key, calls=state.calls + active)
        return emit(state, tok[:, None], jnp.ones((b,), jnp.int32))

    what = {"model": lambda: f"amateur={amateur.config.name}", "exit": lambda: f"exit_layer={exit_layer}",
            "lame": lambda: "lame prompt"}[kind]()
    name = "uscd" if gate is not None and kind == "lame" else "contrastive_decoding"
    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name=f"{name}({what}, alpha={alpha:g})")
