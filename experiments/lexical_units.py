"""Lexical Unit Decoding (LUD) on SmolLM2-135M: data-driven fine-tuning, then speed vs quality.

1. Data: the original model's greedy continuations (``--new-tokens``) of
   WikiText-2 *validation* passages (first ``--prompt-tokens`` tokens); lexical
   units marked on them with the model's teacher-forced probabilities
   (``--unit-alpha``, at most ``k + 1`` tokens), one example per unit of two or
   more tokens (:func:`decodax.jacobi.lexical_units.lud_examples`).
2. Fine-tuning with the shared trainer (orbax checkpoints under ``<ckpt>/train``,
   resumable): unit loss + AR loss, every weight trained, ``--budget`` seconds.
   The placeholder is the unused special token ``<empty_output>``.
3. Held-out evaluation on WikiText-2 *test* passages: LUD (``k`` placeholders,
   thresholds ``--alphas``) with the original and the fine-tuned model: target
   forwards per token, wall-time speedup over autoregressive greedy decoding
   with the original model (same run), perplexity of the output under the
   original model and agreement with the original model's greedy output.
   Written to ``experiments/results/jacobi/lexical_units.md``.

    .venv/bin/python experiments/lexical_units.py --budget 600
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import jax
import numpy as np
import optax

import decodax
from consistency_distillation import ROOT, WIKI, agreement, forwards_per_token, load_test_prompts, perplexity
from decodax.decoding import autoregressive, generate
from decodax.jacobi.lexical_units import lexical_unit_decoding, lud_examples, lud_loss
from decodax.kernels import unpack
from decodax.train import Checkpoints, create_state, epoch_batches, fit, make_train_step
from train_draft_heads import passages

OUT = ROOT / "results" / "jacobi" / "lexical_units.md"
PLACEHOLDER = "<empty_output>"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-passages", type=int, default=96)
    ap.add_argument("--test-passages", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--unit-alpha", type=float, default=0.6)
    ap.add_argument("--alphas", default="0.9,0.7,0.5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--budget", type=float, default=600.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ckpt", default=str(ROOT / "checkpoints" / "lud"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    t0 = time.time()
    model, params, tok = decodax.load_default(packed=False)
    params = unpack(params)
    pad_id = tok.backend.token_to_id(PLACEHOLDER)
    if pad_id is None:
        raise SystemExit(f"the tokenizer has no {PLACEHOLDER} token")

    # 1. data: the model's own greedy continuations, units marked by its confidence
    train = [tok.encode(t)[:args.prompt_tokens] for t in passages(WIKI / "valid.txt", args.train_passages, words=60)]
    conts = []
    for i in range(0, len(train), args.batch):
        conts += generate(autoregressive(model), params, train[i:i + args.batch], max_new_tokens=args.new_tokens,
                          pad_to=64).rows()
    ex, stats = lud_examples(model, params, [p + c for p, c in zip(train, conts)], [len(p) for p in train],
                             k=args.k, alpha=args.unit_alpha, pad_id=pad_id, context=args.context)
    t_data = time.time() - t0
    print(f"{len(ex.pad)} examples, units: {stats} ({t_data:.0f} s)", flush=True)

    # 2. fine-tuning
    state = create_state(params, optax.adamw(args.lr, weight_decay=0.0), jax.random.key(0))
    step = make_train_step(lud_loss(model, context=args.context))
    batch_fn = epoch_batches(ex._asdict(), args.batch)
    chunk = 25
    ckpt = Checkpoints(Path(args.ckpt) / "train", save_every=chunk, keep=2)
    history = []
    t_train = time.time()
    while int(state.step) < args.steps and time.time() - t_train < args.budget:
        target = min(args.steps, (int(ckpt.latest_step() or 0) // chunk + 1) * chunk)
        state, h = fit(state, step, batch_fn, target, checkpoints=ckpt, log_path=Path(args.ckpt) / "metrics.jsonl",
                       progress=False)
        history += h
    t_train = time.time() - t_train
    mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else float("nan")  # noqa: E731
    first, last = history[:10], history[-10:]
    print(f"trained {int(state.step)} steps in {t_train:.0f} s: unit {mean(first, 'unit'):.3f} -> "
          f"{mean(last, 'unit'):.3f}, ar {mean(first, 'ar'):.3f} -> {mean(last, 'ar'):.3f}", flush=True)

    # 3. held-out evaluation
    test = load_test_prompts(tok, args.test_passages, args.prompt_tokens)
    run = lambda dec, p: forwards_per_token(dec, p, test, args.new_tokens, args.batch, timed=True)  # noqa: E731
    _, ref, t_ar = run(autoregressive(model), params)
    ppl_ref = perplexity(model, params, test, ref)
    rows = []
    for name, p in (("original", params), (f"fine-tuned ({int(state.step)} steps)", state.params)):
        for alpha in (float(a) for a in args.alphas.split(",")):
            fpt, out, secs = run(lexical_unit_decoding(model, k=args.k, alpha=alpha, pad_id=pad_id), p)
            row = dict(model=name, alpha=alpha, fpt=fpt, speedup=t_ar / secs,
                       ppl=perplexity(model, params, test, out), agree=agreement(out, ref))
            print(row, flush=True)
            rows.append(row)
    table = "\n".join(f"| {r['model']} | {r['alpha']:g} | {r['fpt']:.3f} | {r['speedup']:.2f}x | {r['ppl']:.2f} | "
                      f"{r['agree']:.3f} |" for r in rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Lexical Unit Decoding (LUD), SmolLM2-135M

Generated by `experiments/lexical_units.py` on {datetime.date.today()} ({platform.machine()},
JAX {jax.__version__}, {jax.default_backend()}); {time.time() - t0:.0f} s in all.

Data: greedy continuations ({args.new_tokens} tokens) of {len(train)} WikiText-2 validation passages
(first {args.prompt_tokens} tokens) by the original model; lexical units marked at teacher-forced
probability >= {args.unit_alpha} (at most {args.k + 1} tokens): {stats['units']} units,
{stats['multi_token_units']} of two or more tokens ({stats['tokens_in_multi_token_units']:.1%} of the
tokens), mean length {stats['mean_unit_length']:.2f}; {len(ex.pad)} examples, built in {t_data:.0f} s.
Fine-tuning: {int(state.step)} steps of batch {args.batch}, AdamW lr {args.lr}, all weights, unit loss
{mean(first, 'unit'):.3f} -> {mean(last, 'unit'):.3f}, AR loss {mean(first, 'ar'):.3f} ->
{mean(last, 'ar'):.3f} (first / last 10 steps), {t_train:.0f} s. Placeholder: `{PLACEHOLDER}`
(id {pad_id}).

Held-out: {len(test)} WikiText-2 test passages, {args.new_tokens} tokens, batch {args.batch}, LUD with
k = {args.k} placeholders (T = {2 * args.k + 1} per forward). Speedup: wall time of autoregressive
greedy decoding with the original model over LUD's, same run, second pass. Quality: perplexity under
the original model (its own greedy output: {ppl_ref:.2f}) and token agreement with its greedy output.
LUD is lossy. Wall time at batch {args.batch} follows the batch's slowest row, forwards per token the
mean over rows.

| model | alpha | target forwards / token | speedup vs AR | perplexity (original) | agreement |
|---|---:|---:|---:|---:|---:|
{table}
""")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
