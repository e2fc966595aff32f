"""quant_decode_attention (fused dequantize-and-attend, interpret mode) equals
"dequantize with plain jnp, then reference attention" in float32; the in-kernel
unpacking equals the jnp unpack bit for bit."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_attention import (
    _pallas_dequantize,
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quant_decode_attention,
    quant_decode_attention_reference as _reference,
    unpack_codes,
)

# Runtime is almost all XLA compilation. Small helpers are jitted (eager jnp compiles every op);
# the kernels and the oracle go through `_compiled`: one executable per shape, built with LLVM's
# optimiser off (interpret-mode kernels are tiny loops; -O0 compiles several times faster).
_FAST = {"xla_backend_optimization_level": 0}
_EXECUTABLES = {}


def _compiled(fn, *args, **static):
    avals = tuple(None if a is None else (a.shape, str(a.dtype)) for a in args)
    key = (fn, avals, tuple(sorted(static.items())))
    if key not in _EXECUTABLES:
        f = jax.jit(functools.partial(fn, **static))
        _EXECUTABLES[key] = f.lower(*args).compile(compiler_options=_FAST)
    return _EXECUTABLES[key]


def kernel(*args, **static):
    return _compiled(quant_decode_attention, *args, interpret=True, **static)(*args)


def reference(*args, **static):
    return _compiled(_reference, *args, **static)(*args)


def dequantize_in_kernel(*args, **static):
    return _compiled(_pallas_dequantize, *args, interpret=True, **static)(*args)


unpack = jax.jit(unpack_codes, static_argnames="bits")
pack = jax.jit(pack_codes, static_argnames="bits")
deq_keys = jax.jit(dequantize_keys, static_argnames=("bits", "group"))
deq_values = jax.jit(dequantize_values, static_argnames="bits")

TOL = 1e-5


def _pack_np(codes, bits):
    """numpy packer, written from the spec: byte i holds code p*i + j in bits [j*b, (j+1)*b)."""
    p = 8 // bits
    return sum(codes[..., j::p].astype(np.int32) << (j * bits) for j in range(p)).astype(np.uint8)


def _quantize_np(x, bits, axis):
    """The spec's asymmetric uniform quantizer over ``axis`` (kept, size 1): codes, scale, zero."""
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    scale = (hi - lo) / np.float32(2**bits - 1)
    scale = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.round((x - lo) / scale), 0, 2**bits - 1).astype(np.uint8)
    return codes, scale, lo


