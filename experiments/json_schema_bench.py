"""JSON-schema bench: on-device constrained decoding with SmolLM2-135M (JSONSchemaBench schemas).

Over the first ``--n`` schemas of ``../shared/data/jsonschemabench/schemas.jsonl``
(40 by default: a 2-core CPU run; pass ``--n 0`` for all), with the default model:

* compile every schema to a token automaton (outlines-core's regex + index, packed
  into device tables, :func:`decodax.constrained.compile_json_schema`): coverage and
  the failures grouped by reason, compile time (median, p90);
* decode greedily with a short instruction plus the schema in the chat template
  (``decodax.bench.runner.encode_prompt``), ``--max-new-tokens`` tokens, four ways on
  the same prompts: unconstrained / constrained autoregressive, unconstrained /
  constrained speculative (prompt lookup, :func:`decodax.constrained.speculative.
  constrained_speculative`); tokens/s of each (compilation excluded: a warm-up call
  with ``budget=1`` per new compiled shape), hence the per-token overhead of the mask;
* validate every constrained output with ``jsonschema`` (outputs that hit max tokens
  are counted apart: they are unfinished, not invalid) and check that constrained
  speculative greedy emits exactly the constrained autoregressive tokens.

Writes ``experiments/results/constrained/json_schema_bench.md``; skips cleanly when the
data file is missing.

    python experiments/json_schema_bench.py --n 40 --max-new-tokens 96  # --compile-timeout 30
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing
import platform
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "jsonschemabench" / "schemas.jsonl"
OUT = ROOT / "experiments" / "results" / "constrained" / "json_schema_bench.md"
INSTRUCTION = "Reply with only a JSON value (no prose, no code fence) that follows this JSON schema:\n"


def reason_of(e: Exception) -> str:
    """A short group key for a compile failure."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)  # quoted names differ between schemas
    msg = re.sub(r"\d+", "N", msg)
    return f"{type(e).__name__}: {msg[:110]}"


