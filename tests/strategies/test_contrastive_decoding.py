"""Contrastive decoding (Li et al. 2023) and USCD on tiny random models.

* with a separate amateur (its own params and KV cache) and with an early-exit amateur (a
  2-layer expert's first layer) it equals a brute-force re-implementation (full forwards of
  every context, the plausibility cut-off and the score in float64), and the cut-off changed
  the choice at some step;
* USCD (the expert on a lame prompt) equals greedy decoding when its uncertainty threshold is
  never reached, brute-force contrastive decoding against the lame prompt when always
  reached, and the brute-force gated rule in between;
* deterministic given the key (greedy and sampling); ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS, ROWS, WIDTH

from decodax.decoding import autoregressive, generate
from decodax.model.cache import init_cache
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.sampling import make_sampler
from decodax.strategies import contrastive_decoding, uscd, with_lame_prompts

ALPHA = 0.1
LAME = [[88, 41, 5, 17], [7, 6], [5, 42]]  # stand-ins for "the prompts without their examples"


def random_params(model, seed, head_scale=0.2):
    """Params in Model.init's shapes, drawn with numpy (as the conftest's tiny model)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0.0, head_scale if "lm_head" in name else 0.02, leaf.shape).astype(np.float32)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def log_probs_fn(model, params, exit_layer=None):
    """``f(seqs)`` -> the next-token log-probs (float64 [V]) after each full sequence, no cache."""

    @jax.jit
    def run(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(WIDTH), (ROWS, WIDTH))
        out = model.apply(params, tokens, positions, init_cache(model.config, ROWS, WIDTH), empty_cache=True,
                          exit_layer=exit_layer)
        return jax.nn.log_softmax(out.logits, axis=-1)

    def call(seqs):
        tokens = np.zeros((ROWS, WIDTH), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        logp = np.asarray(run(params, jnp.asarray(tokens)), np.float64)
        return [logp[i, len(s) - 1] for i, s in enumerate(seqs)]

    return call


def reference(expert, amateur, prompt, amateur_prompt, alpha, max_new, gate=None):
    """Brute-force contrastive decoding (greedy). ``expert`` / ``amateur``: seqs -> log-probs;
    the amateur sees ``amateur_prompt`` + the emitted tokens. ``gate(p)``: contrast at this
    step (USCD). Returns (tokens, cut-off mattered, gate values)."""
    out, mattered, gates = [], False, []
    while len(out) < max_new:
        lp_e, = expert([list(prompt) + out])
        lp_a, = amateur([list(amateur_prompt) + out])
        p = np.exp(lp_e)
        contrast = True if gate is None else bool(gate(p))
        gates.append(contrast)
        if contrast:
            score = np.where(p >= alpha * p.max(), lp_e - lp_a, -np.inf)
            tok = int(np.argmax(score))
            mattered |= int(np.argmax(lp_e - lp_a)) != tok
        else:
            tok = int(np.argmax(lp_e))
        out.append(tok)
        if tok == EOS:
            break
    return out, mattered, gates


@pytest.fixture(scope="module")
def amateur():
    """A separate, smaller amateur with the tiny expert's vocabulary."""
    model = Model(tiny_config(vocab_size=97, n_layers=1, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32,
                              eos_ids=(EOS,), tie_embeddings=False, name="tiny-amateur"))
    return model, random_params(model, seed=11, head_scale=1.0)


@pytest.fixture(scope="module")
def expert_fn(tiny):
    return log_probs_fn(*tiny)


def test_separate_amateur_equals_brute_force(tiny, amateur, expert_fn):
    model, params = tiny
    am, am_params = amateur
    dec = contrastive_decoding(model, am, alpha=ALPHA)
    both = {**params, "amateur": am_params}
    out = generate(dec, both, PROMPTS, max_new_tokens=N)
    amateur_fn = log_probs_fn(am, am_params)
    mattered = False
    for b, prompt in enumerate(PROMPTS):
        ref, cut, _ = reference(expert_fn, amateur_fn, prompt, prompt, ALPHA, N)
        assert out.rows()[b] == ref, b
        assert int(out.calls[b]) == len(ref), b  # one expert forward per token (prefill included)
        mattered |= cut
    assert mattered  # the plausibility cut-off changed a choice
    again = generate(dec, both, PROMPTS, max_new_tokens=N, key=jax.random.key(5))
    assert again.rows() == out.rows()


def test_early_exit_amateur_equals_brute_force():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(EOS,), tie_embeddings=False, name="tiny2"))
    params = random_params(model, seed=4)
    out = generate(contrastive_decoding(model, exit_layer=1, alpha=ALPHA), params, PROMPTS, max_new_tokens=N)
    expert_fn, exit_fn = log_probs_fn(model, params), log_probs_fn(model, params, exit_layer=1)
    mattered = False
    for b, prompt in enumerate(PROMPTS):
        ref, cut, _ = reference(expert_fn, exit_fn, prompt, prompt, ALPHA, N)
        assert out.rows()[b] == ref, b
        mattered |= cut
    assert mattered


