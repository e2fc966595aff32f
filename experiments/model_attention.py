"""``Model.apply(attention="pallas")`` vs ``"xla"`` inside the model, float and KIVI-4 caches.

A random-weight model of SmolLM2-135M's shape (30 layers, 9 heads, 3 KV heads,
head dim 64; no checkpoint needed, so it runs on a lent GPU machine) prefills a
``--context``-token prompt, then decodes: one ``T = 1`` step and one ``T = 8``
tree-masked verify step over a float cache and over a KIVI-4 compressed cache,
with each attention implementation. Reports the max abs logit difference
pallas vs xla and the step-time ratio (median of ``--reps``, jitted, after a
warm-up). Written to ``experiments/results/kernels/model-attention-<backend>.md``.

    python experiments/model_attention.py             # on a GPU
    python experiments/model_attention.py --small     # CPU smoke run (interpreted kernels)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from decodax.kvquant import init_quant_cache, make_codec
from decodax.model import cache as kv
from decodax.model.config import ModelConfig, tiny_config
from decodax.model.transformer import Model

OUT = Path(__file__).resolve().parent / "results" / "kernels"


def smollm_shape() -> ModelConfig:
    return tiny_config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                       rope_theta=100000.0, max_seq_len=8192, name="smollm2-135m-shape")


def median_time(fn, reps):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny model and context (CPU check of the script)")
    args = ap.parse_args(argv)
    cfg = tiny_config(n_layers=2) if args.small else smollm_shape()
    ctx = 64 if args.small else args.context
    model = Model(cfg)
    params = model.init(jax.random.PRNGKey(0))
    b, cap = args.batch, ctx + 64
    toks = jax.random.randint(jax.random.PRNGKey(1), (b, ctx + 8), 3, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(ctx + 8), (b, ctx + 8))
    apply = jax.jit(model.apply, static_argnames=("empty_cache", "attention"))
    tree = jnp.tril(jnp.ones((8, 8), bool)).at[4:, 1:4].set(False)  # a 2-branch token tree
    caches = {"float": kv.init_cache(cfg, b, cap),
              "kivi4": init_quant_cache(cfg, b, cap, make_codec("kivi4", group=32), residual=128)}
    rows = []
    for name, empty in caches.items():
        cache = kv.commit(apply(params, toks[:, :ctx], pos[:, :ctx], empty, empty_cache=True).cache, ctx)
        for t, mask in ((1, None), (8, jnp.broadcast_to(tree, (b, 8, 8)))):
            args_t = (params, toks[:, ctx:ctx + t], pos[:, ctx:ctx + t], cache)
            out = {impl: apply(*args_t, attn_mask=mask, attention=impl) for impl in ("xla", "pallas")}
            err = float(jnp.abs(out["pallas"].logits - out["xla"].logits).max())
            ms = {impl: median_time(lambda i=impl: apply(*args_t, attn_mask=mask, attention=i).logits, args.reps) * 1e3
                  for impl in ("xla", "pallas")}
            rows.append(f"| {name} | T={t} | {err:.1e} | {ms['xla']:.2f} | {ms['pallas']:.2f} | "
                        f"{ms['xla'] / ms['pallas']:.2f}x |")
    dev = jax.devices()[0]
    text = (f"# Model.apply attention: pallas vs xla ({dev.device_kind})\n\n{datetime.date.today()} · jax "
            f"{jax.__version__} · backend {dev.platform} · {cfg.name}, random weights, batch {b}, {ctx} cached tokens;"
            f" median of {args.reps} jitted steps after a warm-up. KIVI-4: group 32, 128-token float window. "
            "Speed > 1: pallas faster.\n\n| cache | step | max abs logit diff | xla ms | pallas ms | xla / pallas |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    print(text)
    if not args.small:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"model-attention-{dev.platform}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