def _compile(schema, vocab, whitespace):
    """(automaton, seconds) or (None, failure reason); runs in the worker process."""
    from decodax.constrained import compile_json_schema

    t0 = time.perf_counter()
    try:
        c = compile_json_schema(schema, vocab, whitespace=whitespace, state_bucket=128, class_bucket=128)
    except Exception as e:  # noqa: BLE001 -- every failure is reported, grouped by reason
        return None, reason_of(e)
    return c, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--n", type=int, default=40, help="first N schemas (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=8, help="speculative draft length")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--whitespace", default=r"[ ]?",
                    help="whitespace regex between JSON tokens (outlines-core's default allows runs of it, "
                         "which a greedy small model can repeat until max tokens)")
    ap.add_argument("--max-prompt", type=int, default=896, help="skip schemas whose prompt is longer (tokens)")
    ap.add_argument("--compile-timeout", type=float, default=30.0, help="seconds per schema compile")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not args.data.exists():
        print(f"skip: {args.data} not found")
        return 0

    import jsonschema

    from decodax.bench.runner import encode_prompt
    from decodax.constrained import TokenVocabulary, constrained, with_constraint
    from decodax.constrained.speculative import constrained_speculative
    from decodax.decoding import autoregressive, generate
    from decodax.decoding.driver import round_up
    from decodax.model.default import load_default
    from decodax.speculative import prompt_lookup, speculative

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.n:
        rows = rows[: args.n]
    model, params, tok = load_default()
    vocab = TokenVocabulary.from_tokenizer(tok, vocab_size=model.config.vocab_size)
    eos = tuple(tok.eos_ids)
    drafter = prompt_lookup(ngram=args.ngram)
    decoders = {
        "ar": autoregressive(model),
        "ar+mask": None,  # built per automaton below (memoised: one decoder)
        "spec": speculative(model, drafter, k=args.k),
        "spec+mask": None,
    }
    t_start = time.time()

    # ---- compile every schema (in a forked worker, so that a schema whose index blows up
    # can be stopped after --compile-timeout seconds and reported)
    compiled, failures, compile_s = [], collections.Counter(), []
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(1)
    for r in rows:
        job = pool.apply_async(_compile, (r["schema"], vocab, args.whitespace))
        try:
            c, seconds_or_error = job.get(timeout=args.compile_timeout)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pool = ctx.Pool(1)
            failures[f"timeout: index not built within {args.compile_timeout:.0f} s"] += 1
            print(f"compile timeout: {r['id']}", flush=True)
            continue
        if c is None:
            failures[seconds_or_error] += 1
            continue
        compile_s.append(seconds_or_error)
        compiled.append((r, c))
    pool.terminate()
    print(f"compiled {len(compiled)}/{len(rows)} schemas in {sum(compile_s):.1f} s", flush=True)

    def write_report(done: int) -> None:
        """The report so far (rewritten after every schema, so a stopped run leaves its partial table)."""
        n_dec = stats["decoded"]
        tps = {n: tokens[n] / max(seconds[n], 1e-9) for n in decoders}
        cs = np.asarray(compile_s) if compile_s else np.zeros(1)
        lines = [
            "# JSON-schema bench: on-device constrained decoding (SmolLM2-135M-Instruct)",
            "",
            f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, `{' '.join(sys.argv)}`; {platform.node()}, "
            f"{jax.devices()[0].platform}, {len(jax.devices())} device(s); {time.time() - t_start:.0f} s in all.",
            f"First {len(rows)} schemas of `jsonschemabench/schemas.jsonl` (N = {len(rows)}: the machine is a "
            f"2-core CPU; `--n 0` runs all {sum(1 for _ in args.data.open())}). Greedy, max_new_tokens = "
            f"{args.max_new_tokens}, batch 1, prompt = instruction + schema in the chat template. Whitespace "
            f"between JSON tokens: `{args.whitespace}`. Speculative: prompt lookup (ngram {args.ngram}), k = {args.k}.",
            "" if done == len(compiled) else f"**Partial run: decoding stopped after {done} of the {len(compiled)} "
            "compiled schemas** (compile figures cover all of them).",
            "",
            "| metric | value |",
            "|---|---|",
            f"| schemas compiled | {len(compiled)} / {len(rows)} ({100 * len(compiled) / max(len(rows), 1):.0f}%) |",
            f"| compile time (schema -> host tables, of those compiled), median / p90 / max | {np.median(cs) * 1e3:.0f} / "
            f"{np.percentile(cs, 90) * 1e3:.0f} / {cs.max() * 1e3:.0f} ms |",
            f"| decoded (compiled, prompt <= {args.max_prompt} tokens) | {n_dec} |",
        ]
        for name in ("ar+mask", "spec+mask"):
            fin = stats[f"{name} valid"] + stats[f"{name} invalid"]
            lines.append(f"| {name}: valid under `jsonschema` / finished (EOS) | {stats[f'{name} valid']} / {fin} "
                         f"({100 * stats[f'{name} valid'] / max(fin, 1):.0f}%); hit max tokens: "
                         f"{stats[f'{name} max_tokens']} |")
        lines += [
            f"| constrained speculative greedy == constrained autoregressive greedy | "
            f"{stats['spec+mask == ar+mask']} / {n_dec} |",
            "",
            "Tokens/s below exclude the prefill: each run's time minus that of a `budget=1` run (prefill "
            "and first token) of the same compiled program, over the tokens after the first.",
            "",
            "| decoding | tokens | tokens/s | tokens / target forward | tokens/s vs unconstrained |",
            "|---|---|---|---|---|",
        ]
        for name, base in (("ar", "ar"), ("ar+mask", "ar"), ("spec", "spec"), ("spec+mask", "spec")):
            lines.append(f"| {name} | {tokens[name]} | {tps[name]:.1f} | {tokens[name] / max(calls[name], 1):.2f} | "
                         f"{tps[name] / max(tps[base], 1e-9):.3f} |")
        lines += [
            "",
            f"Mask overhead per token (autoregressive): {100 * (tps['ar'] / max(tps['ar+mask'], 1e-9) - 1):+.1f}%; "
            f"with speculative decoding: {100 * (tps['spec'] / max(tps['spec+mask'], 1e-9) - 1):+.1f}% "
            "(tokens/s of the same prompts and max tokens, measured in this run; the constrained and "
            "unconstrained outputs differ, so tokens/s, not wall time, is compared).",
            "",
            "Compile failures by reason:",
            "",
        ]
        lines += [f"- {n} x {reason}" for reason, n in failures.most_common()] or ["- none"]
        if stats["skipped_long_prompt"]:
            lines.append(f"- (not a compile failure) {stats['skipped_long_prompt']} compiled schemas skipped: prompt "
                         f"longer than {args.max_prompt} tokens")
        lines += ["", "Example constrained outputs:", ""]
        lines += [f"- `{sid}`: `{text}`" for sid, text in examples]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    # ---- decode
    seen: set = set()
    tokens = collections.Counter()
    seconds = collections.Counter()
    calls = collections.Counter()
    stats = collections.Counter()
    examples = []
    for i, (r, c) in enumerate(compiled):
        prompt = encode_prompt(tok, INSTRUCTION + json.dumps(r["schema"]))
        if len(prompt) > args.max_prompt:
            stats["skipped_long_prompt"] += 1
            continue
        # one cache capacity and few prompt widths for every schema: few compilations
        capacity = round_up(args.max_prompt + args.max_new_tokens + args.k + 1, 256)
        decs = dict(decoders)
        decs["ar+mask"] = constrained(model, c)
        decs["spec+mask"] = constrained_speculative(model, drafter, c, k=args.k)
        outs = {}
        for name, dec in decs.items():
            p = with_constraint(params, c) if name.endswith("mask") else params
            shape = (name, c.tables.mask.shape, c.tables.next_class.shape, round_up(len(prompt), 128), capacity)
            kw = dict(max_new_tokens=args.max_new_tokens, eos_ids=eos, capacity=capacity, pad_to=128)
            if shape not in seen:  # compile outside the timing
                seen.add(shape)
                generate(dec, p, [prompt], budget=1, **kw)
            # per-token time: the full run minus the prefill (+ first token) run of the same program
            t0 = time.perf_counter()
            generate(dec, p, [prompt], budget=1, **kw)
            t1 = time.perf_counter()
            out = generate(dec, p, [prompt], **kw)
            seconds[name] += max((time.perf_counter() - t1) - (t1 - t0), 0.0)
            tokens[name] += int(out.lengths[0]) - 1
            calls[name] += int(out.calls[0])
            outs[name] = out.rows()[0]
        for name in ("ar+mask", "spec+mask"):
            row = outs[name]
            if not row or row[-1] not in eos:
                stats[f"{name} max_tokens"] += 1
                continue
            text = tok.decode(row[:-1])
            try:
                jsonschema.validate(json.loads(text), r["schema"])
                stats[f"{name} valid"] += 1
            except Exception as e:  # noqa: BLE001
                stats[f"{name} invalid"] += 1
                print(f"INVALID {r['id']} ({name}): {text!r}: {str(e).splitlines()[0]}", flush=True)
        stats["spec+mask == ar+mask"] += outs["spec+mask"] == outs["ar+mask"]
        stats["decoded"] += 1
        if len(examples) < 3:
            examples.append((r["id"], tok.decode([t for t in outs["ar+mask"] if t not in eos])))
        print(f"[{i + 1}/{len(compiled)}] {r['id']}: " + ", ".join(
            f"{n} {tokens[n] / max(seconds[n], 1e-9):.1f} tok/s" for n in decs), flush=True)
        write_report(i + 1)

    write_report(len(compiled))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
