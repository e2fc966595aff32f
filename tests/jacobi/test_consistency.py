"""CLLM consistency distillation pieces, on tiny random models.

* left-padded logits equal the unpadded sequences' logits;
* collected samples: contexts + fixed points are the greedy output, guesses are the
  windows the decoder fed;
* the loss: zero consistency term when the window is the fixed point, gradients only
  through the intermediate window's branch for that term;
* a short training run on the model's own trajectories raises Jacobi's tokens per
  iteration on those prompts (what CLLM trains for).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decodax.decoding import autoregressive, generate
from decodax.jacobi import RandomInit, RepeatLast, jacobi
from decodax.jacobi.consistency import collect_jacobi_samples, consistency_loss, padded_logits
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.train import create_state, make_train_step

PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7], [42, 42], [1, 2, 3, 4, 1, 2, 3]]


def _model():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(3))
    params["lm_head"] = params["lm_head"] * 10.0
    return model, params


def test_padded_logits_equal_unpadded():
    model, params = _model()
    seqs = [[5, 17, 3, 88, 41], [9, 8, 7]]
    width = 6
    toks = jnp.asarray([[0] * (width - len(s)) + s for s in seqs], jnp.int32)
    pad = jnp.asarray([width - len(s) for s in seqs], jnp.int32)
    got = padded_logits(model, params, toks, pad)
    for b, s in enumerate(seqs):
        t = len(s)
        ref = model.apply(params, jnp.asarray([s]), jnp.arange(t)[None], kv.init_cache(model.config, 1, t),
                          empty_cache=True).logits[0]
        np.testing.assert_allclose(np.asarray(got[b, width - t:]), np.asarray(ref), atol=1e-4)


def test_collected_samples_are_trajectory_states():
    model, params = _model()
    n, new, c = 4, 16, 12
    s = collect_jacobi_samples(model, params, PROMPTS, window=n, max_new_tokens=new, init=RandomInit(97), context=c)
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=new).rows()
    assert s.guess.shape == s.fixed.shape and s.guess.shape[1] == n and len(s.pad) >= len(PROMPTS) * 3
    for i in range(len(s.pad)):
        seq = s.context[i, s.pad[i]:].tolist() + s.fixed[i].tolist()
        assert any(_is_sub(seq, p + g) for p, g in zip(PROMPTS, greedy)), i
    assert np.mean(s.guess == s.fixed) < 1.0  # not all windows were already converged


def _is_sub(short, full):
    return any(full[j:j + len(short)] == short for j in range(len(full) - len(short) + 1))


def test_loss_terms():
    model, params = _model()
    s = collect_jacobi_samples(model, params, PROMPTS, window=4, max_new_tokens=12, init=RandomInit(97), context=12)
    batch = {k: jnp.asarray(v) for k, v in s._asdict().items()}
    loss_fn = jax.jit(consistency_loss(model, ar_weight=0.0))
    loss, m = loss_fn(params, batch, None)
    assert float(m["consistency"]) > 0.0 and float(m["ar"]) > 0.0
    same = dict(batch, guess=batch["fixed"])
    loss0, m0 = loss_fn(params, same, None)
    assert abs(float(m0["consistency"])) < 1e-5
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, same, None)[0]))(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-5  # the teacher branch is stopped


def test_training_on_own_trajectories_raises_tokens_per_iteration():
    model, params = _model()
    n, new = 4, 16
    before = generate(jacobi(model, window=n, init=RepeatLast()), params, PROMPTS, max_new_tokens=new)
    s = collect_jacobi_samples(model, params, PROMPTS, window=n, max_new_tokens=new, init=RepeatLast(), context=16)
    batch = {k: jnp.asarray(v) for k, v in s._asdict().items()}
    step = jax.jit(make_train_step(consistency_loss(model)))
    state = create_state(params, optax.adam(3e-3), jax.random.key(0))
    first = None
    for _ in range(150):
        state, m = step(state, batch)
        first = first if first is not None else float(m["consistency"])
    after = generate(jacobi(model, window=n, init=RepeatLast()), state.params, PROMPTS, max_new_tokens=new)
    print(f"consistency {first:.3f} -> {float(m['consistency']):.3f}; "
          f"tau {before.tau.mean():.2f} -> {after.tau.mean():.2f}")
    assert float(m["consistency"]) < 0.5 * first
    assert after.tau.mean() > before.tau.mean()


def test_mixed_label_supervision():
    """CEED-VLA's mixed labels: a sample takes the reference's labels (teacher-forced on the
    reference prefix) for the AR term exactly when its fixed point departs from the
    reference at more than δ_max of the window."""
    model, params = _model()
    n, new, c = 4, 12, 16
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=new).rows()
    rng = np.random.default_rng(0)
    noise = [rng.integers(1, 97, new).tolist() for _ in PROMPTS]
    s = collect_jacobi_samples(model, params, PROMPTS, window=n, max_new_tokens=new, init=RandomInit(97),
                               context=c, references=noise)
    for i in range(len(s.pad)):  # the truth fields are the reference at the window's offset
        seq = s.truth_context[i, s.truth_pad[i]:].tolist() + s.truth[i].tolist()
        assert any(_is_sub(seq, p + r) for p, r in zip(PROMPTS, noise)), i
    batch = {k: jnp.asarray(v) for k, v in s._asdict().items()}
    plain = jax.jit(consistency_loss(model))(params, batch, None)[1]
    never = jax.jit(consistency_loss(model, mixed_delta=1.0))(params, batch, None)[1]
    mixed = jax.jit(consistency_loss(model, mixed_delta=0.0))
    always = mixed(params, batch, None)[1]
    assert float(never["truth_frac"]) == 0.0 and abs(float(never["ar"]) - float(plain["ar"])) < 1e-5
    assert float(always["truth_frac"]) == 1.0  # random references differ everywhere
    logits = padded_logits(model, params, jnp.concatenate([batch["truth_context"], batch["truth"]], axis=1),
                           batch["truth_pad"])[:, c - 1:c + n - 1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["truth"]).mean()
    assert abs(float(always["ar"]) - float(ce)) < 1e-4
    own = collect_jacobi_samples(model, params, PROMPTS, window=n, max_new_tokens=new, init=RandomInit(97),
                                 context=c, references=greedy)
    m = mixed(params, {k: jnp.asarray(v) for k, v in own._asdict().items()}, None)[1]
    assert float(m["truth_frac"]) == 0.0  # the teacher agrees with a reference that is its own output
    with pytest.raises(ValueError, match="mixed_delta"):
        consistency_loss(model, mixed_delta=1.5)
    with pytest.raises(ValueError, match="references"):
        collect_jacobi_samples(model, params, PROMPTS, window=n, max_new_tokens=new, init=RandomInit(97), context=c,
                               references=noise[:1])
