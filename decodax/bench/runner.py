"""Benchmark harness: tokens/s, speedup over autoregressive decoding in the same run, τ."""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from rich.progress import Progress

from decodax.bench.prompts import Prompt
from decodax.decoding.driver import generate, pad_prompts, round_up
from decodax.decoding.state import Decoder


class Run(NamedTuple):
    """One prompt decoded by one method."""

    method: str
    category: str
    qid: str
    tokens: int
    seconds: float
    calls: int
    output: tuple[int, ...]


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a user message, wrapped in the chat template when ``chat``."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def bench_decoders(
    decoders: dict[str, Decoder],
    params,
    prompts: Sequence[Prompt],
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    key=None,
    pad_to: int = 64,
    batch: int = 1,
    progress: Progress | None = None,
    method_params: dict | None = None,
) -> list[Run]:
    """Decode every prompt with every method, ``batch`` consecutive prompts per call
    (ragged); compilation is excluded from timings. ``method_params`` gives some
    methods other params than ``params`` (e.g. the same weights unpacked).

    Prompts are padded to a multiple of ``pad_to`` and the cache capacity is a
    function of that width only, so each (method, width) compiles once; a
    one-token warm-up call with the same shapes compiles before the timed call.
    With ``batch > 1`` each row is credited an equal share of its call's time,
    so tokens/s is the batch throughput.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    key = jax.random.key(0) if key is None else key
    runs: list[Run] = []
    warmed: set[tuple[str, int, int]] = set()
    task = progress.add_task("bench", total=len(decoders) * len(prompts)) if progress else None
    groups = [range(i, min(i + batch, len(prompts))) for i in range(0, len(prompts), batch)]
    for name, decoder in decoders.items():
        params_m = (method_params or {}).get(name, params)
        for group in groups:
            ids = [list(encoded[i]) for i in group]
            width = pad_prompts(ids, pad_to=pad_to)[0].shape[1]
            capacity = round_up(width + max_new_tokens + decoder.max_step_tokens, 128)
            kwargs = dict(max_new_tokens=max_new_tokens, key=key, capacity=capacity, pad_to=pad_to)
            if (name, width, len(ids)) not in warmed:
                generate(decoder, params_m, ids, budget=1, **kwargs)
                warmed.add((name, width, len(ids)))
            t0 = time.perf_counter()
            out = generate(decoder, params_m, ids, **kwargs)
            seconds = time.perf_counter() - t0
            for row, i in enumerate(group):
                runs.append(Run(name, prompts[i].category, prompts[i].qid, int(out.lengths[row]),
                                seconds / len(ids), int(out.calls[row]), tuple(out.rows()[row])))
            if progress:
                progress.update(task, advance=len(ids), description=f"{name} · {prompts[group[0]].category}")
    return runs


def bench_callable(
    name: str,
    fn: Callable[[list[int]], tuple[list[int], int]],
    prompts: Sequence[Prompt],
    encoded: Sequence[Sequence[int]],
    progress: Progress | None = None,
) -> list[Run]:
    """Time an external generator (e.g. HF transformers); ``fn(ids) -> (new_ids, forwards)``."""
    fn(list(encoded[0]))  # warm-up
    runs = []
    task = progress.add_task(name, total=len(prompts)) if progress else None
    for prompt, ids in zip(prompts, encoded):
        t0 = time.perf_counter()
        out, calls = fn(list(ids))
        seconds = time.perf_counter() - t0
        runs.append(Run(name, prompt.category, prompt.qid, len(out), seconds, calls, tuple(out)))
        if progress:
            progress.update(task, advance=1)
    return runs


class Summary(NamedTuple):
    method: str
    category: str
    tokens: int
    tokens_per_s: float
    speedup: float
    tau: float


def summarize(runs: Sequence[Run], baseline: str = "ar") -> list[Summary]:
    """Per (method, category) and overall: tokens/s, speedup over ``baseline``, τ."""
    cats = sorted({r.category for r in runs})

    def agg(method, cat):
        sel = [r for r in runs if r.method == method and (cat == "all" or r.category == cat)]
        toks = sum(r.tokens for r in sel)
        secs = sum(r.seconds for r in sel)
        calls = sum(r.calls for r in sel)
        return toks, (toks / secs if secs else float("nan")), (toks / calls if calls else float("nan"))

    out = []
    methods = list(dict.fromkeys(r.method for r in runs))
    for cat in cats + ["all"]:
        base = agg(baseline, cat)[1] if baseline in methods else float("nan")
        for m in methods:
            toks, tps, tau = agg(m, cat)
            out.append(Summary(m, cat, toks, tps, tps / base if base else float("nan"), tau))
    return out


def to_markdown(summary: Sequence[Summary], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| category | method | tokens | tokens/s | speedup | τ |", "|---|---|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            f"| {s.category} | {s.method} | {s.tokens} | {s.tokens_per_s:.2f} | "
            f"{s.speedup:.2f}x | {s.tau:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_speedup(summary: Sequence[Summary], path: str) -> None:
    """Bar chart of speedup per category and method (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(dict.fromkeys(s.category for s in summary))
    methods = list(dict.fromkeys(s.method for s in summary))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats)), 3.5))
    for i, m in enumerate(methods):
        vals = [next((s.speedup for s in summary if s.method == m and s.category == c), np.nan)
                for c in cats]
        ax.bar(np.arange(len(cats)) + i * width, vals, width, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(cats)) + width * (len(methods) - 1) / 2, cats, rotation=30, ha="right")
    ax.set_ylabel("speedup vs autoregressive")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
