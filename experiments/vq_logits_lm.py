"""VQ-Logits vs the full softmax: the same small decodax LM trained twice on WikiText-2.

VQ-Logits (Shao et al. 2025, "VQ-Logits: Compressing the Output Bottleneck of Large Language
Models via Vector Quantized Logits", arXiv:2505.10202) replaces the ``V x d`` output embedding by
a ``K x d`` codebook and a token -> code map; the code logits are scattered to the vocabulary and
normalised by the ordinary softmax (:mod:`decodax.quantizers.vq_logits`). This script trains one
small LLaMA-style decodax ``Model`` from the same init seed, on the same batches, for the same
steps, once with a full-softmax output layer over the tokenizer's vocabulary (an untied
``lm_head``, ``V x d``) and once per VQ-Logits configuration (``K`` codes x map), and reports
WikiText-2 test perplexity, the output layer's parameter count and the training throughput.

Data. The shared WikiText-2 copy ships only ``valid.txt`` and ``test.txt`` (no train split), so
the model trains on ``valid.txt`` (its last ``--dev-frac`` held out as a dev set that picks the
checkpoint: the test ppl reported is at the best-dev evaluation, the last step's is shown too)
and is scored on the whole ``test.txt``: non-overlapping windows of ``--context`` predicted
tokens, every test token after the first scored once with its in-window context.

Token -> code maps (``--maps``):

* ``smollm2``: k-means of the output (tied) embeddings of the pretrained SmolLM2-135M, whose
  tokenizer is the one used here -- the paper's initialisation by clustering a trained model's
  output embeddings, computed once in ``--tokenize-to`` (Forgy seeding + Lloyd over the 576-d
  rows, see :func:`decodax.quantizers.vq_logits.from_embeddings`); codebook initialised randomly.
* ``baseline``: k-means (k-means++) of the ``lm_head`` of the full-softmax run trained here (its
  best-dev checkpoint); the codebook starts at the centroids, the rest from the same init seed.
  (Two-stage: this variant has seen the baseline's training.)
* ``random``: a balanced random assignment (control).

Two stages, because the GPU machine has neither the GGUF nor the data:

    # here (tokenizer + SmolLM2 embeddings): WikiText-2 -> token arrays + k-means maps
    python experiments/vq_logits_lm.py --tokenize-to .cache_tokens
    # anywhere (no tokenizer needed): train, evaluate, write table.md / table.json
    python experiments/vq_logits_lm.py --tokens .cache_tokens            # full (GPU)
    python experiments/vq_logits_lm.py --tokens .cache_tokens --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decodax.model.cache import init_cache
from decodax.model.config import ModelConfig
from decodax.model.transformer import Model, param_count, rms_norm
from decodax.quantizers import vq_logits
from decodax.train import create_state, make_train_step

OUT = Path(__file__).resolve().parent / "results" / "vq_logits"
WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
DEFAULT_CODES = "256,1024,4096"

FULL = dict(dim=256, layers=4, heads=4, kv_heads=4, hidden=704, context=256, batch=16, steps=800,
            eval_every=50, lr=1e-3, warmup=50, codes="1024,4096", maps="smollm2,baseline,random",
            test_tokens=0, dev_tokens=0, eval_batch=32, time_limit=210.0)
TINY = dict(dim=64, layers=2, heads=2, kv_heads=2, hidden=192, context=64, batch=4, steps=40,
            eval_every=20, lr=3e-3, warmup=5, codes="256", maps="smollm2,baseline,random",
            test_tokens=4096, dev_tokens=2048, eval_batch=8, time_limit=0.0)


# --------------------------------------------------------------------------- tokenization

def tokenize_to(out_dir: Path, args) -> None:
    """WikiText-2 valid/test -> ``train.npy`` (valid) / ``test.npy`` (uint16), the SmolLM2
    k-means maps ``map_smollm2_K{K}.npy`` (uint16) and ``meta.json``."""
    from decodax.model.default import load_default

    root = Path(args.wikitext)
    _, params, tok = load_default(packed=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": "SmolLM2-135M-Instruct (GGUF, decodax.model.default)", "vocab_size": int(tok.vocab_size),
            "dtype": "uint16", "splits": {}, "maps": {}}
    if tok.vocab_size > 65536:
        raise ValueError(f"vocab {tok.vocab_size} does not fit uint16")
    for split, src in (("train", "valid.txt"), ("test", "test.txt")):
        text = (root / src).read_text()
        ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int64)
        np.save(out_dir / f"{split}.npy", ids.astype(np.uint16))
        meta["splits"][split] = {"source": f"wikitext-2/{src}", "tokens": int(ids.size)}
        print(f"{split}: {src} -> {ids.size} tokens", flush=True)
    emb = np.asarray(params["embed"], np.float32)
    if emb.shape[0] != tok.vocab_size:
        raise ValueError(f"embedding rows {emb.shape[0]} != vocab {tok.vocab_size}")
    for k in (int(c) for c in args.codes.split(",")):
        t0 = time.time()
        _, m = vq_logits.from_embeddings(jax.random.key(args.seed), emb, k, iters=args.map_iters, init="random")
        m = np.asarray(m)
        np.save(out_dir / f"map_smollm2_K{k}.npy", m.astype(np.uint16))
        meta["maps"][str(k)] = {"source": "k-means of SmolLM2-135M output embeddings (576-d)", "init": "random (Forgy)",
                                "iters": args.map_iters, "seed": args.seed, **map_stats(m, k)}
        print(f"map K={k}: {time.time() - t0:.0f} s, {meta['maps'][str(k)]}", flush=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def map_stats(m: np.ndarray, k: int, targets: np.ndarray | None = None) -> dict:
    """Codes used, the largest code, and (given ``targets``) ``E[log n_M(t)]`` over them: tokens
    sharing a code share its probability, so this is the NLL a VQ-Logits head pays on top of the
    code's NLL (the gap to a full softmax that predicted codes equally well)."""
    n = np.bincount(np.asarray(m), minlength=k)
    out = {"codes_used": int((n > 0).sum()), "max_tokens_per_code": int(n.max())}
    if targets is not None:
        out["within_code_nll"] = float(np.mean(np.log(n[np.asarray(m)[targets]])))
    return out