def _packed_cache(rng, b, kvh, s, d, bits, group):
    """KIVI-quantize random float K/V (numpy: no compile): keys per channel over groups of
    slots, values per token. Returns the six packed arrays as jnp arrays."""
    k = rng.standard_normal((b, kvh, s // group, group, d), dtype=np.float32)
    v = rng.standard_normal((b, kvh, s, d), dtype=np.float32)
    kc, ks, kz = _quantize_np(k, bits, axis=3)
    vc, vs, vz = _quantize_np(v, bits, axis=3)
    kc = _pack_np(kc.reshape(b, kvh, s, d), bits)
    arrays = (kc, ks[:, :, :, 0], kz[:, :, :, 0], _pack_np(vc, bits), vs, vz)
    return tuple(jnp.asarray(x) for x in arrays)


def _inputs(case, seed=0):
    bits, b, t, h, kvh, s, d, r, group, _, _, n_quant, n_recent = case
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, d), dtype=np.float32))
    packed = _packed_cache(rng, b, kvh, s, d, bits, group)
    if r:
        recent = (
            jnp.asarray(rng.standard_normal((b, kvh, r, d), dtype=np.float32)),
            jnp.asarray(rng.standard_normal((b, kvh, r, d), dtype=np.float32)),
            jnp.asarray(n_recent, jnp.int32),
        )
    else:
        recent = (None, None, None)
    return q, packed, jnp.asarray(n_quant, jnp.int32), recent


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# (bits, B, T, H, KV, S, D, R, group, block_k, num_splits, n_quant, n_recent)
CASES = [
    # 2-bit, T=1, GQA 3:1; a row with no quantized slot and a row with no recent slot;
    # 4 key groups a 32-slot block (key-scale rows selected by slot); D=64 needs no padding
    (2, 3, 1, 6, 2, 64, 64, 16, 8, 32, 2, [0, 64, 37], [5, 16, 0]),
    # 4-bit, T=3, SmolLM2's 9/3 heads, D=24 (padded to 32), 2 groups a key block, the second
    # split partly empty for row 1; row 2 has both counts 0 and gives zeros
    (4, 3, 3, 9, 3, 96, 24, 8, 32, 64, 2, [96, 50, 0], [0, 8, 0]),
    # 8-bit, T=2, no recent window, group 64 > block 16 (4 blocks share a key-scale row);
    # a split holds whole groups, so num_splits=3 gives 2 splits of 64 slots
    (8, 2, 2, 4, 1, 128, 16, 0, 64, 16, 3, [100, 1], None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}-T{c[2]}-g{c[8]}")
def test_matches_dequantize_then_reference_and_wrong_counts_do_not(case):
    bits, b, t, h, kvh, s, d, r, group, bk, ns, n_quant, _ = case
    q, packed, nq, recent = _inputs(case)
    ref = reference(q, *packed, nq, *recent, bits=bits, group=group)
    out = kernel(q, *packed, nq, *recent, bits=bits, group=group, block_k=bk, num_splits=ns)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _err(out, ref) <= TOL
    rows_empty = (np.asarray(nq) == 0) & (np.asarray(recent[2]) == 0 if r else True)
    assert float(np.abs(np.asarray(out)[rows_empty]).max(initial=0.0)) == 0.0
    # negative control: one quantized slot too many (or too few) is caught
    off = jnp.asarray(np.where(np.asarray(nq) < s, np.asarray(nq) + 1, np.asarray(nq) - 1))
    wrong = kernel(q, *packed, off, *recent, bits=bits, group=group, block_k=bk, num_splits=ns)
    assert _err(wrong, ref) > 1e-3


def test_reference_is_attention_over_quantized_then_recent_slots():
    """The oracle, re-derived in float64 numpy: row b attends to the dequantized slots
    [0, n_quant) followed by the recent slots [0, n_recent) (GQA: head h reads KV head h // G)."""
    case = CASES[0]
    bits, b, t, h, kvh, s, d, r, group = case[:9]
    q, packed, nq, (kr, vr, nr) = _inputs(case, seed=1)
    kc, ks, kz, vc, vs, vz = (np.asarray(x) for x in packed)
    p, g = 8 // bits, h // kvh

    def unpack_np(c):  # code p*i + j sits in bits [j*b, (j+1)*b) of byte i
        planes = [(c >> (j * bits)) & (2**bits - 1) for j in range(p)]
        return np.stack(planes, axis=-1).reshape(*c.shape[:-1], d)

    k = unpack_np(kc) * np.repeat(ks, group, axis=2).astype(np.float64) + np.repeat(kz, group, 2)
    v = unpack_np(vc) * vs.astype(np.float64) + vz
    want = np.zeros((b, t, h, d))
    for i in range(b):
        n, m = int(nq[i]), int(nr[i])
        for hh in range(h):
            kk = np.concatenate([k[i, hh // g, :n], np.asarray(kr)[i, hh // g, :m]])
            vv = np.concatenate([v[i, hh // g, :n], np.asarray(vr)[i, hh // g, :m]])
            if n + m == 0:
                continue
            sc = kk @ np.asarray(q, np.float64)[i, :, hh].T * d**-0.5  # [n+m, T]
            w = np.exp(sc - sc.max(0))
            want[i, :, hh] = (w / w.sum(0)).T @ vv
    got = reference(q, *packed, nq, kr, vr, nr, bits=bits, group=group)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_garbage_past_the_counts_is_ignored():
    """Stale codes, NaN or huge scales past n_quant, NaN recent slots past n_recent: all ignored."""
    case = CASES[0]
    bits, b, t, h, kvh, s, d, r, group, bk, ns = case[:11]
    q, (kc, ks, kz, vc, vs, vz), nq, (kr, vr, nr) = _inputs(case, seed=2)
    ref = reference(q, kc, ks, kz, vc, vs, vz, nq, kr, vr, nr, bits=bits, group=group)
    n_q, n_r = np.asarray(nq)[:, None, None, None], np.asarray(nr)[:, None, None, None]
    dead = np.arange(s)[None, None, :, None] >= n_q
    dead_group = (np.arange(s // group) * group)[None, None, :, None] >= n_q  # groups wholly dead

    def poison(where, bad, x):
        return jnp.asarray(np.where(where, bad, np.asarray(x)).astype(x.dtype))

    bad = dict(
        ks=poison(dead_group, np.nan, ks),
        kz=poison(dead_group, np.inf, kz),
        vs=poison(dead, np.nan, vs),
        vz=poison(dead, 1e30, vz),
        kc=poison(dead, 255, kc),
    )
    dead_r = np.arange(r)[None, None, :, None] >= n_r
    kr_bad, vr_bad = poison(dead_r, np.nan, kr), poison(dead_r, 1e6, vr)
    out = kernel(
        q, bad["kc"], bad["ks"], bad["kz"], vc, bad["vs"], bad["vz"], nq, kr_bad, vr_bad, nr,
        bits=bits, group=group, block_k=bk, num_splits=ns,
    )  # fmt: skip
    assert _err(out, ref) <= TOL


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_in_kernel_dequantization_equals_jnp_unpack(bits):
    """Codes unpacked in the kernel equal ``unpack_codes`` bit for bit (unit scales, zero zeros);
    with real scales ``code * scale + zero`` agrees with plain jnp to the rounding of one
    multiply-add (the backend may contract it into an FMA)."""
    b, kvh, s, d, group = 2, 1, 64, 40, 16  # D=40 not a power of two: padded in the kernel
    kc, ks, kz, vc, vs, vz = _packed_cache(np.random.default_rng(bits), b, kvh, s, d, bits, group)
    k_hat, v_hat = dequantize_in_kernel(
        kc, np.ones(ks.shape, np.float32), np.zeros(kz.shape, np.float32), vc,
        np.ones(vs.shape, np.float32), np.zeros(vz.shape, np.float32),
        bits=bits, group=group, block_k=32,
    )  # fmt: skip
    k_codes, v_codes = (np.asarray(unpack(c, bits=bits), np.float32) for c in (kc, vc))
    assert len(np.unique(k_codes)) == 2**bits  # every code value occurs
    np.testing.assert_array_equal(np.asarray(k_hat), k_codes)
    np.testing.assert_array_equal(np.asarray(v_hat), v_codes)

    k_hat, v_hat = dequantize_in_kernel(kc, ks, kz, vc, vs, vz, bits=bits, group=group, block_k=32)
    for got, want, prod, zero in (
        (k_hat, deq_keys(kc, ks, kz, bits=bits, group=group), k_codes * np.repeat(ks, group, 2),
         np.repeat(kz, group, 2)),
        (v_hat, deq_values(vc, vs, vz, bits=bits), v_codes * np.asarray(vs), np.asarray(vz)),
    ):  # fmt: skip
        bound = np.spacing(np.abs(prod) + np.abs(zero))  # one rounding of the larger term
        assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= bound)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_is_lossless_and_low_bits_first(bits):
    p = 8 // bits
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 5, 8 * p), dtype=np.uint8)
    packed = np.asarray(pack(codes, bits=bits))
    assert packed.shape == (3, 5, 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, _pack_np(codes, bits))  # byte i: codes p*i .. p*i+p-1
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits=bits)), codes)


def _bad_args(bits=4, b=2, t=1, h=4, kvh=2, s=32, d=16, group=8, r=4):
    p = 8 // bits if bits in (2, 4, 8) else 1
    return dict(
        q=np.zeros((b, t, h, d)),
        k_codes=np.zeros((b, kvh, s, d // p), np.uint8),
        k_scale=np.ones((b, kvh, s // group, d)),
        k_zero=np.zeros((b, kvh, s // group, d)),
        v_codes=np.zeros((b, kvh, s, d // p), np.uint8),
        v_scale=np.ones((b, kvh, s, 1)),
        v_zero=np.zeros((b, kvh, s, 1)),
        n_quant=np.ones((b,), np.int32),
        k_recent=np.zeros((b, kvh, r, d)),
        v_recent=np.zeros((b, kvh, r, d)),
        n_recent=np.ones((b,), np.int32),
    )


def _with(**changes):
    args = _bad_args()
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (_bad_args(), {"bits": 3, "group": 8}, "bits must be one of"),
        (_bad_args(), {"bits": 1, "group": 8}, "bits must be one of"),
        (_bad_args(), {"bits": 4, "group": 12}, "group"),  # does not divide S=32
        (_bad_args(), {"bits": 4, "group": 0}, "group"),
        (_bad_args(bits=2, s=48, group=24), {"bits": 2, "group": 24}, "power-of-two key block"),
        (_with(q=np.zeros((2, 1, 4, 6))), {"bits": 2, "group": 8}, "divisible by 8 // bits"),
        (_bad_args(), {"bits": 2, "group": 8}, "codes must be"),  # 4-bit codes, 2 bits claimed
        (_with(v_codes=np.zeros((2, 2, 16, 8), np.uint8)), {"bits": 4, "group": 8}, "differ"),
        (_with(k_codes=np.zeros((2, 2, 32, 8), np.int8), v_codes=np.zeros((2, 2, 32, 8), np.int8)),
         {"bits": 4, "group": 8}, "uint8"),  # fmt: skip
        (_with(k_scale=np.ones((2, 2, 32, 16))), {"bits": 4, "group": 8}, "k_scale/k_zero"),
        (_with(v_zero=np.ones((2, 2, 32, 16))), {"bits": 4, "group": 8}, "v_scale/v_zero"),
        (_with(n_quant=np.ones((3,), np.int32)), {"bits": 4, "group": 8}, "n_quant"),
        (_with(n_recent=None), {"bits": 4, "group": 8}, "together"),
        (_with(k_recent=np.zeros((2, 2, 4, 8)), v_recent=np.zeros((2, 2, 4, 8))),
         {"bits": 4, "group": 8}, "recent window"),  # fmt: skip
        (_with(q=np.zeros((2, 1, 3, 16))), {"bits": 4, "group": 8}, "multiple of KV heads"),
        (_with(q=np.zeros((2, 4, 16))), {"bits": 4, "group": 8}, "ranks"),
        (_bad_args(), {"bits": 4, "group": 8, "block_k": 48}, "power of two"),
        (_bad_args(), {"bits": 4, "group": 8, "num_splits": 0}, "num_splits"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant_decode_attention(**args, interpret=True, **kwargs)


def test_reference_validates_too():
    with pytest.raises(ValueError, match="bits must be one of"):
        _reference(**_bad_args(), bits=3, group=8)
    with pytest.raises(ValueError, match="group"):
        _reference(**_bad_args(), bits=4, group=5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_triton_and_mosaic(platform, monkeypatch):
    """Compiled (not interpreted) kernels lower to Triton (cuda) / Mosaic (tpu) MLIR on a CPU host.

    Each platform uses its own S: the jitted impls cache their traces (compiler params included).
    """
    if platform == "cuda":
        triton = pytest.importorskip("jax.experimental.pallas.triton")
        for name in ("quant_attention", "decode_attention"):  # the recent window's kernel too
            mod = importlib.import_module(f"pallas_kernels.{name}")
            params = lambda interpret: triton.CompilerParams(num_warps=4)  # noqa: E731
            monkeypatch.setattr(mod, "compiler_params", params)
    bits, group, s, r = (2, 16, 256, 32) if platform == "cuda" else (4, 64, 128, 16)
    b, kvh, d, p = 2, 3, 64, 8 // bits
    q = np.zeros((b, 1, 9, d))
    codes = np.zeros((b, kvh, s, d // p), np.uint8)
    kscale, vscale = np.ones((b, kvh, s // group, d)), np.ones((b, kvh, s, 1))
    packed = (codes, kscale, kscale, codes, vscale, vscale)
    nq = np.asarray([200, 1], np.int32)
    recent = (np.zeros((b, kvh, r, d)), np.zeros((b, kvh, r, d)), np.ones((b,), np.int32))
    f = jax.jit(
        lambda *a: quant_decode_attention(*a, bits=bits, group=group, block_k=32, interpret=False)
    )
    text = f.trace(q, *packed, nq, *recent).lower(lowering_platforms=(platform,)).as_text()
    assert "decodax_quant_decode_attention" in text and "decodax_decode_attention" in text
