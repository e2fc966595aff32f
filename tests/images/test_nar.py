"""decodax.images.nar (Neighboring Autoregressive Modeling): the near-to-far mask hides farther
tokens, sampling equals a placeholder-free reference draw for draw and follows the exact NAR
law (chi-square; a wrong head rule is caught), h + w - 1 forwards per grid, training lowers the
loss, bad inputs raise, save / load."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decodax import sampling
from decodax.images import (ImageLayout, ImageModel, image_model, load_nar_model, nar_logits, nar_mask, nar_params,
                            sample_nar, save_image_model, save_nar_model, train_nar_model)
from decodax.model.cache import init_cache
from images.test_ar import LAYOUT, class_pattern_data

K = 3  # codes of the law tests; 2 classes; every layout below shares one vocabulary (K + 2 + 1)
SAMPLER = sampling.make_sampler(temperature=0.8, top_k=2)


def _layout(h: int, w: int) -> ImageLayout:
    return ImageLayout(codebook_size=K, n_classes=2, height=h, width=w)


def _dist(layout: ImageLayout) -> np.ndarray:
    """Distance of every sequence position (prefix: -1)."""
    i, j = np.divmod(np.arange(layout.num_codes), layout.width)
    return np.concatenate([[-1, -1], i + j])


@pytest.fixture(scope="module")
def law_model():
    """A tiny random model with large weights, so both heads are sharp, differ, and depend on context."""
    model = image_model(_layout(2, 2), dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    params = nar_params(model, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [jax.random.normal(k, x.shape) * 0.4 if x.ndim == 2 else x for k, x in zip(keys, leaves)]
    return model, jax.tree.unflatten(tree, leaves)


_heads = jax.jit(lambda model, layout, params, tokens: jnp.stack(nar_logits(model, layout, params, tokens))[..., :K],
                 static_argnums=(0, 1))


def test_mask_hides_farther_tokens_and_shows_same_distance(law_model):
    model, params = law_model
    layout = _layout(3, 4)
    dist = _dist(layout)
    assert nar_mask(layout)[:2].tolist() == [[True] + [False] * 13, [True, True] + [False] * 12]
    rng = np.random.default_rng(0)
    base = layout.sequences(rng.integers(0, K, (4, 3, 4)), [0, 1, 1, 0])[0]
    ref = np.asarray(_heads(model, layout, params, base))  # [head, B, T, K]
    for d in range(layout.height + layout.width - 1):
        far = base.copy()
        far[:, dist > d] = (far[:, dist > d] + rng.integers(1, K, far[:, dist > d].shape)) % K  # all changed
        got = np.asarray(_heads(model, layout, params, far))
        assert np.array_equal(got[:, :, dist <= d], ref[:, :, dist <= d]), d  # never read by nearer positions
        assert d == dist.max() or np.abs(got - ref).max() > 1e-3  # ...but read by the farther ones
        cells = np.flatnonzero(dist == d)
        one = base.copy()
        one[:, cells[0]] = (one[:, cells[0]] + 1) % K
        diff = np.abs(np.asarray(_heads(model, layout, params, one)) - ref).max(axis=(0, 1, 3))  # per position
        assert np.all(diff[dist < d] == 0) and diff[cells[0]] > 1e-3
        if len(cells) > 1:  # tokens of one distance are inputs of one step: they see each other
            assert diff[cells[1:]].min() > 1e-3, d


def _reference(model, layout, params, labels, key, sampler):
    """NAR sampling without placeholders: the hidden state at each cell's source comes from a
    forward over the prefix and only the generated tokens of distance <= the source's, and each
    step draws with the key sample_nar documents (batch 0, step d)."""
    dist = _dist(layout)[2:]
    prompts = layout.prompts(labels)
    b, w = len(labels), layout.width
    grid = np.full((b, layout.num_codes), -1)
    for d in range(layout.height + layout.width - 1):
        rows = np.zeros((b, layout.num_codes, layout.vocab_size), np.float32)
        for c in np.flatnonzero(dist == d):
            i, j = divmod(c, w)
            src, head = (None, "lm_head") if c == 0 else (c - 1, "lm_head") if j > 0 else (c - w, "lm_head_v")
            keep = np.zeros(0, int) if src is None else np.flatnonzero(dist <= dist[src])
            idx = np.concatenate([[0, 1], 2 + keep])
            tokens = np.concatenate([prompts, grid[:, keep]], axis=1)
            assert tokens.min() >= 0  # only generated tokens are read
            mask = np.broadcast_to(nar_mask(layout)[np.ix_(idx, idx)], (b, len(idx), len(idx)))
            positions = np.broadcast_to(idx, tokens.shape)  # raster positions, as sample_nar
            hidden = model.apply(params, tokens, positions, init_cache(model.config, b, len(idx)), mask,
                                 empty_cache=True, compute_logits=False).hidden
            at = 1 if src is None else 2 + int(np.flatnonzero(keep == src)[0])
            rows[:, c] = model.logits({**params, "lm_head": params[head]}, hidden[:, at])
        drawn = np.asarray(sampling.sample_with(sampler, rows, jax.random.fold_in(jax.random.fold_in(key, 0), d)))
        grid[:, dist == d] = drawn[:, dist == d]
    return grid.reshape(b, layout.height, w)


def test_sampling_equals_a_placeholder_free_reference_draw_for_draw(law_model):
    model, params = law_model
    layout = _layout(2, 3)
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    key = jax.random.key(3)
    codes, calls = sample_nar(model, params, layout, labels, key=key, sampler=SAMPLER)
    assert np.array_equal(codes, _reference(model, layout, params, labels, key, SAMPLER))
    assert np.all(calls == 4) and len(np.unique(codes.reshape(8, -1), axis=0)) > 1


def _pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    """Chi-square goodness of fit; bins expected below 5 are pooled; mass on a zero-probability
    outcome is an outright rejection."""
    if np.any(counts[law == 0] > 0):
        return 0.0
    expected = law * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(stats.chi2.sf(np.sum((obs - exp) ** 2 / exp), len(obs) - 1))


def test_sampling_follows_the_exact_nar_law(law_model):
    model, params = law_model
    layout = _layout(2, 2)  # cells (0,0) | (0,1) (1,0) | (1,1): distances 0, 1, 1, 2
    grids = np.array(list(itertools.product(range(K), repeat=4)))  # all 81 grids, raster order
    tokens = layout.sequences(grids.reshape(-1, 2, 2), np.ones(len(grids), int))[0]
    hor, ver = (np.asarray(sampling.probs(SAMPLER, lg)) for lg in nar_logits(model, layout, params, tokens))
    g, r = grids, np.arange(len(grids))

    def law(last_head, last_src):  # sequence positions: class 1, (0,0) 2, (0,1) 3, (1,0) 4, (1,1) 5
        return hor[r, 1, g[:, 0]] * hor[r, 2, g[:, 1]] * ver[r, 2, g[:, 2]] * last_head[r, last_src, g[:, 3]]

    exact, wrong = law(hor, 4), law(ver, 3)  # (1,1) from its left neighbour's horizontal head / upper's vertical
    assert abs(exact.sum() - 1) < 1e-5 and abs(wrong.sum() - 1) < 1e-5 and (exact == 0).sum() > 0
    n = 100_000
    codes, calls = sample_nar(model, params, layout, np.ones(n, int), key=jax.random.key(5), sampler=SAMPLER)
    counts = np.bincount(codes.reshape(n, 4) @ K ** np.arange(3, -1, -1), minlength=len(grids))
    p_exact, p_wrong = _pvalue(counts, exact), _pvalue(counts, wrong)
    print(f"NAR law chi-square p: exact {p_exact:.3g}, vertical-head variant {p_wrong:.3g}")
    assert np.all(calls == 3) and p_exact > 1e-3 and p_wrong < 1e-6


_FORWARDS: list[int] = []


@dataclasses.dataclass(frozen=True)
class _CountingModel(ImageModel):
    """Counts every forward actually executed (a host callback inside the jitted loop)."""

    def apply(self, *args, **kwargs):
        jax.debug.callback(lambda: _FORWARDS.append(1))
        return super().apply(*args, **kwargs)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 1), (2, 3)])
def test_a_grid_takes_h_plus_w_minus_1_forwards(law_model, h, w):
    model, params = law_model
    counting = _CountingModel(model.config, num_codes=K)
    _FORWARDS.clear()
    codes, calls = sample_nar(counting, params, _layout(h, w), [0, 1, 1], key=jax.random.key(0))
    jax.effects_barrier()
    assert len(_FORWARDS) == h + w - 1 and np.all(calls == h + w - 1)
    assert codes.shape == (3, h, w) and codes.min() >= 0 and codes.max() < K


@pytest.fixture(scope="module")
def trained():
    model = image_model(LAYOUT, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    tokens, _ = class_pattern_data()
    params, hist = train_nar_model(model, LAYOUT, tokens, steps=60, batch_size=32, lr=1e-2)
    print(f"NAR loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}")
    return model, params, hist


def test_training_lowers_the_loss_of_both_heads(trained):
    model, params, hist = trained
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], (hist[0]["loss"], hist[-1]["loss"])
    assert hist[-1]["horizontal"] < 0.5 * hist[0]["horizontal"] and hist[-1]["vertical"] < 0.5 * hist[0]["vertical"]
    labels = np.arange(10)
    codes, calls = sample_nar(model, params, LAYOUT, labels, key=jax.random.key(0),
                              sampler=sampling.make_sampler(temperature=0.0), batch_size=4)
    target = (labels[:, None, None] + np.arange(4)) % 16
    print(f"greedy NAR grids matching the class pattern: {np.mean(codes == target):.2f}")
    assert np.all(calls == 7) and np.mean(codes == target) > 0.5


def test_bad_inputs_raise_value_error(trained, tmp_path):
    model, params, _ = trained
    key = jax.random.key(0)
    tokens = LAYOUT.sequences(np.zeros((2, 4, 4), int), [0, 1])[0]
    ar_params = {k: v for k, v in params.items() if k != "lm_head_v"}
    bad = [
        lambda: sample_nar(model, params, LAYOUT, [10], key=key),  # label out of range
        lambda: sample_nar(model, params, LAYOUT, [], key=key),
        lambda: sample_nar(model, params, LAYOUT, [1], key=key, batch_size=0),
        lambda: sample_nar(model, ar_params, LAYOUT, [1], key=key),  # no vertical head
        lambda: sample_nar(model, params, LAYOUT, [1], key=key, sampler=sampling.make_sampler(repetition_penalty=1.2)),
        lambda: sample_nar(model, params, ImageLayout(8, 10, 4, 4), [1], key=key),  # model / layout mismatch
        lambda: sample_nar(model, params, ImageLayout(16, 10, 6, 6), [1], key=key),  # too long for the model
        lambda: train_nar_model(model, LAYOUT, tokens, steps=0, batch_size=2),
        lambda: train_nar_model(model, LAYOUT, tokens, steps=1, batch_size=0),
        lambda: train_nar_model(model, LAYOUT, tokens[:, :-1], steps=1, batch_size=2),
        lambda: train_nar_model(model, LAYOUT, np.where(tokens == 0, 20, tokens), steps=1, batch_size=2),
        lambda: nar_logits(model, LAYOUT, params, tokens[:, 1:]),
    ]
    for i, fn in enumerate(bad):
        with pytest.raises(ValueError):
            fn()
            pytest.fail(f"bad input {i} did not raise")
    save_image_model(tmp_path / "ar", model, LAYOUT, ar_params)
    with pytest.raises(ValueError):
        load_nar_model(tmp_path / "ar")


def test_save_load_roundtrip(trained, tmp_path):
    model, params, _ = trained
    save_nar_model(tmp_path / "m", model, LAYOUT, params, info={"x": 1})
    model2, layout2, params2, info = load_nar_model(tmp_path / "m")
    assert model2 == model and layout2 == LAYOUT and info == {"x": 1, "nar": True}
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
