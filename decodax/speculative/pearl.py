"""PEARL: parallel speculative decoding with pre-verify and post-verify.

Liu et al. 2025, "PEARL: Parallel Speculative Decoding with Adaptive Draft
Length" (ICLR). Vanilla draft-then-verify leaves the target idle while the
draft model drafts and the draft idle while the target verifies. PEARL runs
both at once, in one of two modes per row:

* **pre-verify** (no pending drafts): the draft model drafts ``y_1 .. y_k``
  from the last token while the target runs a ``T = 1`` forward of that token
  and so verifies ``y_1`` as soon as it exists. A rejection costs one target
  forward and emits the target's correction (the other drafts are dropped,
  nothing was waited for); an acceptance emits ``y_1`` and keeps
  ``y_2 .. y_k`` as the next window (switch to post-verify).
* **post-verify** (a window ``w_1 .. w_{k-1}`` pending): the target verifies the
  window (``T = k`` forward of ``[last, w_1 .. w_{k-1}]``) while the draft model
  keeps drafting ``y_1 .. y_k`` *after* ``w_{k-1}``. If a window token is
  rejected, the accepted prefix and the correction are emitted, the new drafts
  are dropped and the row returns to pre-verify. If the whole window is
  accepted, the target's distribution after ``w_{k-1}`` (which vanilla
  decoding would spend on a bonus token) verifies ``y_1`` -- a pre-verify of
  the next window for free -- and the row stays in post-verify when ``y_1``
  passes.

The draft length therefore adapts by itself: a well-aligned draft runs in
post-verify and emits up to ``k`` tokens per target forward, a poorly aligned
one falls back to pre-verify and wastes no target time on long rejected
chains. Every token is checked by the ordinary chain rule (greedy: the target's
argmax; sampling: Leviathan et al.'s accept / residual rule) against the
target's distribution given the true prefix, and each draft token was drawn
from the draft's law given that same prefix, so the output law is the
target's.

On one device "in parallel" means one jitted step containing both the draft
loop and the target forward, so a step costs their *sum*; the wall-clock gain
of the paper needs the two on separate devices (or streams). ``calls``
(target forwards) and ``τ`` are reported as for any decoder; the state counts
post-verify steps (``PearlState.post_steps``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.model.transformer import Model
from decodax.speculative.decoder import _draft_context
from decodax.speculative.draft_model import DraftState, draft_model_drafter
from decodax.speculative.tree_decoder import drafter_prefill
from decodax.speculative.verify import verify_greedy, verify_sampling

__all__ = ["PearlState", "pearl"]


class PearlState(NamedTuple):
    """PEARL's per-row state (``DecodeState.extra``).

    ``draft``: the draft model's KV cache; ``window [B, k - 1]`` (and its draft
    probabilities, ``None`` when greedy): drafts awaiting verification by a
    post-verify row; ``post``: the row is in post-verify mode;
    ``post_steps``: post-verify steps taken so far.
    """

    draft: DraftState
    window: Int[Array, "B W"]
    window_probs: Float[Array, "B W V"] | None
    post: Bool[Array, " B"]
    post_steps: Int[Array, " B"]


def pearl(target_model: Model, draft_model: Model, *, k: int, sampler: sampling.Sampler | None = None,
          draft_params: str | Callable[[Any], Any] = "draft", verifier=None) -> Decoder:
    """PEARL (Liu et al. 2025): draft-model speculative decoding with pre-verify and
    post-verify, both branches of a step inside one jitted function (module docstring).

    ``k >= 2``: tokens the draft model drafts per step (PEARL's γ); a post-verify
    step emits at most ``k`` tokens. ``draft_params``: where the draft's params
    are in the params given to ``generate`` (as :func:`draft_model_drafter`).
    ``verifier`` replaces the sampling verifier (negative controls in tests).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"pearl: draft length k must be an int >= 2 (k = 1 never leaves pre-verify), got {k!r}")
    drafter = draft_model_drafter(target_model, draft_model, draft_params=draft_params)
    return _pearl(target_model, drafter, k, sampler or sampling.make_sampler(temperature=0.0), verifier)


