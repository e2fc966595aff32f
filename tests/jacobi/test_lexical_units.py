"""Lexical Unit Decoding (LUD) on tiny random models.

* the decoder equals a from-scratch re-implementation of the rule (a full forward of
  ``prompt + emitted + [PAD] x k`` per step, keep ``y_1`` and the confident,
  non-repeating placeholder guesses after it);
* with a threshold nothing passes it is exactly greedy decoding, one token a step;
* unit marking, example construction and the fine-tuning loss; a short fine-tuning
  run on the model's own greedy text makes LUD emit more tokens per forward;
* ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decodax.decoding import autoregressive, generate
from decodax.jacobi.lexical_units import lexical_unit_decoding, lexical_units, lud_examples, lud_loss
from decodax.model.cache import init_cache
from decodax.train import create_state, make_train_step
from jacobi.test_consistency import _is_sub, _model
from speculative.test_decoder import PROMPTS
from speculative.test_draft_model import tiny  # noqa: F401 (fixture)

N = 20
PAD = 96


def reference(model, params, prompt, k, alpha, new_tokens):
    width = len(prompt) + new_tokens + k + 2
    forward = jax.jit(lambda seq: jax.nn.softmax(model.apply(
        params, seq[None], jnp.arange(width)[None], init_cache(model.config, 1, width), empty_cache=True).logits[0]))
    out, calls = [], 0
    while len(out) < new_tokens:
        seq = prompt + out
        p = np.asarray(forward(jnp.asarray(seq + [PAD] * k + [0] * (width - len(seq) - k))))
        calls += 1
        if not out:  # the prefill emits one greedy token
            out.append(int(p[len(seq) - 1].argmax()))
            continue
        rows = p[len(seq) - 1:len(seq) + k]
        guess, conf = rows.argmax(-1), rows.max(-1)
        take = 1
        while take <= k and conf[take] > alpha and guess[take] != guess[take - 1]:
            take += 1
        out += [int(g) for g in guess[:take]]
    return out[:new_tokens], calls


@pytest.mark.parametrize("alpha", [0.02, 0.2])
def test_lud_equals_the_brute_force_rule(tiny, alpha):
    model, params = tiny
    got = generate(lexical_unit_decoding(model, k=3, alpha=alpha, pad_id=PAD), params, PROMPTS[:2], max_new_tokens=N)
    for b, prompt in enumerate(PROMPTS[:2]):
        ref, calls = reference(model, params, prompt, 3, alpha, N)
        assert got.rows()[b] == ref, (b, alpha)
        assert int(got.calls[b]) == calls


def test_unreachable_threshold_is_greedy(tiny):
    model, params = tiny
    ref = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    got = generate(lexical_unit_decoding(model, k=3, alpha=0.999999, pad_id=PAD), params, PROMPTS, max_new_tokens=N)
    assert got.rows() == ref.rows() and np.array_equal(got.calls, ref.calls)


def test_unit_marking():
    probs = np.asarray([0.1, 0.95, 0.99, 0.2, 0.97, 0.98, 0.99, 0.96])
    assert lexical_units(probs, alpha=0.9, max_len=3) == [(0, 3), (3, 3), (6, 2)]
    assert lexical_units(probs, alpha=0.999, max_len=3) == [(i, 1) for i in range(8)]


def test_examples_and_fine_tuning_raise_tokens_per_forward():
    model, params = _model()
    k, c, new = 3, 12, 24
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=new).rows()
    seqs = [p + g for p, g in zip(PROMPTS, greedy)]
    ex, stats = lud_examples(model, params, seqs, [len(p) for p in PROMPTS], k=k, alpha=0.1, pad_id=PAD, context=c)
    assert stats["multi_token_units"] >= 1 and ex.tokens.shape[1] == c + k
    for e in range(len(ex.pad)):  # context then placeholders; labels continue the context in some sequence
        assert np.all(ex.tokens[e, c:] == PAD)
        ctx = ex.tokens[e, ex.pad[e]:c].tolist()
        unit = ex.labels[e, ex.weights[e] > 0].tolist()
        assert len(unit) >= 2 and any(_is_sub(ctx + unit, s) for s in seqs)
    batch = {f: jnp.asarray(v) for f, v in ex._asdict().items()}
    dec = lexical_unit_decoding(model, k=k, alpha=0.3, pad_id=PAD)
    before = generate(dec, params, PROMPTS, max_new_tokens=new)
    step = jax.jit(make_train_step(lud_loss(model, context=c)))
    state = create_state(params, optax.adam(3e-3), jax.random.key(0))
    first = None
    for _ in range(100):
        state, m = step(state, batch)
        first = first if first is not None else float(m["unit"])
    after = generate(dec, state.params, PROMPTS, max_new_tokens=new)
    print(f"unit loss {first:.3f} -> {float(m['unit']):.3f}; tokens/forward {before.tau.mean():.2f} -> "
          f"{after.tau.mean():.2f}")
    assert float(m["unit"]) < 0.5 * first and after.tau.mean() > before.tau.mean()


def test_bad_arguments(tiny):
    model, params = tiny
    for kw in (dict(k=0, alpha=0.5, pad_id=0), dict(k=2, alpha=1.0, pad_id=0), dict(k=2, alpha=0.0, pad_id=0),
               dict(k=2, alpha=0.5, pad_id=97), dict(k=2, alpha=0.5, pad_id=-1)):
        with pytest.raises(ValueError, match="lexical_unit_decoding"):
            lexical_unit_decoding(model, **kw)
    with pytest.raises(ValueError, match="alpha"):
        lexical_units(np.ones(3), alpha=1.5, max_len=2)
    with pytest.raises(ValueError, match="no lexical unit"):
        lud_examples(model, params, [[1, 2, 3, 4]], [1], k=2, alpha=0.999999, pad_id=PAD, context=4)
