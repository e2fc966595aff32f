"""A separate draft model with its own KV cache, as a :class:`~decodax.speculative.drafters.Drafter`.

Speculative decoding with a small draft model (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling"): any
decodax :class:`~decodax.model.transformer.Model` with the target's vocabulary
drafts ``k`` tokens autoregressively and the target verifies them in one
forward (:func:`decodax.speculative.speculative`).

Where the draft parameters live
-------------------------------
``Drafter.propose`` only receives the target's ``params``, and parameters
closed over by a jitted function become compile-time constants. So the draft
parameters are read *from the params pytree passed to* ``generate``, as
traced arrays:

* ``draft_params="draft"`` (a string, the default): ``params["draft"]``; build
  that pytree with :func:`with_draft_params` (``Model.apply`` ignores the extra
  key, so the target runs on it unchanged);
* ``draft_params=FirstLayers(n)`` (any hashable callable ``target_params ->
  draft_params``): e.g. a draft made of the target's first ``n`` layers, final
  norm and LM head (:func:`first_layers_model` gives its ``Model``), without a
  copy of the weights.

Cache bookkeeping (the invariant)
---------------------------------
Let ``L = state.cache.length`` (the target's committed length; ``last_token``
sits at position ``L``). Between steps the draft cache holds exactly the
positions ``< L - 1`` (``DraftState.cache.length == L - 1``). ``propose`` feeds
``[token at L - 1, last_token]`` at positions ``[L - 1, L]`` (one ``T = 2``
forward, whose last logits give draft 1), then drafts 2..k with ``T = 1``
forwards of drafts 1..k-1 at ``L + 1 .. L + k - 1``. After the target accepts
``a`` drafts, ``L' = L + a + 1`` and the draft cache's entries for positions
``<= L + min(a, k - 1)`` are the emitted tokens, which covers ``< L' - 1`` in
both cases (``a < k``: entries up to ``L + a = L' - 1``; ``a = k``: up to
``L + k - 1 = L' - 2``, draft ``k`` was never fed). ``update`` rolls the draft
cache back to ``L' - 1``; the re-fed token at ``L' - 1`` makes the catch-up a
static width of 2 for every row whatever its acceptance. Rows that are done
keep ``L`` and simply re-draft from the same place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of
from decodax.decoding.state import DecodeState
from decodax.model import cache as kv
from decodax.model.transformer import Model
from decodax.speculative.drafters import Drafter, Proposal
from decodax.speculative.specdecpp import acceptance_logit, stop_after

__all__ = [
    "DraftState",
    "FirstLayers",
    "ParamsAt",
    "draft_model_drafter",
    "first_layers_model",
    "with_draft_params",
]


class DraftState(NamedTuple):
    """The drafter's state: the draft model's own KV cache (committed = positions ``< L - 1``)."""

    cache: kv.KVCache


@dataclasses.dataclass(frozen=True)
class ParamsAt:
    """Hashable selector: the draft params are ``params[key]`` (see :func:`with_draft_params`)."""

    key: str

    def __call__(self, params: dict) -> dict:
        if not isinstance(params, dict) or self.key not in params:
            raise ValueError(
                f"draft_model_drafter: the params passed to generate have no {self.key!r} entry; "
                f"build them with with_draft_params(target_params, draft_params, key={self.key!r})"
            )
        return params[self.key]


@dataclasses.dataclass(frozen=True)
class FirstLayers:
    """Hashable selector: a draft made of the target's embedding, first ``n`` layers,
    final norm and LM head (the weights are shared, not copied)."""

    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"FirstLayers: n must be an int >= 1, got {self.n!r}")

    def __call__(self, params: dict) -> dict:
        if len(params["layers"]) < self.n:
            raise ValueError(f"FirstLayers({self.n}): the target has only {len(params['layers'])} layers")
        out = {"embed": params["embed"], "layers": list(params["layers"][: self.n]),
               "final_norm": params["final_norm"]}
        if "lm_head" in params:
            out["lm_head"] = params["lm_head"]
        return out


def first_layers_model(model: Model, n: int) -> Model:
    """The ``Model`` of a draft made of ``model``'s first ``n`` layers (pair it with ``FirstLayers(n)``)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= model.config.n_layers:
        raise ValueError(f"first_layers_model: n must be an int in [1, {model.config.n_layers}], got {n!r}")
    c = model.config
    return Model(dataclasses.replace(c, n_layers=n, name=f"{c.name}[:{n}]"))


def with_draft_params(params: dict, draft_params: dict, key: str = "draft") -> dict:
    """The target params with the draft's params added under ``key`` (a new dict, no copy)."""
    if not isinstance(params, dict):
        raise ValueError(f"with_draft_params: params must be a dict, got {type(params).__name__}")
    return {**params, key: draft_params}


