"""Conv-autoencoder tokenizers: config checks, token id mapping, shapes, tokenize/detokenize
round trip (== reconstruct), training lowers the loss, EMA state only in training, save/load.

Small shapes (16x16 images -> 4x4 tokens, width 4, K = 16) and two trained tokenizers shared
by the tests (FSQ: no state; RVQ: EMA state, k-means init, multi-code ids): each new
tokenizer compiles its own init / step / tokenize programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.quantizers import autoencoder as ae

K = 16
N, SIZE = 16, 16


def images(seed=0, n=N, c=1):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, SIZE, SIZE, c), np.float32)
    for i in range(n):  # bright rectangles on black: learnable structure
        r, q = rng.integers(0, SIZE - 6, 2)
        x[i, r:r + 6, q:q + 4] = rng.uniform(0.5, 1.0)
    return x


def tok(name, **kw):
    return ae.make_tokenizer(name, codebook_size=K, channels=4, latent_dim=4, **kw)


@pytest.fixture(scope="module", params=["fsq", "rvq"])
def trained(request):
    t = tok(request.param, dead_code_patience=2)
    v, hist = ae.train_tokenizer(t, images(), steps=8, batch_size=N, lr=3e-3, seed=0)
    return t, v, hist


def test_unknown_quantizer_and_bad_budgets_raise():
    with pytest.raises(ValueError, match="unknown quantizer"):
        ae.make_tokenizer("vqgan", channels=4, latent_dim=4)
    with pytest.raises(ValueError, match="unknown options"):
        ae.make_tokenizer("vq", channels=4, latent_dim=4, levels=(8, 8))
    with pytest.raises(ValueError, match="power of two"):
        ae.make_tokenizer("lfq", codebook_size=1000, channels=4, latent_dim=4)
    with pytest.raises(ValueError, match="FSQ levels"):
        ae.make_tokenizer("fsq", codebook_size=1024, channels=4, latent_dim=4, fsq_levels=(8, 5, 5, 5))
    with pytest.raises(ValueError, match="QLAE"):
        ae.make_tokenizer("qlae", codebook_size=1024, channels=4, latent_dim=4, qlae_values=3)
    with pytest.raises(ValueError, match="RVQ"):
        ae.make_tokenizer("rvq", codebook_size=1000, channels=4, latent_dim=4, rvq_stages=2)
    with pytest.raises(ValueError, match="group-lfq"):
        ae.make_tokenizer("group-lfq", codebook_size=1024, channels=4, latent_dim=4, lfq_groups=3)
    with pytest.raises(ValueError, match="channels"):
        ae.make_tokenizer("vq", channels=0, latent_dim=4)


def test_budget_of_every_quantizer_is_k():
    dims = {"vq": 16, "vq-ema": 16, "simvq": 16, "fsq": 4, "lfq": 10, "group-lfq": 10, "qlae": 5, "rvq": 16}
    for name in ae.QUANTIZERS:
        t = ae.make_tokenizer(name, channels=8, latent_dim=16)
        assert int(np.prod(t.radices or (t.codebook_size,))) == 1024, name
        assert t.code_dim == dims[name], name
    assert ae.make_tokenizer("fsq", channels=8, latent_dim=16).fsq_levels == (8, 8, 4, 4)
    assert ae.default_fsq_levels(256) == (8, 8, 4)


@pytest.mark.parametrize("name", ["group-lfq", "qlae", "rvq"])
def test_multi_code_token_ids_are_a_bijection_onto_k(name):
    t = ae.make_tokenizer(name, channels=4, latent_dim=4)
    ids = jnp.arange(t.codebook_size)
    codes = ae.token_to_codes(t, ids)
    assert codes.shape == (t.codebook_size, len(t.radices))
    assert np.all(np.asarray(codes) < np.asarray(t.radices))
    np.testing.assert_array_equal(ae.codes_to_token(t, codes), ids)


def test_group_lfq_ids_equal_plain_lfq_ids():
    from decodax.quantizers import lfq

    z = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    g = tok("group-lfq")  # K = 16: 2 groups of 2 bits
    both = jax.jit(lambda z: (ae.codes_to_token(g, lfq.quantize(z, groups=2).codes), lfq.quantize(z).codes))
    grouped, plain = both(z)
    np.testing.assert_array_equal(grouped, plain)


def test_training_lowers_the_loss(trained):
    _, _, hist = trained
    assert len(hist) == 8 and all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_shapes_and_round_trip(trained):
    t, v, _ = trained
    x = images(1, n=5)
    codes = ae.tokenize(t, v, x)
    assert codes.shape == (5, SIZE // 4, SIZE // 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    out = ae.detokenize(t, v, codes)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, ae.reconstruct(t, v, x))  # detokenize(tokenize(x)) == reconstruct(x)
    np.testing.assert_array_equal(ae.tokenize(t, v, out), ae.tokenize(t, v, out))  # deterministic
    ev = ae.evaluate(t, v, x)
    assert 0 < ev["utilization"] <= 1 and ev["perplexity"] >= 1 and np.isfinite(ev["psnr"])
    with pytest.raises(ValueError, match="code ids"):
        ae.detokenize(t, v, np.full((1, 4, 4), K, np.int32))
    with pytest.raises(ValueError, match="images must be"):
        ae.tokenize(t, v, x[..., 0])


def test_ema_state_changes_in_training_only(trained):
    t, v, _ = trained
    if t.quantizer != "rvq":
        assert "vq_stats" not in v
        return
    init = ae.init_tokenizer(t, images()[:N], seed=0)
    assert not np.allclose(init["vq_stats"]["quantizer"]["cluster_size"], v["vq_stats"]["quantizer"]["cluster_size"])
    before = jax.tree.map(np.asarray, v)
    ae.reconstruct(t, v, images(2, n=4))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, v))


def test_save_load_round_trip(trained, tmp_path):
    t, v, _ = trained
    path = ae.save_tokenizer(tmp_path / "tok", t, v, info={"steps": 8})
    t2, v2 = ae.load_tokenizer(path)
    assert t2 == t and ae.tokenizer_info(path)["steps"] == 8
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, v), jax.tree.map(np.asarray, v2))
    x = images(3, n=5)
    np.testing.assert_array_equal(ae.tokenize(t2, v2, x), ae.tokenize(t, v, x))
    with pytest.raises(FileNotFoundError):
        ae.load_tokenizer(tmp_path / "missing")


def test_latent_norm_sets_the_latent_scale_and_old_configs_load_without_it():
    x = images(4)
    scale = {}
    for norm in (True, False):
        t = tok("simvq", latent_norm=norm)
        v = ae.init_tokenizer(t, x, seed=0)
        assert ("enc_norm" in v["params"]) == norm
        z = t.module.apply(v, jnp.asarray(x), method=ae.ConvAutoEncoder.encode)
        scale[norm] = float(jnp.std(z.reshape(-1, z.shape[-1]), axis=0).mean())
    assert scale[True] > 3 * scale[False], scale  # the GroupNorm lifts the spread of the latents
    old = tok("fsq").to_json()
    del old["latent_norm"]  # a config written before the field existed
    assert ae.Tokenizer.from_json(old).latent_norm is False and tok("fsq").latent_norm is True
