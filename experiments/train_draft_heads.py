"""Train Medusa and Hydra heads on SmolLM2-135M by self-distillation, then evaluate them.

1. Prompts that are not Spec-Bench questions: instructions (summarize, explain,
   ask questions about, continue) over WikiText-2 *validation* passages
   (``../shared/data/wikitext-2/valid.txt``), chat template as in the bench.
2. The target writes ``--new-tokens`` greedy tokens for each (decodax itself);
   a teacher-forced forward gives its last hidden states. Greedy generations
   make the labels the target's own argmax predictions (self-distillation).
3. Heads are trained with the shared trainer (AdamW, warmup + cosine, orbax
   checkpoints every ``--save-every`` steps under ``<out>/<name>/train``, a
   rerun resumes), the frozen base contributing the final norm and LM head.
4. Per-head top-1 accuracy on held-out passages' generations, written to
   ``experiments/results/draft_heads/``; the heads are saved with
   ``decodax.heads.save_heads`` to ``<out>/<name>`` where ``decodax bench
   --methods medusa,hydra`` loads them. The generations are cached in
   ``<out>/heads_data_*.npz`` (greedy, so a rerun would produce the same).

    .venv/bin/python experiments/train_draft_heads.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import decodax
from decodax.bench.runner import encode_prompt
from decodax.decoding import autoregressive, generate
from decodax.heads import DraftHeads, head_batches, head_loss, head_optimizer, save_heads
from decodax.kernels import unpack
from decodax.model import cache as kv
from decodax.train import Checkpoints, create_state, fit, make_train_step

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
INSTRUCTIONS = [
    "Summarize the following passage in a few sentences.",
    "Explain the main point of this text in simple words.",
    "Write three questions that this passage answers, with their answers.",
    "List the key facts in this text.",
    "Continue this text with one more paragraph.",
]


def passages(path: Path, n: int, words: int = 90) -> list[str]:
    """The first ``n`` paragraphs of >= ``words`` words, detokenized and cut to ``words`` words."""
    if not path.exists():
        raise SystemExit(f"{path} not found: the WikiText-2 data is needed (see ../shared/data/README.md)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("=") or len(line.split()) < words:
            continue
        text = re.sub(r" @(.)@ ", r"\1", line).replace("<unk>", "something")
        text = re.sub(r" ([,.;:!?)'])", r"\1", text).replace("( ", "(")
        out.append(" ".join(text.split()[:words]))
        if len(out) == n:
            break
    return out


def generations(model, params, tok, texts: list[str], new_tokens: int, batch: int):
    """The target's greedy answers to the instruction prompts: (prompt + answer token lists,
    prompt lengths)."""
    prompts = [encode_prompt(tok, f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{t}", chat=True)
               for i, t in enumerate(texts)]
    dec = autoregressive(model)
    seqs, starts = [], []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        out = generate(dec, params, group, max_new_tokens=new_tokens, pad_to=64)
        for p, row in zip(group, out.rows()):
            seqs.append(list(p) + row)
            starts.append(len(p))
    return seqs, starts


def make_dataset(model, params, tok, texts: list[str], new_tokens: int, window: int, batch: int):
    """Greedy generations and the target's hidden states over the last ``window`` positions."""
    seqs, starts = generations(model, params, tok, texts, new_tokens, batch)
    fwd = jax.jit(lambda p, x, c: model.apply(p, x, jnp.arange(x.shape[1])[None], c, empty_cache=True,
                                              compute_logits=False).hidden)
    tokens = np.zeros((len(seqs), window), np.int32)
    mask = np.zeros((len(seqs), window), np.float32)
    hidden = np.zeros((len(seqs), window, model.config.dim), np.float32)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        width = -(-len(s) // 64) * 64  # pad to a multiple of 64: few compilations
        x = np.zeros((1, width), np.int32)
        x[0, : len(s)] = s
        h = np.asarray(fwd(params, jnp.asarray(x), kv.init_cache(model.config, 1, width)))[0]
        lo = max(0, len(s) - window)
        n = len(s) - lo
        tokens[i, :n], hidden[i, :n] = s[lo:], h[lo : len(s)]
        mask[i, max(0, start - lo) : n] = 1.0
    return {"hidden": hidden, "tokens": tokens, "mask": mask}


def evaluate(model, base, heads, head_params, data) -> dict[str, float]:
    loss = jax.jit(head_loss(model, heads))
    _, m = loss({"heads": head_params, "base": base}, {k: jnp.asarray(v) for k, v in data.items()}, None)
    return {k: float(v) for k, v in m.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-passages", type=int, default=96)
    ap.add_argument("--eval-passages", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--heads", default="medusa,hydra")
    ap.add_argument("--out", default=str(ROOT / "checkpoints"))
    ap.add_argument("--results", default=str(ROOT / "results" / "draft_heads"))
    args = ap.parse_args()

    t0 = time.time()
    model, params, tok = decodax.load_default()
    texts = passages(DATA, args.train_passages + args.eval_passages)
    window = args.new_tokens + 8
    cache = Path(args.out) / f"heads_data_{len(texts)}x{args.new_tokens}.npz"
    if cache.exists():  # generations are deterministic (greedy): reuse them
        data = dict(np.load(cache))
    else:
        data = make_dataset(model, params, tok, texts, args.new_tokens, window, batch=8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    train = {k: v[: args.train_passages] for k, v in data.items()}
    held = {k: v[args.train_passages :] for k, v in data.items()}
    print(f"data: {len(texts)} generations ready in {time.time() - t0:.0f} s")
    flat = unpack({k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params})
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in [h.strip() for h in args.heads.split(",") if h.strip()]:
        heads = DraftHeads(model.config.dim, num_heads=args.num_heads, hydra=name == "hydra")
        state = create_state({"heads": heads.init(), "base": flat}, head_optimizer(args.lr, args.steps),
                             jax.random.key(0))
        ckpt = Checkpoints(Path(args.out) / name / "train", save_every=args.save_every, keep=2)
        t1 = time.time()
        state, hist = fit(state, make_train_step(head_loss(model, heads)), head_batches(train, args.batch),
                          args.steps, checkpoints=ckpt, log_path=results_dir / f"{name}_train.jsonl")
        ckpt.close()
        seconds = time.time() - t1
        before = evaluate(model, flat, heads, heads.init(), held)
        after = evaluate(model, flat, heads, state.params["heads"], held)
        save_heads(Path(args.out) / name, heads, state.params["heads"],
                   info={"steps": args.steps, "train_passages": args.train_passages})
        report[name] = {"train_seconds": seconds, "steps_run": len(hist), "held_out_before": before,
                        "held_out_after": after}
        print(name, json.dumps(report[name]))
    (results_dir / "heads.json").write_text(json.dumps(report, indent=1))
    lines = ["# Medusa / Hydra heads: held-out top-1 accuracy (self-distillation on WikiText-2 valid prompts)",
             "", f"{args.train_passages} training / {args.eval_passages} held-out generations of "
             f"{args.new_tokens} greedy tokens; {args.steps} steps of {args.batch} sequences; "
             f"jax {jax.__version__} on {jax.devices()[0].platform}", "",
             "| heads | " + " | ".join(f"head {k} (x_t+{k + 2})" for k in range(args.num_heads)) + " |",
             "|---|" + "---:|" * args.num_heads]
    for name, r in report.items():
        for when in ("before", "after"):
            acc = r[f"held_out_{when}"]
            lines.append(f"| {name} ({when} training) | "
                         + " | ".join(f"{acc.get(f'acc{k}', float('nan')):.3f}" for k in range(args.num_heads)) + " |")
    (results_dir / "heads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
