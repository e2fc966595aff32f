"""DEL (dynamic exit layer): the TPL rule, greedy identity, exact sampling law, statistics.

* ``tpl_choice`` against a brute-force evaluation of DEL's token-per-layer formula;
* greedy DEL (variable verify widths) is token-identical to greedy decoding on a
  ragged batch, and its shadow-token statistics move (the chosen layer / γ change);
* sampling: the law of the first three tokens of a tiny model (vocab 8) equals the
  exact target law (chi-square, 1e5 rows); the accept-all verifier must fail;
* a drafter that cuts its drafts short (``length < k``) never has filler accepted.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speculative.test_decoder import PROMPTS, REPETITIVE, _accept_all, _ar, tiny  # noqa: F401 (fixture)
from speculative.test_tree_decoder import SAMPLER, chi2_p, counts_of, exact_law, tiny8  # noqa: F401 (fixture)

from decodax.decoding import generate
from decodax.decoding.driver import pad_prompts
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.decoder import speculative
from decodax.speculative.drafters import Drafter, early_exit_drafter
from decodax.speculative.dynamic_exit import dynamic_exit_drafter, tpl_choice


def test_tpl_choice_is_the_argmax_of_tokens_per_layer():
    layers, n_layers, k = (2, 4, 6), 12, 4
    cost = (1.0, 1.1, 1.2, 1.4, 1.6)
    rng = np.random.default_rng(0)
    for _ in range(50):
        alpha = rng.uniform(0, 1, size=3) ** rng.uniform(0.2, 3)
        best, arg = 1.0 / n_layers, (None, 0)
        for (i, l), g in itertools.product(enumerate(layers), range(1, k + 1)):
            tpl = sum(alpha[i] ** j for j in range(g + 1)) / (g * l + n_layers * cost[g])
            if tpl > best + 1e-9:
                best, arg = tpl, (i, g)
        i, g = tpl_choice(jnp.asarray(alpha, jnp.float32), layers, n_layers, k, cost)
        assert int(g) == arg[1] and (arg[1] == 0 or int(i) == arg[0]), (alpha, arg, int(i), int(g))
    # a perfect shallow layer drafts the longest chain; a useless one drafts nothing
    assert [int(x) for x in tpl_choice(jnp.array([1.0, 1.0, 1.0]), layers, n_layers, k, cost)] == [0, k]
    assert int(tpl_choice(jnp.array([0.0, 0.0, 0.0]), layers, n_layers, k, cost)[1]) == 0


def graded_model():
    """A tiny model whose layers matter: its 2-D weights scaled x8, so the shallow exits agree with the
    full model on ~12% / 35% / 52% of tokens (at the default init every exit agrees ~95%)."""
    model = Model(tiny_config(vocab_size=97, n_layers=4, eos_ids=()))
    params = model.init(jax.random.key(3))
    layers = [jax.tree.map(lambda w: w * 8 if w.ndim == 2 else w, lp) for lp in params["layers"]]
    return model, dict(params, layers=layers)


def test_greedy_del_equals_autoregressive_and_adapts():
    model, params = graded_model()
    k = 3
    drafter = dynamic_exit_drafter(model, (1, 2, 3), k=k, prior=(0.9, 1.0))
    dec = speculative(model, drafter, k=k, widths=(1, 2, 3))
    for prompts in (PROMPTS, REPETITIVE):
        out = generate(dec, params, prompts, max_new_tokens=24)
        assert out.rows() == _ar(model, params, prompts, 24).rows()
        assert np.all(out.tau >= 1.0)
    # step by hand: the statistics move away from the optimistic prior and the choice follows them
    prompt, lengths = pad_prompts(PROMPTS, pad_to=16)
    state = dec.init(params, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(0), max_new_tokens=24,
                     capacity=64)
    step = jax.jit(dec.step)
    choices = []
    for _ in range(8):
        state = step(params, state)
        choices.append((int(state.extra.exit_layer), int(state.extra.gamma)))
    rates = np.asarray(state.extra.hits / state.extra.trials)
    print(f"DEL (layer, gamma) per step: {choices}; rates (rows x layers): {rates.round(2).tolist()}")
    assert not np.allclose(rates, 0.9)
    assert len(set(choices)) > 1


def test_del_sampling_law_is_the_target_law(tiny8):
    model, params = tiny8
    law = exact_law(model, params)
    drafter = dynamic_exit_drafter(model, (1,), k=2, prior=(0.9, 4.0))
    dec = speculative(model, drafter, k=2, sampler=SAMPLER, widths=(1, 2))
    p = chi2_p(counts_of(dec, params), law)
    print(f"DEL sampling: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = speculative(model, drafter, k=2, sampler=SAMPLER, widths=(1, 2), verifier=_accept_all)
    p_bad = chi2_p(counts_of(bad, params, runs=1), law)
    print(f"accept-all control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad


def _short(inner: Drafter, length: int) -> Drafter:
    """The inner drafter's drafts, but claiming only ``length`` of them."""

    def propose(params, state, dstate, key, *, k, sampler):
        p = inner.propose(params, state, dstate, key, k=k, sampler=sampler)
        return p._replace(length=jnp.full_like(p.length, length))

    return Drafter(init=inner.init, propose=propose, update=inner.update, name=f"short{length}",
                   may_be_empty=True)


def test_drafts_past_length_are_never_accepted(tiny):
    model, params = tiny
    # the full model as its own early-exit draft: every draft is right, so only the cut limits tau
    full = early_exit_drafter(model, model.config.n_layers)
    for length, widths in ((1, None), (2, (2, 4)), (0, None)):
        out = generate(speculative(model, _short(full, length), k=4, widths=widths), params, PROMPTS,
                       max_new_tokens=12)
        assert out.rows() == _ar(model, params, PROMPTS, 12).rows()
        # the prefill emits 1 token, every step exactly length + 1 of the remaining 11
        assert out.steps == -(-11 // (length + 1)), (length, out.steps)


def test_bad_arguments():
    model = Model(tiny_config(n_layers=4))
    with pytest.raises(ValueError, match="exit_layers"):
        dynamic_exit_drafter(model, (0, 2))
    with pytest.raises(ValueError, match="exit_layers"):
        dynamic_exit_drafter(model, (4,))
    with pytest.raises(ValueError, match="verify_cost"):
        dynamic_exit_drafter(model, (1, 2), k=2, verify_cost=(1.0, 1.0))
    with pytest.raises(ValueError, match="widths"):
        speculative(model, dynamic_exit_drafter(model, (1,), k=2), k=2, widths=(1,))
    with pytest.raises(ValueError, match="chain decoder"):
        from decodax.speculative.tree_decoder import tree_speculative
        from decodax.speculative.trees import chain_tree

        tree_speculative(model, dynamic_exit_drafter(model, (1,), k=2), template=chain_tree(2))


def test_registered_del_method():
    from decodax.methods import make_decoder

    model = Model(tiny_config(vocab_size=97, n_layers=5, eos_ids=()))
    params = model.init(jax.random.key(5))
    dec = make_decoder("del", model, params)
    assert generate(dec, params, PROMPTS, max_new_tokens=12).rows() == _ar(model, params, PROMPTS, 12).rows()