def _token_at(state: DecodeState, pos: Int[Array, " B"]) -> Int[Array, " B"]:
    """The context token at absolute position ``pos[b]`` (prompt, then emitted tokens)."""
    p, n = state.prompt.shape[1], state.tokens.shape[1]
    from_prompt = jnp.take_along_axis(state.prompt, jnp.clip(pos, 0, p - 1)[:, None], axis=1)[:, 0]
    g = jnp.clip(pos - state.prompt_len, 0, n - 1)
    from_tokens = jnp.take_along_axis(state.tokens, g[:, None], axis=1)[:, 0]
    return jnp.where(pos < state.prompt_len, from_prompt, from_tokens).astype(jnp.int32)


def draft_model_drafter(target_model: Model, draft_model: Model, *,
                        draft_params: str | Callable[[Any], Any] = "draft",
                        stop_threshold: float | None = None) -> Drafter:
    """Draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023):
    ``draft_model``, with its own parameters and its own KV cache (kept in the
    drafter state), drafts ``k`` tokens autoregressively per step
    (a ``lax.while_loop``).

    ``draft_params``: where the draft's parameters are in the params pytree
    given to ``generate`` -- a key (default ``"draft"``, see
    :func:`with_draft_params`) or a hashable callable ``target_params ->
    draft_params`` (e.g. :class:`FirstLayers`). Greedy samplers give
    deterministic drafts (``probs=None``); otherwise draft ``i`` is sampled
    from ``sampling.probs(sampler, draft_logits)`` (penalties see the context
    plus the earlier drafts) and those probabilities are returned. See the
    module docstring for the cache invariant. Raises ``ValueError`` when the
    vocabularies differ; ``k < 1`` is rejected when tracing ``propose``.

    ``stop_threshold`` (SpecDec++, :mod:`decodax.speculative.specdecpp`): the draft
    params carry an acceptance head (``"acceptance"``); a row stops drafting once
    the predicted P(at least one rejection) exceeds the threshold (its
    ``Proposal.length``), and the loop ends when every row has stopped. Pair it
    with ``speculative(..., widths=)`` so short drafts get short verifies.
    """
    for name, m in (("target_model", target_model), ("draft_model", draft_model)):
        if not isinstance(m, Model):
            raise ValueError(f"draft_model_drafter: {name} must be a decodax Model, got {type(m).__name__}")
    vt, vd = target_model.config.vocab_size, draft_model.config.vocab_size
    if vt != vd:
        raise ValueError(f"draft_model_drafter: the draft's vocabulary ({vd}) differs from the target's ({vt})")
    if isinstance(draft_params, str):
        select = ParamsAt(draft_params)
    elif callable(draft_params):
        try:
            hash(draft_params)
        except TypeError as e:
            raise ValueError("draft_model_drafter: draft_params must be a key or a hashable callable") from e
        select = draft_params
    else:
        raise ValueError(f"draft_model_drafter: draft_params must be a key or a callable, got {draft_params!r}")
    if stop_threshold is not None:
        stop_threshold = float(stop_threshold)
        if not 0.0 < stop_threshold < 1.0:
            raise ValueError(f"draft_model_drafter: stop_threshold must be in (0, 1), got {stop_threshold}")
    return _draft_model_drafter(draft_model, select, stop_threshold)


def _check_draft_params(draft_model: Model, dp) -> None:
    c = draft_model.config
    shape = tuple(dp["embed"].shape)
    if shape != (c.vocab_size, c.dim) or len(dp["layers"]) < c.n_layers:
        raise ValueError(
            f"draft_model_drafter: the draft params (embed {shape}, {len(dp['layers'])} layers) do not fit "
            f"the draft model (vocab {c.vocab_size}, dim {c.dim}, {c.n_layers} layers)"
        )