# --------------------------------------------------------------------------- data

def load_tokens(d: Path, args):
    meta = json.loads((d / "meta.json").read_text())
    train_all = np.load(d / "train.npy").astype(np.int32)
    test = np.load(d / "test.npy").astype(np.int32)
    n_dev = int(len(train_all) * args.dev_frac)
    train, dev = train_all[: len(train_all) - n_dev], train_all[len(train_all) - n_dev :]
    if args.test_tokens:
        test = test[: args.test_tokens + 1]
    if args.dev_tokens:
        dev = dev[: args.dev_tokens + 1]
    return meta, train, dev, test


def windows(stream: np.ndarray, t: int) -> np.ndarray:
    """Non-overlapping ``[n, t + 1]`` windows (stride ``t``): each token after the first is a
    target exactly once, with its in-window context."""
    n = (len(stream) - 1) // t
    if n < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than one window of {t + 1}")
    return stream[np.arange(n)[:, None] * t + np.arange(t + 1)[None]]


def train_batches(train: np.ndarray, args) -> np.ndarray:
    """``[steps, B, T + 1]`` random crops of the training stream, fixed by the seed (every
    variant sees the same batches)."""
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(train) - args.context - 1, (args.steps, args.batch))
    return train[starts[..., None] + np.arange(args.context + 1)]


# --------------------------------------------------------------------------- model + heads

def make_model(vocab: int, args) -> Model:
    return Model(ModelConfig(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                             n_kv_heads=args.kv_heads, hidden_dim=args.hidden, tie_embeddings=False,
                             max_seq_len=args.context + 1, name="vq-logits-lm"))


