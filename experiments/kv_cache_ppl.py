"""Compressed KV caches on SmolLM2-135M: perplexity table, speculative decoding on KIVI-4, PIE.

1. ``table``: WikiText-2 test perplexity over each KV cache (decodax.bench.kv_cache
   protocol: windows of ``--context`` tokens, the first half prefilled, the second half
   scored 32 tokens at a time over the cache), delta vs the float cache measured in the
   same run, and KV bytes per token. KVQuant is calibrated on WikiText-2 valid.
2. ``spec``: greedy decoding on a KIVI-4 cache -- autoregressive and prompt-lookup
   speculative -- against float-cache greedy on Spec-Bench prompts: token agreement,
   tokens per target forward.
3. ``pie``: a WikiText-2 passage, a few tokens in the middle replaced; the next-token
   logits after PIE's re-rotation vs a full re-prefill of the edited text (max abs diff,
   same argmax), the same without re-rotation, and the time of each (jitted, after a
   warm-up).

    python experiments/kv_cache_ppl.py --parts table,spec,pie
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decodax import generate
from decodax.bench.kv_cache import KV_CACHES, kv_cache_markdown, kv_cache_table, wikitext_windows
from decodax.bench.prompts import load_questions
from decodax.bench.runner import encode_prompt
from decodax.kvquant import QuantCacheSpec, make_codec
from decodax.kvquant.pie import pie_edit
from decodax.methods import make_decoder
from decodax.model import cache as kv
from decodax.model.default import load_default

OUT = Path(__file__).resolve().parent / "results" / "kv_cache"


def table(model, params, tok, args) -> str:
    windows = wikitext_windows(tok, args.context, args.windows)
    calib = wikitext_windows(tok, args.context, 1, split="valid")
    t0 = time.time()
    rows = kv_cache_table(model, params, windows, args.caches.split(","), prefill=args.context // 2,
                          calibration=calib, batch=args.batch, progress=lambda n: print(f"  {n} ...", flush=True))
    return (f"## Perplexity over compressed KV caches\n\nWikiText-2 test, {args.windows} windows of "
            f"{args.context} tokens ({rows[0].tokens} tokens scored, each with {args.context // 2}..."
            f"{args.context - 1} tokens of context), prefill {args.context // 2}, then chunks of 32 over the "
            f"cache. Groups: int/KIVI/KVQuant 32 tokens, GEAR 64 tokens (rank 2, 1% sparse); float window "
            f"128 tokens (+ the sink token for KVQuant). KV bytes per token at {args.context} tokens of context, "
            f"all 30 layers x 3 KV heads. {time.time() - t0:.0f} s.\n\n" + kv_cache_markdown(rows))


def agreement(a, b):
    """Fraction of positions equal, and the mean length of the common prefix."""
    same = sum(sum(x == y for x, y in zip(r, s)) for r, s in zip(a, b))
    total = sum(min(len(r), len(s)) for r, s in zip(a, b))
    prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s))) for r, s in zip(a, b)]
    return same / max(total, 1), float(np.mean(prefix))


def spec(model, params, tok, args) -> str:
    prompts = [encode_prompt(tok, p.text) for p in load_questions(None, args.prompts)]
    kivi = dataclasses.replace(model, cache_spec=QuantCacheSpec(make_codec("kivi4", group=32), residual=32))
    runs = {}
    for label, m, method in (("float ar", model, "ar"), ("kivi4 ar", kivi, "ar"), ("kivi4 pld", kivi, "pld"),
                             ("float pld", model, "pld")):
        dec = make_decoder(method, m, params)
        rows, calls, n = [], 0, 0
        for p in prompts:
            out = generate(dec, params, [p], max_new_tokens=args.new_tokens)
            rows += out.rows()
            calls += int(out.calls.sum()) - 1
            n += int(out.lengths.sum())
        runs[label] = (rows, n / max(calls, 1))
    ref = runs["float ar"][0]
    lines = ["| decoding | cache | agreement with float greedy | mean common prefix (tokens) | τ |", "|---|---|---:|---:|---:|"]
    for label, (rows, tau) in runs.items():
        cache, method = label.split()
        a, pre = agreement(rows, ref)
        lines.append(f"| {method} | {cache} | {a:.3f} | {pre:.1f} | {tau:.2f} |")
    return (f"## Greedy decoding on a KIVI-4 cache\n\n{len(prompts)} Spec-Bench prompts, {args.new_tokens} new "
            "tokens each; agreement = positions equal to float-cache greedy (`ar`); τ = tokens per target forward "
            "(prefill excluded).\n\n" + "\n".join(lines) + "\n")


def pie(model, params, tok, args) -> str:
    ids = wikitext_windows(tok, args.pie_context, 1)[0]
    start, end = args.pie_context // 2, args.pie_context // 2 + 3
    new = np.asarray(tok.encode(" the new text here"), np.int32)[None]
    edited = np.concatenate([ids[None, :start], new, ids[None, end:]], axis=1)
    cap = args.pie_context + 64

    @partial(jax.jit, static_argnums=0)
    def prefill(n, toks):
        out = model.apply(params, toks[:, :n], jnp.arange(n)[None], kv.init_cache(model.config, 1, cap),
                          compute_logits=False, empty_cache=True)
        return kv.commit(out.cache, n)

    edit = jax.jit(lambda c, t, r: pie_edit(model, params, c, t, start, end, rerotate=r), static_argnums=2)
    step = jax.jit(lambda c, t, p: model.apply(params, t, p, c).logits[:, -1])
    n_old, n_new = ids.shape[0] - 1, edited.shape[1] - 1  # the last token is fed next
    base = prefill(n_old, jnp.asarray(ids[None]))

    def timed(fn):
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        for _ in range(3):
            out = jax.block_until_ready(fn())
        return out, (time.perf_counter() - t0) / 3

    full, t_full = timed(lambda: prefill(n_new, jnp.asarray(edited)))
    pie_c, t_pie = timed(lambda: edit(base, jnp.asarray(new), True))
    stale, t_stale = timed(lambda: edit(base, jnp.asarray(new), False))
    last, pos = jnp.asarray(edited[:, -1:]), jnp.array([[n_new]])
    ref = step(full, last, pos)
    lines = ["| cache after the edit | max abs logit diff vs re-prefill | same argmax | time | time / re-prefill |",
             "|---|---:|---:|---:|---:|",
             f"| full re-prefill ({n_new} tokens) | 0 | yes | {t_full * 1e3:.0f} ms | 1.00 |"]
    for label, c, t in (("PIE (re-rotated suffix)", pie_c, t_pie), ("stale positions (no re-rotation)", stale, t_stale)):
        lg = step(c, last, pos)
        same = "yes" if int(jnp.argmax(lg)) == int(jnp.argmax(ref)) else "no"
        lines.append(f"| {label} | {float(jnp.abs(lg - ref).max()):.3f} | {same} | {t * 1e3:.0f} ms | {t / t_full:.2f} |")
    return (f"## PIE after an edit\n\nA {args.pie_context}-token WikiText-2 passage; tokens [{start}, {end}) "
            f"replaced by {new.shape[1]} new ones; logits of the next token after the last one. Times: jitted, "
            "mean of 3 after a warm-up (PIE = one forward of the new tokens + the suffix keys' re-rotation).\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="table,spec,pie")
    ap.add_argument("--caches", default=",".join(KV_CACHES[1:]))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pie-context", type=int, default=512)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    model, params, tok = load_default()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Compressed KV caches (SmolLM2-135M-Instruct)\n\n{datetime.date.today()} · jax {jax.__version__} on "
              f"{jax.devices()[0].platform} ({platform.machine()}, {jax.device_count()} device)\n\n")
    for part in args.parts.split(","):
        print(f"{part} ...", flush=True)
        text = {"table": table, "spec": spec, "pie": pie}[part](model, params, tok, args)
        (out / f"{part}.md").write_text(header + text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
