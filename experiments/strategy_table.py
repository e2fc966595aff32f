"""Quality-oriented decoding strategies on SmolLM2-135M: BLEU on translation, degeneration on WikiText-2.

1. ``translation``: Spec-Bench's German->English translation questions (they carry
   references). The first ``--fit`` questions are the fitting split: two of them are the
   in-context examples of every prompt (earlier chat turns), and all of them (prompt + reference) give AdaDec's
   teacher-forced (entropy, top-1) pairs for its learned threshold
   (:func:`decodax.strategies.adadec.fit_threshold`). The remaining questions are scored:
   corpus BLEU (sacrebleu, first line of the answer) for greedy, beam search, contrastive
   search, CNTP, AdaDec (fitted threshold) and USCD (lame prompt = the same prompt without
   its two example turns), with target forwards per token and wall time per token relative to
   greedy, measured in the same run.
2. ``wikitext``: ``--prefixes`` WikiText-2 test prefixes of 32 tokens, ``--new`` tokens
   each (SimCTG's protocol, shorter): rep-2/3/4 (share of repeated n-grams in a
   continuation), distinct-2/3/4 over all continuations, diversity = prod (1 - rep-n),
   perplexity of the continuation under the model itself, forwards per token, for greedy
   (reference), nucleus sampling (p = 0.95), contrastive search, momentum decoding and
   superposed decoding; and superposed decoding's k drafts from one run against k
   separate nucleus runs (forwards and wall time).

Writes ``experiments/results/strategies/{translation,wikitext}.md`` and ``table.json``.

    python experiments/strategy_table.py --parts translation,wikitext
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decodax import generate, sampling
from decodax.bench.kv_cache import wikitext_windows
from decodax.methods import make_decoder
from decodax.model.default import load_default
from decodax.train.losses import logits_of

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT.parent / "shared" / "data" / "spec_bench" / "questions.jsonl"
OUT = ROOT / "experiments" / "results" / "strategies"
SOURCE = "Translate German to English: "


def translation_items(path: Path) -> list[tuple[str, str]]:
    """(German source, English reference) of every Spec-Bench translation question."""
    items = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if q.get("category") == "translation" and q.get("reference"):
            items.append((q["turns"][0].removeprefix(SOURCE).strip(), q["reference"][0].strip()))
    return items


def chat_prompt(tok, examples, source: str) -> list[int]:
    """The question in the chat template, after ``examples`` as earlier (user, assistant) turns."""
    messages = []
    for de, en in examples:
        messages += [{"role": "user", "content": SOURCE + de}, {"role": "assistant", "content": en}]
    messages.append({"role": "user", "content": SOURCE + source})
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def timed(dec, params, prompts, *, max_new_tokens, key, eos, pad_to=64):
    """(output, seconds): one warm-up call (compilation) with budget 1, then the timed run."""
    kw = dict(max_new_tokens=max_new_tokens, key=key, eos_ids=eos, pad_to=pad_to)
    generate(dec, params, prompts, budget=1, **kw)
    t0 = time.perf_counter()
    out = generate(dec, params, prompts, **kw)
    return out, time.perf_counter() - t0


def per_token(out) -> tuple[int, float]:
    tokens = int(out.lengths.sum())
    return tokens, float(out.calls.sum()) / max(tokens, 1)


def translation(model, params, tok, args) -> tuple[str, dict]:
    import sacrebleu

    from decodax.strategies.adadec import adadec, entropy_labels, fit_threshold
    from decodax.strategies.contrastive_decoding import uscd, with_lame_prompts

    items = translation_items(args.questions)
    fit, test = items[: args.fit], items[args.fit:][: args.test]
    shots = fit[:2]
    prompts = [chat_prompt(tok, shots, de) for de, _ in test]
    lame = [chat_prompt(tok, (), de) for de, _ in test]
    refs = [en for _, en in test]
    eos = tuple(tok.eos_ids)

    # AdaDec's threshold from the fitting split: prompt + reference answer, teacher-forced.
    seqs, plens = [], []
    for de, en in fit:
        p = chat_prompt(tok, shots, de)
        seqs.append(p + tok.encode(" " + en, add_special_tokens=False) + [eos[0]])
        plens.append(len(p))
    h, y = entropy_labels(model, params, seqs, plens)
    threshold = fit_threshold(h, y)
    print(f"AdaDec threshold {threshold:.3f} nats from {h.size} positions ({y.mean():.0%} top-1)", flush=True)

    greedy = sampling.make_sampler(temperature=0.0)
    decoders = {
        "greedy": make_decoder("ar", model, params, greedy),
        "beam (W=4)": make_decoder("beam", model, params, greedy),
        "contrastive search (k=4, alpha=0.6)": make_decoder("contrastive", model, params, greedy),
        "CNTP (T=0.8, top-p 0.95)": make_decoder("cntp", model, params, greedy),
        f"AdaDec (threshold {threshold:.2f})": adadec(model, threshold, k=3, lookahead=5),
        "USCD (lame prompt, alpha=0.1)": uscd(model, sampler=greedy),
    }
    uscd_params = with_lame_prompts(model, params, lame, pad_to=64)
    rows, base_s = [], None
    for name, dec in decoders.items():
        p = uscd_params if name.startswith("USCD") else params
        out, secs = timed(dec, p, prompts, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                          eos=eos)
        hyps = [first_line(tok.decode([t for t in r if t not in eos])) for r in out.rows()]
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        tokens, fpt = per_token(out)
        base_s = base_s if base_s is not None else secs / tokens
        rows.append(dict(method=name, bleu=bleu, tokens=tokens, forwards_per_token=fpt,
                         time_per_token_vs_greedy=(secs / tokens) / base_s, example=hyps[0]))
        print(f"{name}: BLEU {bleu:.2f}, {tokens} tokens, {fpt:.2f} forwards/token, {secs:.1f} s", flush=True)

    lines = [
        "## Translation (Spec-Bench German->English): BLEU",
        "",
        f"{len(test)} scored questions (Spec-Bench translation items {args.fit + 1}..{args.fit + len(test)}); "
        f"the first {args.fit} are the fitting split: two of them are each prompt's in-context examples (earlier chat turns), all "
        f"{args.fit} give AdaDec's threshold ({h.size} teacher-forced positions, {y.mean():.0%} of them the "
        f"model's top-1) = **{threshold:.3f} nats**. Chat template, max {args.max_new_tokens} new tokens, batch "
        f"{len(test)}; the answer's first line is scored with sacrebleu's corpus BLEU. USCD's amateur is the "
        "expert on the lame prompt (the same prompt without its two example turns). Forwards per token: target "
        "forward calls (a call runs every row of the method's batch: W beams, CNTP's trials, AdaDec's "
        "lookaheads) over emitted tokens. Time per token is relative to greedy in the same run (2-core CPU).",
        "",
        "| method | BLEU | tokens | forwards / token | time / token vs greedy |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['bleu']:.2f} | {r['tokens']} | {r['forwards_per_token']:.2f} | "
              f"{r['time_per_token_vs_greedy']:.2f}x |" for r in rows]
    lines += ["", "First scored question, each method's answer:", ""]
    lines += [f"- {r['method']}: `{r['example']}`" for r in rows]
    lines += [f"- reference: `{refs[0]}`"]
    return "\n".join(lines) + "\n", dict(threshold=threshold, fit_positions=int(h.size), rows=rows)


def rep_n(seq, n: int) -> float:
    """SimCTG's rep-n of one continuation: 1 - unique n-grams / n-grams."""
    grams = [tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(seqs, n: int) -> float:
    """Distinct-n over all continuations: unique n-grams / n-grams."""
    grams = [tuple(s[i: i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def continuation_ppl(model, params, prefixes: np.ndarray, rows) -> float:
    """Perplexity of the continuations under the model, each given its prefix (teacher-forced)."""
    p = prefixes.shape[1]
    width = p + max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, :p] = prefixes[i]
        tokens[i, p: p + len(r)] = r
        mask[i, p: p + len(r)] = True
    logits = jax.jit(logits_of, static_argnums=0)(model, params, jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1)[..., 0]
    m = jnp.asarray(mask[:, 1:])
    return float(jnp.exp(jnp.sum(nll * m) / jnp.sum(m)))


def degeneration_row(name, model, params, prefixes, rows, secs, calls) -> dict:
    tokens = sum(len(r) for r in rows)
    reps = {n: float(np.mean([rep_n(r, n) for r in rows])) for n in (2, 3, 4)}
    return dict(method=name, tokens=tokens, **{f"rep-{n}": v for n, v in reps.items()},
                **{f"distinct-{n}": distinct_n(rows, n) for n in (2, 3, 4)},
                diversity=float(np.prod([1 - v for v in reps.values()])),
                ppl=continuation_ppl(model, params, prefixes, rows),
                forwards_per_token=calls / max(tokens, 1), seconds=secs)


def wikitext(model, params, tok, args) -> tuple[str, dict]:
    prefixes = wikitext_windows(tok, 32, args.prefixes)
    prompts = [list(map(int, p)) for p in prefixes]
    greedy = sampling.make_sampler(temperature=0.0)
    nucleus = sampling.make_sampler(temperature=1.0, top_p=0.95)
    kw = dict(max_new_tokens=args.new, key=jax.random.key(args.seed), eos=())  # no EOS stop: every continuation is args.new tokens
    methods = {
        "greedy": make_decoder("ar", model, params, greedy),
        "nucleus (p=0.95)": make_decoder("ar", model, params, nucleus),
        "contrastive search (k=4, alpha=0.6)": make_decoder("contrastive", model, params, greedy),
        "momentum (k=5, alpha=0.2)": make_decoder("momentum", model, params, greedy),
    }
    rows = []
    for name, dec in methods.items():
        out, secs = timed(dec, params, prompts, **kw)
        rows.append(degeneration_row(name, model, params, prefixes, out.rows(), secs, int(out.calls.sum())))
        print(f"{name}: {rows[-1]}", flush=True)

    extra = superposed_rows(model, params, prefixes, prompts, rows, args)

    lines = [
        "## Open-ended generation (WikiText-2): degeneration and perplexity",
        "",
        f"{len(prompts)} WikiText-2 test prefixes of 32 tokens, {args.new} new tokens each (no EOS stop), batch "
        f"{len(prompts)}. rep-n: share of repeated n-grams within a continuation (mean over continuations; "
        "SimCTG); distinct-n: unique n-grams over all continuations; diversity = prod_n (1 - rep-n); ppl: "
        "perplexity of the continuations under SmolLM2-135M given their prefixes (human text of WikiText-2 "
        "sits near the model's own perplexity on it; greedy text is far below, degenerate text too).",
        "",
        "| method | rep-2 | rep-3 | rep-4 | distinct-2 | distinct-3 | distinct-4 | diversity | ppl | forwards / token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['rep-2']:.3f} | {r['rep-3']:.3f} | {r['rep-4']:.3f} | {r['distinct-2']:.3f} | "
              f"{r['distinct-3']:.3f} | {r['distinct-4']:.3f} | {r['diversity']:.3f} | {r['ppl']:.2f} | "
              f"{r['forwards_per_token']:.2f} |" for r in rows]
    lines += extra
    return "\n".join(lines) + "\n", dict(rows=rows)


def superposed_rows(model, params, prefixes, prompts, rows, args) -> list[str]:
    """Superposed decoding (registered: k = 3, the authors' configuration, WikiText-2 valid n-grams):
    its top draft and all k drafts as rows of ``rows``; then k drafts from one run against k separate
    nucleus runs (forwards and wall time, same prompts and lengths, this run)."""
    from decodax.methods import method_params
    from decodax.strategies.superposed import generate_drafts

    sp_params = method_params("superposed", model, params)
    dec = make_decoder("superposed", model, params, sampling.make_sampler(temperature=0.0))
    kw = dict(max_new_tokens=args.new, key=jax.random.key(args.seed), eos_ids=(), pad_to=64)
    generate_drafts(dec, sp_params, prompts, budget=1, **kw)
    t0 = time.perf_counter()
    out = generate_drafts(dec, sp_params, prompts, **kw)
    sp_secs = time.perf_counter() - t0
    drafts = out.all_drafts()
    k = len(drafts[0])
    calls = int(out.calls.sum())
    rows.append(degeneration_row(f"superposed (k={k}), top draft", model, params, prefixes, out.rows(), sp_secs,
                                 calls))
    flat = [d for row in drafts for d in row]
    rows.append(degeneration_row(f"superposed (k={k}), all {k} drafts", model, params,
                                 np.repeat(prefixes, k, axis=0), flat, sp_secs, calls))
    # k separate nucleus runs (different keys) for the same k continuations per prefix
    nucleus = make_decoder("ar", model, params, sampling.make_sampler(temperature=1.0, top_p=0.95))
    sep_calls, sep_secs = 0, 0.0
    for i in range(k):
        o, secs = timed(nucleus, params, prompts, max_new_tokens=args.new, key=jax.random.key(args.seed + 1 + i),
                        eos=())
        sep_calls += int(o.calls.sum())
        sep_secs += secs
    print(f"superposed: {calls} forwards, {sp_secs:.1f} s; {k} nucleus runs: {sep_calls} forwards, "
          f"{sep_secs:.1f} s", flush=True)
    return [
        "",
        f"Superposed decoding's cost: {k} drafts of {args.new} tokens for each of {len(prompts)} prefixes from one "
        f"run took {calls} target forwards (rows x steps, prefill included) and {sp_secs:.1f} s; {k} separate "
        f"nucleus runs for the same {k} continuations took {sep_calls} forwards and {sep_secs:.1f} s: "
        f"**{sep_calls / max(calls, 1):.2f}x the forwards, {sep_secs / max(sp_secs, 1e-9):.2f}x the time** "
        "(same prompts, batch and lengths, this run). Superposed rows: the authors' released k = 3 "
        "configuration (alpha 0.54, temperature 0.06, 2..6-gram weights) with WikiText-2 *valid* n-grams; "
        "the all-drafts row pools the k drafts (its ppl is each draft given its prefix).",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="translation,wikitext")
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    ap.add_argument("--fit", type=int, default=20, help="translation questions in the fitting split")
    ap.add_argument("--test", type=int, default=20, help="translation questions scored")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not args.questions.exists():
        print(f"skip: {args.questions} not found")
        return 0
    model, params, tok = load_default()
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, `python experiments/strategy_table.py "
              f"--parts {args.parts}`; {platform.node()}, {jax.devices()[0].platform}.\n\n")
    results = {}
    for part in args.parts.split(","):
        t0 = time.time()
        md, res = {"translation": translation, "wikitext": wikitext}[part](model, params, tok, args)
        results[part] = res
        (args.out / f"{part}.md").write_text(header + md + f"\n({time.time() - t0:.0f} s)\n")
        print(md, flush=True)
    path = args.out / "table.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