def final_hidden(model: Model, params, tokens):
    """Normalised last hidden state ``[B, T, d]`` (the LM head's input), no logits computed."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model.apply(params, tokens, pos, init_cache(model.config, b, t), compute_logits=False, empty_cache=True)
    return rms_norm(out.hidden, params["final_norm"], model.config.norm_eps)


def token_nll(model: Model, head: str, params, tokens, code_map):
    """Next-token NLL ``[B, T]`` of ``tokens [B, T + 1]``: full softmax over ``lm_head`` or
    VQ-Logits through ``codebook`` and ``code_map``."""
    h, tgt = final_hidden(model, params, tokens[:, :-1]), tokens[:, 1:]
    if head == "full":
        logits = h @ params["lm_head"].T
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tgt)
    return -vq_logits.log_probs(h, params["codebook"], code_map, tgt)


def optimizer(args) -> optax.GradientTransformation:
    warmup = min(args.warmup, args.steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, end_value=args.lr * 0.1)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on norm weights
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=args.wd, mask=decay))


def balanced_random_map(vocab: int, k: int, seed: int) -> np.ndarray:
    m = np.empty(vocab, np.int32)
    m[np.random.default_rng(seed).permutation(vocab)] = np.arange(vocab) % k
    return m


# --------------------------------------------------------------------------- train / eval

class Runner:
    """Compiles one train step and one eval function per (head, K) and reuses them across maps."""

    def __init__(self, model: Model, args, batches, dev_w, test_w):
        self.model, self.args = model, args
        self.batches = jnp.asarray(batches)
        self.dev_w, self.test_w = dev_w, test_w
        self.steps: dict = {}
        self.evals: dict = {}
        self.tx = optimizer(args)  # one object: TrainState.tx is static, a new one would recompile the step

    def _step_fn(self, head):
        if head not in self.steps:
            def loss_fn(p, batch, key):
                del key
                return jnp.mean(token_nll(self.model, head, p, batch["tokens"], batch["map"])), {}
            self.steps[head] = jax.jit(make_train_step(loss_fn), donate_argnums=(0,))
        return self.steps[head]

    def _eval_fn(self, head):
        if head not in self.evals:
            def f(params, toks, mask, code_map):
                nll = token_nll(self.model, head, params, toks, code_map)
                return jnp.sum(nll * mask[:, None]), jnp.sum(mask) * nll.shape[1]
            self.evals[head] = jax.jit(f)
        return self.evals[head]

    def evaluate(self, head, params, code_map, w: np.ndarray) -> float:
        """Mean NLL (nats / token) over the windows ``w``."""
        eb = self.args.eval_batch
        f = self._eval_fn(head)
        total, count = 0.0, 0.0
        for i in range(0, len(w), eb):
            chunk = w[i : i + eb]
            mask = np.zeros(eb, np.float32)
            mask[: len(chunk)] = 1
            if len(chunk) < eb:
                chunk = np.concatenate([chunk, np.zeros((eb - len(chunk), w.shape[1]), w.dtype)])
            s, c = f(params, jnp.asarray(chunk), jnp.asarray(mask), code_map)
            total, count = total + float(s), count + float(c)
        return total / count

    def train(self, name, head, params, code_map):
        args = self.args
        params = jax.tree.map(jnp.copy, params)  # the step donates its state: keep the caller's init
        state = create_state(params, self.tx, jax.random.key(args.seed))
        if code_map is None:
            code_map = jnp.zeros((1,), jnp.int32)
        code_map = jnp.asarray(code_map, jnp.int32)
        if head == "vq":
            vq_logits.token_embeddings(params["codebook"], np.asarray(code_map))  # ValueError on a bad map

        step = self._step_fn(head)
        best = (np.inf, 0, None)
        curve, train_s, losses, compile_s = [], 0.0, [], 0.0
        for start in range(0, args.steps, args.eval_every):
            stop = min(start + args.eval_every, args.steps)
            t0 = time.perf_counter()
            for i in range(start, stop):
                state, metrics = step(state, {"tokens": self.batches[i], "map": code_map})
                losses.append(metrics["loss"])
                if i == 0:  # the first call compiles (once per head and K): not counted as training time
                    jax.block_until_ready(state.params)
                    compile_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
            jax.block_until_ready(state.params)
            train_s += time.perf_counter() - t0
            dev = self.evaluate(head, state.params, code_map, self.dev_w)
            seg = float(np.mean([float(x) for x in losses[start:stop]]))
            curve.append({"step": stop, "train_nll": round(seg, 4), "dev_nll": round(dev, 4)})
            print(f"  {name} step {stop}: train {seg:.3f}  dev {dev:.3f} (ppl {np.exp(dev):.1f})", flush=True)
            if dev < best[0]:
                best = (dev, stop, jax.tree.map(jnp.copy, state.params))
        test_best = self.evaluate(head, best[2], code_map, self.test_w)
        test_last = self.evaluate(head, state.params, code_map, self.test_w)
        print(f"  {name}: test ppl {np.exp(test_best):.2f} (step {best[1]}), last {np.exp(test_last):.2f}; "
              f"first step (compile) {compile_s:.1f} s, {args.steps - 1} steps {train_s:.1f} s", flush=True)
        tokens = (args.steps - 1) * args.batch * args.context  # step 1 (compile) excluded
        return {
            "variant": name, "head": head, "best_step": best[1], "dev_nll": best[0],
            "test_nll": test_best, "test_ppl": float(np.exp(test_best)),
            "test_nll_last": test_last, "test_ppl_last": float(np.exp(test_last)),
            "train_s": train_s, "compile_s": compile_s, "train_tokens_per_s": tokens / train_s,
            "curve": curve,
        }, best[2]


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    s, rows = res["setup"], res["rows"]
    full = next((r for r in rows if r["head"] == "full"), None)
    lines = [f"# VQ-Logits vs full softmax (WikiText-2)\n",
             f"{res['date']} · jax {res['jax']} on {res['device']} · {s['mode']} mode\n",
             f"Model: decodax LLaMA decoder, {s['layers']} layers, d={s['dim']}, {s['heads']} heads, SwiGLU "
             f"{s['hidden']}, untied input embedding {s['vocab']} x {s['dim']}, context {s['context']}; "
             f"same init seed ({s['seed']}) and the same {s['steps']} batches of {s['batch']} x {s['context']} "
             f"tokens for every row (AdamW lr {s['lr']}, warmup {s['warmup']} + cosine, wd {s['wd']}, clip 1).\n",
             f"Data: no WikiText-2 train split is shipped, so training uses `valid.txt` "
             f"(the first {s['train_tokens']} tokens; of its last {s['dev_frac']:.0%}, {s['dev_tokens']} tokens are the dev set, evaluated every "
             f"{s['eval_every']} steps to pick the checkpoint); test = `test.txt`, {s['test_scored']} tokens "
             f"scored in non-overlapping {s['context']}-token windows. Tokenizer: SmolLM2 (V = {s['vocab']}).\n",
             "Output-layer params: `lm_head` (V x d) for the full softmax, the codebook (K x d) for VQ-Logits "
             "(plus a V-entry int map, not trained). Throughput: training tokens/s over steps 2..N (step 1 "
             "compiles; evaluation excluded), relative to the full softmax.\n",
             "| output layer | map | K | output-layer params | test nats/token | test ppl | ppl vs full | "
             "within-code nats (test) | test ppl (last step) | best step | train tokens/s | throughput vs full |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['test_ppl'] / full['test_ppl'] - 1:+.1%}" if full and r is not full else "—"
        thr = f"{r['train_tokens_per_s'] / full['train_tokens_per_s']:.2f}x" if full else "—"
        lines.append(
            f"| {'full softmax' if r['head'] == 'full' else 'VQ-Logits'} | {r.get('map', '—')} | "
            f"{r.get('K', s['vocab'])} | {r['out_params']:,} | {r['test_nll']:.4f} | {r['test_ppl']:.2f} | {rel} | "
            f"{r.get('within_code_nll', 0.0):.3f} | {r['test_ppl_last']:.2f} | {r['best_step']} | {r['train_tokens_per_s']:,.0f} | {thr} |")
    lines.append("\nMaps: `smollm2` = k-means of SmolLM2-135M's output embeddings (pre-assigned, codebook "
                 "random-init); `baseline` = k-means++ of the full-softmax row's trained `lm_head`, codebook "
                 "initialised at the centroids (two-stage); `random` = balanced random assignment. Within-code nats = "
                 "mean log(tokens sharing the target's code) over the test targets: tokens of one code share its "
                 "probability equally, so a VQ-Logits head pays this on top of the code-level NLL.")
    if res.get("skipped"):
        lines.append(f"\nSkipped under --time-limit {s['time_limit']:.0f} s: {', '.join(res['skipped'])}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenize-to", help="tokenize WikiText-2 + build the SmolLM2 maps into this dir, then exit")
    ap.add_argument("--tokens", help="dir written by --tokenize-to")
    ap.add_argument("--wikitext", default=str(WIKITEXT))
    ap.add_argument("--tiny", action="store_true", help="small model, few steps (CPU smoke run)")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"full: {v}, tiny: {TINY[k]}")
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--dev-frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--map-iters", type=int, default=8, help="Lloyd iterations of the SmolLM2 k-means (--tokenize-to)")
    ap.add_argument("--baseline-iters", type=int, default=20, help="Lloyd iterations of the baseline-head k-means")
    ap.add_argument("--no-full", action="store_true", help="skip the full-softmax row (no baseline map then)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    t_start = time.time()
    if args.tokenize_to:
        if args.codes is None:
            args.codes = DEFAULT_CODES
        tokenize_to(Path(args.tokenize_to), args)
        return 0
    if not args.tokens:
        ap.error("give --tokenize-to DIR (here, with the tokenizer) or --tokens DIR (train + evaluate)")
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 2 or args.eval_every < 1 or not 0 < args.dev_frac < 1:
        raise ValueError("need --steps >= 2, --eval-every >= 1, 0 < --dev-frac < 1")
    codes = [int(c) for c in args.codes.split(",") if c]
    maps = [m for m in args.maps.split(",") if m]
    if bad := set(maps) - {"smollm2", "baseline", "random"}:
        raise ValueError(f"unknown maps {sorted(bad)}")
    if args.no_full and "baseline" in maps:
        raise ValueError("the baseline map needs the full-softmax run (drop --no-full or the baseline map)")

    tok_dir = Path(args.tokens)
    meta, train, dev, test = load_tokens(tok_dir, args)
    vocab = int(meta["vocab_size"])
    model = make_model(vocab, args)
    batches = train_batches(train, args)
    dev_w, test_w = windows(dev, args.context), windows(test, args.context)
    runner = Runner(model, args, batches, dev_w, test_w)
    key = jax.random.key(args.seed)
    init = model.init(key)  # embed, layers, final_norm, lm_head: shared by every row
    trunk = {k: v for k, v in init.items() if k != "lm_head"}
    out = Path(args.out) / ("tiny" if args.tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    dev0 = jax.devices()[0]
    res = {"date": str(datetime.date.today()), "jax": jax.__version__,
           "device": f"{dev0.platform} ({getattr(dev0, 'device_kind', platform.machine())})",
           "setup": {"mode": "tiny" if args.tiny else "full", "vocab": vocab, "seed": args.seed,
                     **{k: getattr(args, k) for k in FULL}, "wd": args.wd, "dev_frac": args.dev_frac,
                     "train_tokens": int(len(train)), "dev_tokens": int(len(dev)),
                     "test_scored": int(test_w.shape[0] * args.context),
                     "trunk_params": param_count(trunk), "map_meta": meta.get("maps", {})},
           "rows": [], "skipped": []}

    def save():
        (out / "table.json").write_text(json.dumps(res, indent=1))
        (out / "table.md").write_text(markdown(res))

    print(f"train {len(train)} / dev {len(dev)} / test {test_w.size - len(test_w)} tokens; "
          f"trunk {res['setup']['trunk_params']:,} params; {jax.devices()}", flush=True)
    best_full = None
    if not args.no_full:
        row, best_full = runner.train("full", "full", dict(init), None)
        row.update(out_params=int(init["lm_head"].size))
        res["rows"].append(row)
        save()
    last_s = 0.0
    for mname in maps:  # map-major: under --time-limit the random control is what gets skipped
        for k in codes:
            name = f"vq-{mname}-K{k}"
            if args.time_limit and time.time() - t_start + last_s > args.time_limit:
                print(f"  {name}: skipped (--time-limit {args.time_limit:.0f} s)", flush=True)
                res["skipped"].append(name)
                save()
                continue
            t_var = time.time()
            cb = jax.random.normal(jax.random.fold_in(key, k), (k, args.dim)) * 0.02
            if mname == "smollm2":
                path = tok_dir / f"map_smollm2_K{k}.npy"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} missing: rerun --tokenize-to with --codes including {k}")
                m = np.load(path).astype(np.int32)
            elif mname == "random":
                m = balanced_random_map(vocab, k, args.seed)
            else:
                t0 = time.perf_counter()
                cb, m = vq_logits.from_embeddings(jax.random.fold_in(key, 1), best_full["lm_head"], k,
                                                  iters=args.baseline_iters)
                print(f"  baseline k-means K={k}: {time.perf_counter() - t0:.1f} s", flush=True)
                m = np.asarray(m)
            if m.shape != (vocab,):
                raise ValueError(f"map {mname} K={k}: shape {m.shape} != ({vocab},)")
            params = {**trunk, "codebook": jnp.asarray(cb, jnp.float32)}
            row, _ = runner.train(name, "vq", params, m)
            row.update(map=mname, K=k, out_params=int(k * args.dim), **map_stats(m, k, test_w[:, 1:].ravel()))
            res["rows"].append(row)
            save()
            last_s = time.time() - t_var
    print(markdown(res), flush=True)
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
