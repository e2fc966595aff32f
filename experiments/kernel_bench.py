"""Pallas kernels vs their XLA references: max abs error and time, on the current backend.

For each kernel of ``pallas_kernels`` (flash attention causal and with a tree
mask, split-K decode attention, fused dequantize-and-attend over KIVI int8 /
int4 / int2 caches with a full-precision recent window): the compiled kernel's
max abs error against its pure-jnp reference (float32) and the median wall time
of both, jitted, over ``--reps`` runs after a warm-up. Written to
``experiments/results/kernels/<backend>.md``. Meant for a GPU/TPU; on CPU the
kernels run in interpret mode (``--small`` shapes), which checks the script, not
speed.

    python experiments/kernel_bench.py            # on a GPU machine
    python experiments/kernel_bench.py --small    # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import (attention_reference, decode_attention, decode_attention_reference, flash_attention,
                            quant_decode_attention, quant_decode_attention_reference)
from pallas_kernels.quant_attention import pack_codes

OUT = Path(__file__).resolve().parent / "results" / "kernels"


def timed(fn, *args, reps):
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def tree_mask(b, t):
    """A random token tree: node i's parent is drawn among 0..i-1; mask = ancestors (self included)."""
    parents = jax.random.randint(jax.random.key(7), (t,), 0, jnp.maximum(jnp.arange(t), 1)) % jnp.maximum(
        jnp.arange(t), 1)
    anc = jnp.eye(t, dtype=bool)
    for _ in range(t):  # transitive closure, t rounds
        anc = anc | anc[parents] & (jnp.arange(t) > 0)[:, None]
    return jnp.broadcast_to(anc, (b, t, t))


def kivi(x, bits, group, axis):
    """KIVI asymmetric quantization of ``x [B, KV, S, D]``: keys per channel over ``group`` tokens
    (``axis=2``), values per token (``axis=3``); returns packed codes, scale, zero."""
    b, kv, s, d = x.shape
    levels = 2 ** bits - 1
    if axis == 2:
        xg = x.reshape(b, kv, s // group, group, d)
        lo, hi = xg.min(3), xg.max(3)
        scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
        codes = jnp.clip(jnp.round((xg - lo[:, :, :, None]) / scale[:, :, :, None]), 0, levels)
        codes = codes.reshape(b, kv, s, d)
    else:
        lo, hi = x.min(3, keepdims=True), x.max(3, keepdims=True)
        scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
        codes = jnp.clip(jnp.round((x - lo) / scale), 0, levels)
    return pack_codes(codes.astype(jnp.uint8), bits), scale.astype(jnp.float32), lo.astype(jnp.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    small = args.small
    ks = iter(jax.random.split(jax.random.key(0), 32))
    rnd = lambda *shape: jax.random.normal(next(ks), shape, jnp.float32)  # noqa: E731
    rows = []

    def record(name, shape, kernel, reference, *xs):
        out_k, t_k = timed(jax.jit(kernel), *xs, reps=args.reps)
        out_r, t_r = timed(jax.jit(reference), *xs, reps=args.reps)
        err = float(jnp.max(jnp.abs(out_k.astype(jnp.float32) - out_r.astype(jnp.float32))))
        rows.append((name, shape, err, t_k * 1e3, t_r * 1e3))
        print(rows[-1], flush=True)

    b, t, h, kvh, d = (1, 64, 4, 2, 32) if small else (4, 1024, 32, 8, 128)
    q, k, v = rnd(b, t, h, d), rnd(b, t, kvh, d), rnd(b, t, kvh, d)
    record("flash attention, causal", f"B{b} T{t} H{h} KV{kvh} D{d}", lambda q, k, v: flash_attention(q, k, v),
           lambda q, k, v: attention_reference(q, k, v), q, k, v)
    tt = 32 if small else 64
    mask = tree_mask(b, tt)
    q2, k2, v2 = q[:, :tt], k[:, :tt], v[:, :tt]
    record("flash attention, token-tree mask", f"B{b} T{tt} H{h} KV{kvh} D{d}",
           lambda q, k, v, m: flash_attention(q, k, v, m), lambda q, k, v, m: attention_reference(q, k, v, m),
           q2, k2, v2, mask)

    b, s = (2, 256) if small else (8, 16384)
    kc, vc = rnd(b, kvh, s, d), rnd(b, kvh, s, d)
    lengths = jnp.asarray([s - 3 * i for i in range(b)], jnp.int32)
    for tq in (1, 8):
        qd = rnd(b, tq, h, d)
        record(f"decode attention, T={tq}", f"B{b} S{s} H{h} KV{kvh} D{d}",
               lambda q, kc, vc, n: decode_attention(q, kc, vc, n),
               lambda q, kc, vc, n: decode_attention_reference(q, kc, vc, n), qd, kc, vc, lengths)

    r, group = (16, 32) if small else (128, 128)
    qd = rnd(b, 1, h, d)
    kr, vr = rnd(b, kvh, r, d), rnd(b, kvh, r, d)
    n_recent = jnp.full((b,), r, jnp.int32)
    for bits in (8, 4, 2):
        kq, vq = kivi(kc, bits, group, 2), kivi(vc, bits, group, 3)
        record(f"quantized decode attention, int{bits} + {r} recent", f"B{b} S{s} H{h} KV{kvh} D{d} group {group}",
               lambda q, *a: quant_decode_attention(q, *a, bits=bits, group=group),
               lambda q, *a: quant_decode_attention_reference(q, *a, bits=bits, group=group),
               qd, *kq, *vq, lengths, kr, vr, n_recent)

    dev = jax.devices()[0].device_kind
    table = "\n".join(f"| {n} | {s} | {e:.1e} | {tk:.3f} | {tr:.3f} | {tr / tk:.2f}x |" for n, s, e, tk, tr in rows)
    out = Path(args.out) if args.out else OUT / f"{backend}{'-small' if small else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Pallas kernels vs XLA references ({dev})

Generated by `experiments/kernel_bench.py{' --small' if small else ''}` on {datetime.date.today()}
({platform.machine()}, JAX {jax.__version__}, backend {backend}{', interpret mode' if backend == 'cpu' else ''}).
Median of {args.reps} runs after a warm-up, both jitted, float32. Reference = the pure-jnp oracle of
each kernel (`pallas_kernels/reference.py`, `quant_decode_attention_reference`: dequantize, then
attend), compiled by XLA. Speed ratio > 1: the kernel is faster.

| kernel | shape | max abs error | kernel ms | XLA reference ms | reference / kernel |
|---|---|---:|---:|---:|---:|
{table}
""")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
