"""ADED (Liu et al. 2024) on tiny random models.

* the hashed tri-gram table: counts, eviction, PUCT ranking (exploration of
  rarely drafted candidates);
* greedy: token-identical to ``autoregressive`` on a ragged batch (tied and
  untied tiny models), with accepted multi-token paths;
* sampling: the law of the first three tokens of a vocab-8 model equals the
  exact target law (chi-square over 1e5 rows); ValueErrors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.decoding import autoregressive, generate
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.aded import ADEDState, aded, insert, puct_ranking
from decodax.speculative.token_recycling import tr_template
from decodax.speculative.tree_decoder import tree_speculative

PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7], [42, 42]]


def _empty(b=1, h=16, m=3):
    return ADEDState(jnp.full((b, h, m + 2), -1, jnp.int32), jnp.zeros((b, h, 2, m)))


def _col(*v):
    return jnp.array([list(v)], jnp.int32)


def test_trigram_counts_and_puct_ranking():
    st = _empty()
    # (1, 2) -> 7 three times, -> 5 once, -> 9 twice; a zero weight changes nothing
    st = insert(st, _col(1, 1, 1, 1, 1, 1, 1), _col(2, 2, 2, 2, 2, 2, 2), _col(7, 5, 7, 9, 7, 9, 4),
                jnp.array([[1, 1, 1, 1, 1, 1, 0]], jnp.float32))
    tok, slot, valid = puct_ranking(st, _col(1), _col(2), explore=1.0)
    assert tok[0, 0].tolist() == [7, 9, 5] and bool(valid.all())
    # a full bucket replaces its lowest-count entry
    st2 = insert(st, _col(1), _col(2), _col(4), jnp.ones((1, 1)))
    assert sorted(puct_ranking(st2, _col(1), _col(2), 1.0)[0][0, 0].tolist()) == [4, 7, 9]
    # unknown context: nothing valid
    assert not bool(puct_ranking(st, _col(3), _col(3), 1.0)[2].any())
    # exploration: after many drafts of 7 and 9, the rarely drafted 5 moves up
    stats = st.stats
    for s in slot[0, 0, :2].tolist():  # flat slot = bucket * M + entry
        stats = stats.at[0, s // 3, 1, s % 3].add(50.0)
    st3 = st._replace(stats=stats)
    assert puct_ranking(st3, _col(1), _col(2), explore=1.0)[0][0, 0, 0] == 5
    assert puct_ranking(st3, _col(1), _col(2), explore=0.0)[0][0, 0, 0] == 7  # pure exploitation


def test_greedy_equals_autoregressive():
    """Untied LM head: varied greedy outputs (a tied random tiny model repeats its last token)."""
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(3))
    dec = tree_speculative(model, aded(buckets=256))
    out = generate(dec, params, PROMPTS, max_new_tokens=24)
    ref = generate(autoregressive(model), params, PROMPTS, max_new_tokens=24)
    assert out.rows() == ref.rows()
    assert out.tokens.max() < 97 and np.all(out.tau >= 1.0)
    print(f"tau {out.tau.tolist()}")
    assert out.tau.mean() > 1.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of 2"):
        aded(buckets=100)
    with pytest.raises(ValueError, match="top_m"):
        aded(top_m=0)
    with pytest.raises(ValueError, match="ranks"):
        aded(top_m=2, template=tr_template(20, width=4))
    with pytest.raises(ValueError, match="explore"):
        aded(explore=-1.0)
    with pytest.raises(ValueError, match="TreeTemplate"):
        aded(template=[-1, 0])


def test_sampling_law_is_the_target_law():
    path = Path(__file__).with_name("test_tree_decoder.py")  # shared law / chi-square helpers
    spec = importlib.util.spec_from_file_location("_tree_law", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    model = Model(tiny_config(vocab_size=base.V, n_layers=2, n_kv_heads=1, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(11))
    params["lm_head"] = params["lm_head"] * 15.0
    law = base.exact_law(model, params)
    drafter = aded(buckets=16, top_m=3, template=tr_template(12, width=3, max_depth=3))
    dec = tree_speculative(model, drafter, sampler=base.SAMPLER)
    p = base.chi2_p(base.counts_of(dec, params), law)
    print(f"aded: chi-square p = {p:.3g}")
    assert p > 1e-3, p
