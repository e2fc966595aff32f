"""decodax.images.ar: the [BOS, class, codes] layout, the code-only logits of ImageModel under
autoregressive and SJD (SpatialInit) sampling, a short training run, save / load."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive
from decodax.images import ImageLayout, image_model, load_image_model, sample_codes, save_image_model, train_image_model
from decodax.jacobi import jacobi
from decodax.jacobi.init import SpatialInit
from decodax.train.losses import logits_of

LAYOUT = ImageLayout(codebook_size=16, n_classes=10, height=4, width=4)


def test_layout_ids_sequences_and_mask():
    assert (LAYOUT.vocab_size, LAYOUT.bos, LAYOUT.seq_len) == (27, 26, 18)
    codes = np.arange(32).reshape(2, 4, 4) % 16
    tokens, mask = LAYOUT.sequences(codes, np.array([3, 9]))
    assert tokens[:, :2].tolist() == [[26, 19], [26, 25]]
    assert np.array_equal(tokens[:, 2:], codes.reshape(2, 16)) and mask[:, :2].sum() == 0 and mask[:, 2:].all()
    for bad in (lambda: LAYOUT.sequences(codes + 16, [0, 1]), lambda: LAYOUT.sequences(codes, [0, 10]),
                lambda: LAYOUT.sequences(codes[:, :3], [0, 1]), lambda: LAYOUT.prompts([[1]]),
                lambda: ImageLayout(0), lambda: image_model(LAYOUT, max_seq_len=10)):
        with pytest.raises(ValueError):
            bad()


def class_pattern_data(n: int = 64):
    """``LAYOUT.sequences`` of ``n`` grids whose columns are set by the class (learnable fast)."""
    labels = np.random.default_rng(0).integers(0, 10, n)
    codes = np.broadcast_to((labels[:, None, None] + np.arange(4)) % 16, (n, 4, 4))
    return LAYOUT.sequences(codes, labels)


@pytest.fixture(scope="module")
def trained():
    model = image_model(LAYOUT, dim=32, n_layers=1, n_heads=2, max_seq_len=64)
    tokens, mask = class_pattern_data()
    params, hist = train_image_model(model, tokens, mask, steps=100, batch_size=32, lr=1e-2)
    print(f"image model loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}")
    return model, params, hist


def test_training_lowers_the_code_loss_and_masks_non_codes(trained):
    model, params, hist = trained
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], (hist[0]["loss"], hist[-1]["loss"])
    lg = np.asarray(logits_of(model, params, np.asarray(LAYOUT.sequences(np.zeros((1, 4, 4), int), [0])[0])))
    assert np.all(np.isneginf(lg[..., 16:])) and np.all(np.isfinite(lg[..., :16]))


def test_sampling_gives_code_grids_with_ar_and_sjd(trained):
    model, params, _ = trained
    sampler = sampling.make_sampler(temperature=1.0, top_k=8)
    labels = np.array([0, 3, 7, 7, 9])
    codes, calls = sample_codes(autoregressive(model, sampler), params, LAYOUT, labels, key=jax.random.key(0),
                                batch_size=3)
    assert codes.shape == (5, 4, 4) and codes.max() < 16 and np.all(calls == 16)
    greedy = sampling.make_sampler(temperature=0.0)
    ref, _ = sample_codes(autoregressive(model, greedy), params, LAYOUT, labels, key=jax.random.key(0))
    got, calls = sample_codes(jacobi(model, window=6, init=SpatialInit(4, 16)), params, LAYOUT, labels,
                              key=jax.random.key(0))
    assert np.array_equal(got, ref) and np.all((calls >= 3) & (calls <= 16))  # greedy Jacobi = greedy AR
    sjd = jacobi(model, window=6, init=SpatialInit(4, 16), sampler=sampler)
    codes, calls = sample_codes(sjd, params, LAYOUT, labels, key=jax.random.key(1))
    print(f"sjd + SpatialInit forwards per 16-token grid: {calls.tolist()}")
    assert codes.shape == (5, 4, 4) and codes.min() >= 0 and codes.max() < 16
    assert np.all((calls >= 3) & (calls <= 16))


def test_save_load_roundtrip(trained, tmp_path):
    model, params, _ = trained
    save_image_model(tmp_path / "m", model, LAYOUT, params, info={"x": 1})
    model2, layout2, params2, info = load_image_model(tmp_path / "m")
    assert model2 == model and layout2 == LAYOUT and info == {"x": 1}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