@functools.lru_cache(maxsize=64)
def _draft_model_drafter(draft_model: Model, select: Callable[[Any], Any], stop: float | None) -> Drafter:

    def init(params, state: DecodeState) -> DraftState:
        dp = select(params)
        _check_draft_params(draft_model, dp)
        b, p = state.prompt.shape
        cache = draft_model.init_cache(b, state.cache.capacity, dtype=state.cache.dtype)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        out = draft_model.apply(dp, state.prompt, positions, cache, compute_logits=False, empty_cache=True)
        # positions < prompt_len - 1 = L - 1 (the first propose re-feeds the last prompt token)
        return DraftState(kv.commit(out.cache, state.prompt_len - 1))

    def propose(params, state: DecodeState, dstate: DraftState, key, *, k: int, sampler) -> Proposal:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"draft_model_drafter: draft length k must be an int >= 1, got {k!r}")
        dp = select(params)
        dcache = dstate.cache
        b = dcache.batch
        greedy = sampler.is_greedy
        keys = jax.random.split(key, k)
        if sampler.needs_context:
            ctx, mask = context_of(state)
            ctx = jnp.concatenate([ctx, jnp.zeros((b, k), jnp.int32)], axis=1)
            mask = jnp.concatenate([mask, jnp.zeros((b, k), bool)], axis=1)

        def draw(i, logits, drafts, probs):
            """Draft ``i`` (0-based) from the draft logits; penalties see drafts ``< i``."""
            c = m = None
            if sampler.needs_context:
                n = ctx.shape[1] - k  # the last k columns hold the drafts
                c = jax.lax.dynamic_update_slice_in_dim(ctx, drafts, n, axis=1)
                j = jnp.arange(ctx.shape[1])[None, :]
                m = mask | ((j >= n) & (j < n + i))
            if greedy:
                x = sampling.sample_with(sampler, logits, None, context=c, context_mask=m)
            else:
                q = sampling.probs(sampler, logits, c, m)
                x = sampling.sample(jnp.log(q), keys[i])
                probs = probs.at[:, i].set(q)
            return drafts.at[:, i].set(x.astype(jnp.int32)), probs

        # Catch-up: [token at L - 1, last_token] at positions [L - 1, L] over the draft
        # cache (length L - 1); its last logits give draft 1.
        base = dcache.length
        tokens = jnp.stack([_token_at(state, base), state.last_token], axis=1)
        positions = base[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        out = draft_model.apply(dp, tokens, positions, dcache, logits_at=jnp.ones((b, 1), jnp.int32))
        dcache = kv.commit(out.cache, 2)
        probs0 = None if greedy else jnp.zeros((b, k, draft_model.config.vocab_size), jnp.float32)
        drafts, probs = draw(0, out.logits[:, 0], jnp.zeros((b, k), jnp.int32), probs0)
        length = jnp.full((b,), k, jnp.int32)
        if stop is not None:
            if "acceptance" not in dp:
                raise ValueError("draft_model_drafter: stop_threshold needs an acceptance head in the draft params "
                                 "(params['draft']['acceptance'], see decodax.speculative.specdecpp)")
            log_p = jax.nn.log_sigmoid(acceptance_logit(dp["acceptance"], out.hidden[:, 1]))
            length = jnp.where(stop_after(log_p, stop), 1, k)
        else:
            log_p = jnp.zeros((b,), jnp.float32)

        def body(carry):
            i, dcache, drafts, probs, log_p, length = carry
            out = draft_model.apply(dp, drafts[:, i - 1][:, None], dcache.length[:, None], dcache)
            drafts, probs = draw(i, out.logits[:, 0], drafts, probs)
            if stop is not None:
                log_p = log_p + jax.nn.log_sigmoid(acceptance_logit(dp["acceptance"], out.hidden[:, 0]))
                length = jnp.where((length == k) & stop_after(log_p, stop), i + 1, length)
            return i + 1, kv.commit(out.cache, 1), drafts, probs, log_p, length

        def going(carry):
            i, length = carry[0], carry[-1]
            more = jnp.any((length == k) & ~state.done) if stop is not None else True
            return (i < k) & more

        n, dcache, drafts, probs, _, length = jax.lax.while_loop(
            going, body, (jnp.int32(1), dcache, drafts, probs, log_p, length))
        if stop is not None:  # drafts past the last one drawn are filler (the last one repeated)
            past = jnp.arange(k)[None, :] >= n
            drafts = jnp.where(past, jnp.take_along_axis(drafts, jnp.full((b, 1), n - 1), axis=1), drafts)
            if probs is not None:
                onehot = jax.nn.one_hot(drafts, probs.shape[-1], dtype=probs.dtype)
                probs = jnp.where(past[..., None], onehot, probs)
            length = jnp.minimum(length, n)
        return Proposal(drafts, probs, length, DraftState(dcache))

    def update(dstate: DraftState, state: DecodeState, accepted, **kwargs) -> DraftState:
        """Roll the draft cache back to the target's committed length minus one."""
        return DraftState(kv.rollback(dstate.cache, state.cache.length - 1))

    c = draft_model.config
    suffix = "" if stop is None else f", specdec++ h={stop:g}"
    return Drafter(init=init, propose=propose, update=update,
                   name=f"draft_model({c.name}, {c.n_layers} layers{suffix})", may_be_empty=False)