@functools.lru_cache(maxsize=32)
def _pearl(model: Model, drafter, k: int, sampler: sampling.Sampler, verifier) -> Decoder:
    greedy = sampler.is_greedy
    verify_fn = verifier or verify_sampling
    m = k - 1  # window length of a post-verify row

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        state = drafter_prefill(model, drafter, params, prompt, prompt_len, key, sampler=sampler,
                                max_new_tokens=max_new_tokens, capacity=capacity, max_step_tokens=k)
        b = prompt.shape[0]
        probs = None if greedy else jnp.zeros((b, m, model.config.vocab_size), jnp.float32)
        extra = PearlState(state.extra, jnp.zeros((b, m), jnp.int32), probs, jnp.zeros((b,), bool),
                           jnp.zeros((b,), jnp.int32))
        return dataclasses.replace(state, extra=extra)

    def verify(w, params, state, chain, chain_probs, n_real, key):
        """Score ``[last, chain_1 .. chain_{w-1}]`` (``T = w``) and verify ``chain[:, :w]``;
        the target has no distribution past ``chain_w``, so a dummy bonus position is
        appended and never used (a row whose ``n_real`` chain tokens all pass emits no
        correction)."""
        drafts = chain[:, :w]
        tokens = jnp.concatenate([state.last_token[:, None], drafts[:, : w - 1]], axis=1)
        positions = state.cache.length[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
        out = model.apply(params, tokens, positions, state.cache)
        logits = jnp.concatenate([out.logits, out.logits[:, -1:]], axis=1)  # [B, w + 1, V]
        if sampler.needs_context:
            ctx, mask = context_of(state)
            full, cmask = _draft_context(ctx, mask, drafts)
            target = (sampling.process if greedy else sampling.probs)(sampler, logits, full, cmask)
        else:
            target = logits if greedy else sampling.probs(sampler, logits)
        if greedy:
            accepted, nxt = verify_greedy(drafts, target)
        else:
            accepted, nxt = verify_fn(drafts, chain_probs[:, :w], target, key)
        return jnp.minimum(accepted, jnp.minimum(n_real, w)), nxt.astype(jnp.int32), out.cache

    def step(params, state: DecodeState) -> DecodeState:
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        ps: PearlState = state.extra
        active = ~state.done
        # Draft y_1 .. y_k after the row's pending window (none in pre-verify): the drafter
        # sees the window as emitted context and its cache is rolled back to match.
        wlen = jnp.where(ps.post, m, 0)
        view = emit(state, ps.window, wlen)
        dcache = kv.rollback(ps.draft.cache, state.cache.length + wlen - 1)
        prop = drafter.propose(params, view, DraftState(dcache), k_draft, k=k, sampler=sampler)
        y = prop.tokens
        # The chain verified now: post-verify [w_1 .. w_{k-1}, y_1] (k tokens), pre-verify [y_1].
        post = ps.post[:, None]
        chain = jnp.where(post, jnp.concatenate([ps.window, y[:, :1]], axis=1), y)
        chain_probs = None
        if not greedy:
            chain_probs = jnp.where(post[..., None], jnp.concatenate([ps.window_probs, prop.probs[:, :1]], axis=1),
                                    prop.probs)
        n_real = jnp.where(ps.post, k, 1)
        any_post = jnp.any(ps.post & active)
        args = (params, state, chain, chain_probs, n_real, k_verify)
        accepted, nxt, cache = jax.lax.cond(any_post, functools.partial(verify, k), functools.partial(verify, 1),
                                            *args)
        full = accepted >= n_real
        count = jnp.where(full, n_real, accepted + 1)
        at = jnp.arange(k)[None, :] == accepted[:, None]
        new = jnp.where(at & ~full[:, None], nxt[:, None], chain)  # accepted prefix, then the correction
        state = dataclasses.replace(state, cache=kv.commit(cache, jnp.where(active, count, 0)), key=key,
                                    calls=state.calls + active)
        state = emit(state, new, count)
        keep = full & active  # y_1 passed: y_2 .. y_k are the next window
        extra = PearlState(
            draft=prop.dstate,
            window=jnp.where(keep[:, None], y[:, 1:], ps.window),
            window_probs=None if greedy else jnp.where(keep[:, None, None], prop.probs[:, 1:], ps.window_probs),
            post=jnp.where(active, keep, ps.post),
            post_steps=ps.post_steps + (ps.post & active),
        )
        return dataclasses.replace(state, extra=extra)

    return Decoder(init=init, step=step, model=model, max_step_tokens=k,
                   name=f"pearl[{drafter.name}, k={k}]")
