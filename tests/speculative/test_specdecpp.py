"""SpecDec++ stopping (acceptance head) and the distilled draft model, on tiny random models.

* the stop rule: threshold ~0 stops after one draft (2 tokens per step with a perfect
  draft), a head that is sure of acceptance never stops (k + 1 per step);
* greedy with a random head (ragged draft lengths) is token-identical to greedy
  decoding, and the draft cache invariant holds after every step;
* sampling with stopping: the law of the first three tokens (vocab 8) equals the exact
  target law (chi-square, 1e5 rows); the accept-all verifier must fail;
* the weighted BCE trains a head that separates accepted from rejected states, and
  up-weighting rejections lowers the predicted acceptance;
* knowledge distillation raises the draft's agreement with the teacher; orbax save /
  load round-trips; a missing or corrupt checkpoint names the file.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speculative.test_decoder import _accept_all
from speculative.test_draft_model import RAGGED, _ar, _counts, _noisy, tiny, tiny8  # noqa: F401 (fixtures)
from speculative.test_tree_decoder import SAMPLER, chi2_p, exact_law

from decodax import sampling
from decodax.decoding import generate
from decodax.decoding.driver import pad_prompts
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.decoder import speculative
from decodax.speculative.distill import draft_init, kd_loss, load_draft, save_draft, teacher_topk
from decodax.speculative.draft_model import draft_model_drafter, with_draft_params
from decodax.speculative.specdecpp import acceptance_logit, acceptance_loss, init_acceptance_head
from decodax.train import create_state, epoch_batches, frozen_base_optimizer, make_train_step

K, N = 4, 21


def _with_head(dparams, dim, bias=0.0, scale=1.0, seed=5):
    head = init_acceptance_head(jax.random.key(seed), dim, hidden=16)
    head["w_out"] = scale * jax.random.normal(jax.random.key(seed + 1), head["w_out"].shape)
    head["b_out"] = jnp.asarray(bias, jnp.float32)
    return {**dparams, "acceptance": head}


def test_threshold_extremes(tiny):
    model, params = tiny
    for bias, h, per_step in ((0.0, 1e-6, 2), (30.0, 0.5, K + 1)):
        drafter = draft_model_drafter(model, model, stop_threshold=h)
        dec = speculative(model, drafter, k=K, widths=(1, 2, K))
        out = generate(dec, with_draft_params(params, _with_head(params, model.config.dim, bias, 0.0)), RAGGED,
                       max_new_tokens=N)
        assert out.rows() == _ar(model, params, RAGGED, N).rows()
        assert np.all(out.calls == 1 + math.ceil((N - 1) / per_step)), (h, out.calls)


def test_greedy_ragged_stops_equal_autoregressive_and_keep_the_cache_invariant(tiny):
    model, params = tiny
    dparams = _with_head(_noisy(params), model.config.dim, bias=1.0, scale=3.0)
    both = with_draft_params(params, dparams)
    drafter = draft_model_drafter(model, model, stop_threshold=0.6)
    dec = speculative(model, drafter, k=K, widths=(1, 2, 3, K))
    out = generate(dec, both, RAGGED, max_new_tokens=N)
    assert out.rows() == _ar(model, params, RAGGED, N).rows()
    print(f"specdec++ random head: calls {out.calls.tolist()}")
    # step by hand: draft lengths vary, and the draft cache equals a fresh prefill of the context
    prompt, plen = pad_prompts(RAGGED, pad_to=8)
    state = dec.init(both, jnp.asarray(prompt), jnp.asarray(plen), jax.random.key(0), max_new_tokens=32,
                     capacity=128)
    greedy = sampling.make_sampler(temperature=0.0)
    step = jax.jit(dec.step)
    propose = jax.jit(lambda p, s: drafter.propose(p, s, s.extra, jax.random.key(0), k=K, sampler=greedy).length)
    width = 64
    ref_cache = jax.jit(lambda seq: model.apply(dparams, seq, jnp.arange(width)[None], kv.init_cache(
        model.config, 1, width), empty_cache=True, compute_logits=False).cache)
    lengths = set()
    for _ in range(4):
        lengths |= set(np.asarray(propose(both, state)).tolist())
        state = step(both, state)
        dcache = state.extra.cache
        for b in range(len(RAGGED)):
            n = int(state.num_generated[b])
            seq = list(prompt[b, : plen[b]]) + list(np.asarray(state.tokens[b, :n]))
            t = len(seq) - 1
            ref = ref_cache(jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
            np.testing.assert_allclose(np.asarray(dcache.k[:, b, :, : t - 1]), np.asarray(ref.k[:, 0, :, : t - 1]),
                                       atol=1e-5)
    print(f"draft lengths seen: {sorted(lengths)}")
    assert len(lengths) >= 2


def test_sampling_law_with_stops_is_the_target_law(tiny8):
    model, params, draft, dparams = tiny8
    law = exact_law(model, params)
    both = with_draft_params(params, _with_head(dparams, draft.config.dim, bias=0.5, scale=2.0))
    drafter = draft_model_drafter(model, draft, stop_threshold=0.5)
    dec = speculative(model, drafter, k=2, sampler=SAMPLER, widths=(1, 2))
    p = chi2_p(_counts(dec, both), law)
    print(f"specdec++ sampling: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = speculative(model, drafter, k=2, sampler=SAMPLER, widths=(1, 2), verifier=_accept_all)
    p_bad = chi2_p(_counts(bad, both, runs=1), law)
    print(f"accept-all control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad


def test_weighted_acceptance_loss_learns_and_reweights():
    rng = np.random.default_rng(0)
    d, n = 8, 512
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    accept = ((hidden[:, 0] + 0.3 * rng.normal(size=n)) > -0.5).astype(np.float32)  # ~70% accepted
    data = {"hidden": hidden, "accept": accept, "mask": np.ones(n, np.float32)}
    preds = {}
    for w_reject in (1.0, 4.0):
        state = create_state({"acceptance": init_acceptance_head(jax.random.key(0), d, 16)},
                             frozen_base_optimizer(3e-2, 150), jax.random.key(0))
        step = jax.jit(make_train_step(acceptance_loss(1.0, w_reject)))
        batches = epoch_batches(data, 128)
        for i in range(150):
            state, m = step(state, batches(i))
        p = jax.nn.sigmoid(acceptance_logit(state.params["acceptance"], jnp.asarray(hidden)))
        preds[w_reject] = float(p.mean())
        acc = float(jnp.mean((p > 0.5) == (accept > 0.5)))
        print(f"w_reject={w_reject}: accuracy {acc:.3f}, mean p {preds[w_reject]:.3f} (rate {accept.mean():.3f})")
        assert acc > 0.85
    assert preds[4.0] < preds[1.0] - 0.02


def test_distillation_raises_agreement_and_checkpoints_round_trip(tmp_path):
    target = Model(tiny_config(vocab_size=61, n_layers=3, eos_ids=()))
    tparams = target.init(jax.random.key(2))
    tparams["layers"] = [jax.tree.map(lambda w: w * 6 if w.ndim == 2 else w, lp) for lp in tparams["layers"]]
    tokens = jax.random.randint(jax.random.key(3), (16, 24), 0, 61)
    ids, logp = teacher_topk(target, tparams, tokens, k=8)
    data = {"tokens": np.asarray(tokens), "mask": np.ones((16, 24), np.float32), "teacher_ids": np.asarray(ids),
            "teacher_logp": np.asarray(logp)}
    from decodax.speculative.draft_model import first_layers_model

    draft = first_layers_model(target, 1)
    loss = kd_loss(draft)
    state = create_state({"draft": draft_init(tparams, 1), "base": {"embed": tparams["embed"]}},
                         frozen_base_optimizer(1e-2, 80), jax.random.key(0))
    step = jax.jit(make_train_step(loss))
    _, before = jax.jit(loss)(state.params, {k: jnp.asarray(v) for k, v in data.items()}, None)
    batches = epoch_batches(data, 8)
    for i in range(80):
        state, _ = step(state, batches(i))
    _, after = jax.jit(loss)(state.params, {k: jnp.asarray(v) for k, v in data.items()}, None)
    print(f"distillation: agreement {float(before['agree']):.3f} -> {float(after['agree']):.3f}, "
          f"kl {float(before['kl']):.3f} -> {float(after['kl']):.3f}")
    assert float(after["agree"]) > float(before["agree"]) + 0.1 and float(after["kl"]) < float(before["kl"])
    assert np.array_equal(np.asarray(state.params["base"]["embed"]), np.asarray(tparams["embed"]))  # frozen
    # save / load
    trained = {**state.params["draft"], "acceptance": init_acceptance_head(jax.random.key(1), target.config.dim)}
    save_draft(tmp_path / "d", trained, info={"steps": 80})
    dmodel, dparams, cfg = load_draft(tmp_path / "d", target, tparams)
    assert dmodel.config.n_layers == 1 and cfg["steps"] == 80
    for a, b in zip(jax.tree.leaves(dparams["layers"]), jax.tree.leaves(trained["layers"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "acceptance" in dparams and dparams["embed"] is tparams["embed"]
    # missing / corrupt files are named
    with pytest.raises(FileNotFoundError, match="draft.json"):
        load_draft(tmp_path / "nothing", target, tparams)
    for root, _, files in os.walk(tmp_path / "d" / "params"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(ValueError, match="params"):
        load_draft(tmp_path / "d", target, tparams)


def test_bad_arguments(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="stop_threshold"):
        draft_model_drafter(model, model, stop_threshold=1.5)
    dec = speculative(model, draft_model_drafter(model, model, stop_threshold=0.5), k=2)
    with pytest.raises(ValueError, match="acceptance head"):
        generate(dec, with_draft_params(params, params), RAGGED[:1], max_new_tokens=4)


def test_registered_methods_load_the_checkpoint(tiny, tmp_path, monkeypatch):
    """``distilled`` / ``specdec++`` / ``pearl`` read ``$DECODAX_HEADS_DIR/distilled``; a missing one is named."""
    from decodax.methods import HEADS_DIR_ENV, make_decoder, method_params

    model, params = tiny
    monkeypatch.setenv(HEADS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="draft.json"):
        method_params("distilled", model, params)
    trained = {**draft_init(_noisy(params), 1), "acceptance": _with_head({}, model.config.dim, 1.0, 3.0)["acceptance"]}
    save_draft(tmp_path / "distilled", trained, info={"stop_threshold": 0.6, "k": 3, "acceptance_hidden": 16})
    for name in ("distilled", "specdec++", "pearl"):
        dec = make_decoder(name, model, params)
        out = generate(dec, method_params(name, model, params), RAGGED, max_new_tokens=12)
        assert out.rows() == _ar(model, params, RAGGED, 12).rows(), name