def test_sampling_is_deterministic_given_key(tiny, amateur):
    model, params = tiny
    am, am_params = amateur
    dec = contrastive_decoding(model, am, alpha=ALPHA, sampler=make_sampler(temperature=1.0))
    both = {**params, "amateur": am_params}
    runs = [generate(dec, both, PROMPTS, max_new_tokens=N, key=jax.random.key(s)).rows() for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert runs[2] != runs[0] or runs[3] != runs[0]


def test_uscd(tiny, expert_fn):
    model, params = tiny
    lame_params = with_lame_prompts(model, params, LAME)
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    never = generate(uscd(model, threshold=0.0), lame_params, PROMPTS, max_new_tokens=N)
    assert never.rows() == greedy.rows()  # std(p) > 0: the contrast never applies

    always = generate(uscd(model, threshold=1.0), lame_params, PROMPTS, max_new_tokens=N)
    mid_threshold = 0.0135  # the expert's std(p) here ranges over ~0.009 .. 0.022
    mid = generate(uscd(model, threshold=mid_threshold), lame_params, PROMPTS, max_new_tokens=N)
    gates = []
    for b, prompt in enumerate(PROMPTS):
        ref, _, _ = reference(expert_fn, expert_fn, prompt, LAME[b], ALPHA, N)  # plain CD vs the lame prompt
        assert always.rows()[b] == ref, b
        assert int(always.calls[b]) == len(ref), b
        ref, _, g = reference(expert_fn, expert_fn, prompt, LAME[b], ALPHA, N,
                              gate=lambda p: np.std(p, ddof=1) <= mid_threshold)
        assert mid.rows()[b] == ref, b
        gates += g
    assert any(gates) and not all(gates)  # the threshold selected some steps, not all
    assert always.rows() != greedy.rows()


@pytest.mark.parametrize("kwargs, match", [
    (dict(exit_layer=0, alpha=-0.1), r"alpha must be a float in \[0, 1\]"),
    (dict(exit_layer=0, alpha=1.5), r"alpha must be a float in \[0, 1\]"),
    (dict(exit_layer=0, alpha=float("nan")), r"alpha must be a float in \[0, 1\]"),
    (dict(exit_layer=1), r"exit_layer must be an int in \[1, 0\]"),  # the tiny expert has 1 layer
    (dict(), r"exactly one amateur"),
    (dict(exit_layer=1, lame_prompt=True), r"exactly one amateur"),
    (dict(lame_prompt=True, amateur_temperature=0.0), r"amateur_temperature must be"),
    (dict(lame_prompt=True, uncertainty="variance", threshold=0.1), r"uncertainty must be one of"),
    (dict(lame_prompt=True, uncertainty="std", threshold=-1.0), r"threshold must be a finite float >= 0"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_decoding(tiny[0], **kwargs)


def test_mismatched_amateur_vocabulary_and_missing_inputs(tiny, amateur):
    model, params = tiny
    with pytest.raises(ValueError, match="no 'amateur' entry"):
        generate(contrastive_decoding(model, amateur[0]), params, PROMPTS, max_new_tokens=N)
    other = Model(tiny_config(vocab_size=64, n_layers=1))
    with pytest.raises(ValueError, match=r"amateur's vocabulary \(64\) differs from the expert's \(97\)"):
        contrastive_decoding(model, other)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        with_lame_prompts(model, params, [[3, 97]])
    with pytest.raises(ValueError, match="no lame prompts"):
        generate(uscd(model), params, PROMPTS, max_new_tokens=N)
