"""Command line: ``decodax generate "prompt"`` and ``decodax bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
from rich.console import Console
from rich.progress import Progress

console = Console()


def _sampler(args):
    from decodax import sampling

    return sampling.make_sampler(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
    )


def cmd_generate(args) -> int:
    from decodax.bench.runner import encode_prompt
    from decodax.decoding import generate
    from decodax.methods import make_decoder, method_params
    from decodax.model.default import load_default

    sampler = _sampler(args)
    model, params, tok = load_default(packed=args.weights == "packed")
    params = method_params(args.method, model, params)
    ids = encode_prompt(tok, args.prompt, chat=not args.no_chat)
    decoder = make_decoder(args.method, model, params, sampler)
    t0 = time.perf_counter()
    out = generate(decoder, params, [ids], max_new_tokens=args.max_new_tokens,
                   key=jax.random.key(args.seed))
    seconds = time.perf_counter() - t0
    new = out.rows()[0]
    console.print(tok.decode(new, skip_special_tokens=True))
    console.print(
        f"[dim]{len(new)} tokens · {out.calls[0]} target forwards · τ={out.tau[0]:.2f} · "
        f"{seconds:.1f} s including compilation · method={args.method}[/dim]"
    )
    return 0


def cmd_bench(args) -> int:
    from decodax.bench import hf as hf_bench
    from decodax.bench.prompts import load_questions
    from decodax.bench.runner import (bench_callable, bench_decoders, encode_prompt, plot_speedup,
                                      summarize, to_markdown)
    from decodax.bench.step_cost import step_cost_markdown, step_costs
    from decodax.kernels import unpack
    from decodax.methods import make_decoder, method_params
    from decodax.model.default import default_model_path, load_default

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, params, tok = load_default(packed=args.weights == "packed")
    if args.kv_caches:
        return _bench_kv_caches(args, model, params, tok, out_dir)
    prompts = load_questions(args.questions, args.limit)
    encoded = [encode_prompt(tok, p.text, chat=not args.no_chat) for p in prompts]
    sampler = _sampler(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ar" not in names:
        names.insert(0, "ar")
    decoders = {n: make_decoder(n, model, params, sampler) for n in names}
    weights = {args.weights: params}
    if args.float32_baseline and args.weights == "packed":
        weights["float32"] = unpack(params)
        decoders["ar-f32"] = decoders["ar"]
    report = [f"# decodax bench\n\nmodel: {Path(default_model_path()).name} ({args.weights} weights, "
              f"float32 math{'; ar-f32: the same weights as float32 arrays' if 'ar-f32' in decoders else ''}) · "
              f"{len(prompts)} prompts · batch {args.batch} · max_new_tokens={args.max_new_tokens} · "
              f"jax {jax.__version__} on {jax.devices()[0].platform}\n"]
    with Progress(console=console, transient=True) as progress:
        runs = bench_decoders(decoders, params, prompts, encoded, batch=args.batch,
                              max_new_tokens=args.max_new_tokens, progress=progress,
                              method_params={**{n: method_params(n, model, params) for n in names},
                                             "ar-f32": weights.get("float32")})
        if args.compare_hf:
            hf_model = hf_bench.load_hf(default_model_path())
            eos = model.config.eos_ids
            runs += bench_callable("hf-greedy", hf_bench.hf_generator(
                hf_model, args.max_new_tokens, eos), prompts, encoded, progress)
            runs += bench_callable("hf-prompt-lookup", hf_bench.hf_generator(
                hf_model, args.max_new_tokens, eos, prompt_lookup=10), prompts, encoded, progress)
    summary = summarize(runs, baseline="ar")
    table = to_markdown(summary, "tokens/s, speedup over `ar` (same run), τ = tokens per target forward")
    report.append(table)
    if args.step_costs:
        for fmt, p in weights.items():
            costs = step_costs(model, p)
            report.append(f"\n### decode-step cost curve, {fmt} weights (one forward of T new tokens)\n\n")
            report.append(step_cost_markdown(costs))
            report.append(f"\ncost(8)/cost(1) = {costs[8] / costs[1]:.2f}\n")
    text = "\n".join(report)
    (out_dir / "bench.md").write_text(text)
    plot_speedup([s for s in summary if s.category != "all"], str(out_dir / "speedup.png"))
    console.print(text)
    console.print(f"[dim]wrote {out_dir / 'bench.md'} and {out_dir / 'speedup.png'}[/dim]")
    return 0


def _bench_kv_caches(args, model, params, tok, out_dir: Path) -> int:
    """``decodax bench --kv-caches``: WikiText-2 perplexity over compressed KV caches (paired with float)."""
    from decodax.bench.kv_cache import kv_cache_markdown, kv_cache_table, wikitext_windows

    names = [n.strip() for n in args.kv_caches.split(",") if n.strip()]
    windows = wikitext_windows(tok, args.context, args.kv_windows)
    calib = wikitext_windows(tok, args.context, 1, split="valid")
    prefill = args.context // 2
    with console.status("KV caches") as status:
        rows = kv_cache_table(model, params, windows, names, prefill=prefill, calibration=calib,
                              progress=lambda name: status.update(f"KV cache {name}"))
    text = (f"# decodax bench --kv-caches\n\nWikiText-2 test, {len(windows)} windows of {args.context} tokens, "
            f"the last {args.context - prefill} of each scored over the cache (chunks of 32); KVQuant calibrated "
            f"on WikiText-2 valid. jax {jax.__version__} on {jax.devices()[0].platform}\n\n" + kv_cache_markdown(rows))
    (out_dir / "kv_cache.md").write_text(text)
    console.print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decodax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def sampling_flags(sp, temperature):
        sp.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        sp.add_argument("--top-k", type=int, default=None)
        sp.add_argument("--top-p", type=float, default=None)
        sp.add_argument("--min-p", type=float, default=None)
        sp.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
        sp.add_argument("--weights", choices=("packed", "float32"), default="packed",
                        help="packed: GGUF Q4_1/Q8_0 blocks dequantized in the kernel (same results, faster)")

    g = sub.add_parser("generate", help="generate a continuation with the default model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--method", default="ar")
    sampling_flags(g, 0.0)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmark methods on Spec-Bench-format prompts")
    b.add_argument("--questions", default=None,
                   help="Spec-Bench JSONL (default ../shared/data/spec_bench/questions.jsonl if present)")
    b.add_argument("--limit", type=int, default=13)
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--methods", default="ar", help="comma-separated method names")
    b.add_argument("--out", default="experiments/results/bench")
    b.add_argument("--batch", type=int, default=1, help="prompts per call (ragged batch); tokens/s = throughput")
    b.add_argument("--compare-hf", action="store_true", help="add HF transformers rows (batch 1)")
    b.add_argument("--step-costs", action="store_true", help="add the T=1..16 step-cost curve")
    b.add_argument("--kv-caches", default=None,
                   help="KV-cache mode: comma-separated caches (int8,int4,kivi4,kivi2,kvquant4,kvquant3,kvquant2,"
                        "gear4,gear2); WikiText-2 perplexity vs the float cache, bytes per token")
    b.add_argument("--kv-windows", type=int, default=4, help="KV-cache mode: WikiText-2 windows")
    b.add_argument("--context", type=int, default=1024, help="KV-cache mode: window length")
    b.add_argument("--float32-baseline", action="store_true",
                   help="with packed weights: add an `ar-f32` row (the same weights as float32 arrays)")
    sampling_flags(b, 0.0)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
