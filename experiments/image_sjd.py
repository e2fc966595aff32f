"""Speculative Jacobi Decoding on image tokens: a class-conditional AR transformer over the
8x8 FSQ token grid of 32x32 handwritten digits, sampled autoregressively and with SJD
(Teng et al. 2024) from random and from spatial-neighbour window initialisations; beside
them Neighboring AR (He et al. 2025), the same network fine-tuned with NAR's near-to-far
mask and second (vertical) head, sampled in h + w - 1 steps.

1. Tokenizer: ``decodax.quantizers.autoencoder`` FSQ (K = 1024) loaded from
   ``experiments/checkpoints/digits_tokenizer_fsq`` (the tokenizer experiment's output), or
   trained here (``train_tokenizer``) and saved under ``experiments/checkpoints/image_sjd/``.
2. Data: scikit-learn's digits at 32x32 (``digit_images``), a seeded 80/20 split; training
   images optionally augmented by +-``--shift`` pixel translations before tokenizing.
3. AR model (``decodax.images``): ``[BOS, class, code_0 .. code_63]``, loss on the codes,
   trained with ``decodax.train`` (or loaded from ``experiments/checkpoints/image_sjd/``);
   the NAR model (``decodax.images.nar``) starts from its params and trains ``--nar-steps``
   more steps (0: no NAR row).
4. Sampling: ``--per-class`` images per class with the same sampler (temperature, top-k) by
   autoregressive decoding, SJD with uniform random guesses over the codes and SJD with
   ``SpatialInit`` (the token above; left on the first row), window ``--window``; NAR with
   the same sampler. AR and SJD sample the same model (SJD is lossless), NAR another one,
   so its quality columns are the check.
5. Metrics (``decodax.images.metrics``): target forwards per image (``calls``: prefill +
   steps), speedup in forwards vs AR, class accuracy of the decoded images under a logistic
   regression fitted on real training digits (8x8 pooled), Fréchet distance to held-out real
   digits in a PCA-20 space; references: held-out real and tokenizer reconstructions, and a
   real training sample of the same size (the Fréchet floor).

Writes ``table.md``, ``table.json`` and PNG grids under ``experiments/results/image_sjd/``
(``--tiny``: a 1-2 minute CPU smoke run under ``.../image_sjd/tiny``).

    python experiments/image_sjd.py            # full (sized for ~4 min on one H100)
    python experiments/image_sjd.py --tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from decodax import sampling
from decodax.decoding import autoregressive
from decodax.images import (DigitMetrics, ImageLayout, image_model, load_image_model, load_nar_model, sample_codes,
                            sample_nar, save_image_model, save_nar_model, train_image_model, train_nar_model)
from decodax.jacobi import RandomInit, jacobi
from decodax.jacobi.init import SpatialInit
from decodax.quantizers.autoencoder import (detokenize, evaluate, load_tokenizer, make_tokenizer, save_tokenizer,
                                            tokenize, train_tokenizer)
from decodax.quantizers.images import digit_images, train_test_split

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "image_sjd"
CKPT = ROOT / "checkpoints"
TOKENIZER = CKPT / "digits_tokenizer_fsq"

FULL = dict(tok_steps=2500, tok_channels=64, tok_lr=1e-3, ar_steps=4000, nar_steps=2000, dim=256, layers=6, heads=8,
            batch=256, lr=2e-3, per_class=100, shift=2, sample_batch=1000)
TINY = dict(tok_steps=100, tok_channels=8, tok_lr=1e-3, ar_steps=150, nar_steps=60, dim=64, layers=2, heads=4, batch=32,
            lr=3e-3, per_class=3, shift=0, sample_batch=30)


def shifted(images: np.ndarray, shift: int) -> np.ndarray:
    """Every translation by ``-shift .. shift`` pixels in each axis (zero fill)."""
    if shift == 0:
        return images
    n, h, w, c = images.shape
    pad = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    return np.concatenate([pad[:, shift + dy:shift + dy + h, shift + dx:shift + dx + w]
                           for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)])


def repo_path(path) -> str:
    """``path`` relative to the repository when inside it (results name no machine paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT.parent)) if p.is_relative_to(ROOT.parent) else str(path)


def get_tokenizer(args, train_x):
    if not args.retrain_tokenizer:  # the saved tokenizer, also in --tiny runs (else a tiny one is trained)
        for path in (Path(args.tokenizer), CKPT / "image_sjd" / "tokenizer_fsq"):
            if (path / "tokenizer.json").exists():
                tok, variables = load_tokenizer(path)
                print(f"tokenizer loaded from {repo_path(path)}", flush=True)
                return tok, variables, repo_path(path)
    t0 = time.time()
    # the tokenizer experiment's full FSQ setting (experiments/vq_tokenizers.py): width 64, Adam 1e-3
    tok = make_tokenizer("fsq", codebook_size=1024, channels=args.tok_channels, latent_dim=16)
    variables, hist = train_tokenizer(tok, train_x, steps=args.tok_steps, batch_size=min(128, len(train_x)),
                                      lr=args.tok_lr, seed=args.seed)
    print(f"tokenizer trained: {args.tok_steps} steps, mse {hist[-1]['mse']:.4f}, {time.time() - t0:.0f} s",
          flush=True)
    where = "trained here (tiny)"
    if not args.tiny:
        where = save_tokenizer(CKPT / "image_sjd" / "tokenizer_fsq", tok, variables,
                               info={"steps": args.tok_steps, "data": "digits train split (image_sjd)"})
    return tok, variables, repo_path(where)


def get_model(args, layout, codes, labels):
    path = CKPT / "image_sjd" / "ar"
    if not args.tiny and not args.retrain and (path / "image_model.json").exists():
        model, saved_layout, params, info = load_image_model(path)
        if saved_layout == layout and repo_path(info.get("tokenizer", "")) == args.tokenizer_id:
            print(f"AR model loaded from {repo_path(path)}", flush=True)
            return model, params, {**info, "tokenizer": repo_path(info.get("tokenizer", ""))}
    model = image_model(layout, dim=args.dim, n_layers=args.layers, n_heads=args.heads)
    tokens, mask = layout.sequences(codes, labels)
    t0 = time.time()
    params, hist = train_image_model(model, tokens, mask, steps=args.ar_steps, batch_size=args.batch, lr=args.lr,
                                     seed=args.seed)
    info = {"steps": args.ar_steps, "final_loss": float(np.mean([h["loss"] for h in hist[-20:]])),
            "train_sequences": len(tokens), "seconds": time.time() - t0, "tokenizer": args.tokenizer_id}
    print(f"AR model trained: {args.ar_steps} steps on {len(tokens)} sequences, loss {info['final_loss']:.3f}, "
          f"{info['seconds']:.0f} s", flush=True)
    if not args.tiny:
        save_image_model(path, model, layout, params, info)
    return model, params, info


def get_nar_model(args, layout, model, ar_params, tokens):
    """NAR heads and near-to-far mask, fine-tuned from the AR model's params (the vertical head
    starts as a copy of the horizontal one) for ``--nar-steps`` steps on the same sequences."""
    path = CKPT / "image_sjd" / "nar"
    if not args.tiny and not args.retrain and (path / "image_model.json").exists():
        _, saved_layout, params, info = load_nar_model(path)
        if saved_layout == layout and repo_path(info.get("tokenizer", "")) == args.tokenizer_id:
            print(f"NAR model loaded from {repo_path(path)}", flush=True)
            return params, info
    t0 = time.time()
    params, hist = train_nar_model(model, layout, tokens, steps=args.nar_steps, batch_size=args.batch, lr=args.lr,
                                   seed=args.seed, params=ar_params)
    info = {"steps": args.nar_steps, "init": "AR params", "seconds": time.time() - t0, "tokenizer": args.tokenizer_id,
            **{k: float(np.mean([h[k] for h in hist[-20:]])) for k in ("loss", "horizontal", "vertical")}}
    print(f"NAR model trained: {args.nar_steps} steps from the AR params, loss {info['loss']:.3f} "
          f"(horizontal {info['horizontal']:.3f}, vertical {info['vertical']:.3f}), {info['seconds']:.0f} s", flush=True)
    if not args.tiny:
        save_nar_model(path, model, layout, params, info)
    return params, info


def grid_png(path, images, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.imshow(np.asarray(images[i])[..., 0], cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (small everything)")
    ap.add_argument("--tokenizer", default=str(TOKENIZER), help="saved tokenizer directory (load_tokenizer)")
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--retrain", action="store_true", help="train the AR model even if a checkpoint exists")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    for name, value in FULL.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name, value in (TINY if args.tiny else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    out = Path(args.out) if args.out else OUT / ("tiny" if args.tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"devices: {jax.devices()}", flush=True)

    x, y = digit_images(32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_fraction=0.2, seed=args.seed)
    tok, tok_vars, args.tokenizer_id = get_tokenizer(args, x_train)
    layout = ImageLayout(tok.codebook_size, n_classes=10, height=8, width=8)
    tok_eval = evaluate(tok, tok_vars, x_test)
    print(f"tokenizer on held-out digits: {tok_eval}", flush=True)
    if tok_eval["utilization"] < 0.05:
        print(f"WARNING: the tokenizer uses {tok_eval['utilization'] * tok.codebook_size:.0f} codes on held-out "
              f"digits (MSE {tok_eval['mse']:.3f}): collapsed; image quality figures are meaningless", flush=True)
    aug_x = shifted(x_train, args.shift)
    aug_y = np.tile(y_train, len(aug_x) // len(x_train))
    codes = np.asarray(tokenize(tok, tok_vars, aug_x))
    print(f"tokenized {len(aug_x)} training images (shift {args.shift}); codes used "
          f"{len(np.unique(codes))}/{tok.codebook_size}", flush=True)
    model, params, info = get_model(args, layout, codes, aug_y)
    nar_params, nar_info = (get_nar_model(args, layout, model, params, layout.sequences(codes, aug_y)[0])
                            if args.nar_steps else (None, None))

    metrics = DigitMetrics.fit(x_train, y_train, seed=args.seed)
    recon_test = np.asarray(detokenize(tok, tok_vars, tokenize(tok, tok_vars, x_test)))
    n = 10 * args.per_class
    labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)
    real = x_train[np.random.default_rng(args.seed).choice(len(x_train), min(n, len(x_train)), replace=False)]
    refs = {
        "real held-out": dict(accuracy=metrics.accuracy(x_test, y_test)),
        "tokenizer recon held-out": dict(accuracy=metrics.accuracy(recon_test, y_test),
                                         frechet=metrics.frechet(recon_test, x_test)),
        f"real train sample (n={len(real)}) vs held-out": dict(frechet=metrics.frechet(real, x_test)),
    }

    sampler = sampling.make_sampler(temperature=args.temperature, top_k=args.top_k)
    k = layout.codebook_size
    methods = {
        "AR": autoregressive(model, sampler),
        "SJD random": jacobi(model, window=args.window, init=RandomInit(k), sampler=sampler),
        "SJD spatial": jacobi(model, window=args.window, init=SpatialInit(layout.width, k), sampler=sampler),
    }
    if nar_params is not None:
        methods["NAR"] = None  # its own sampler loop (sample_nar), on the fine-tuned NAR params
    rows, key = {}, jax.random.key(args.seed + 1)
    for i, (name, dec) in enumerate(methods.items()):
        t0 = time.time()
        if dec is None:
            gen, calls = sample_nar(model, nar_params, layout, labels, key=jax.random.fold_in(key, i), sampler=sampler,
                                    batch_size=min(args.sample_batch, n))
        else:
            gen, calls = sample_codes(dec, params, layout, labels, key=jax.random.fold_in(key, i),
                                      batch_size=min(args.sample_batch, n))
        wall = time.time() - t0
        images = np.asarray(detokenize(tok, tok_vars, gen))
        rows[name] = dict(steps_per_image=float(calls.mean()), accuracy=metrics.accuracy(images, labels),
                          frechet=metrics.frechet(images, x_test), wall_s_with_compile=wall)
        order = np.concatenate([np.arange(c * args.per_class, c * args.per_class + min(10, args.per_class))
                                for c in range(10)])
        grid_png(out / f"samples_{name.lower().replace(' ', '_')}.png", images[order], 10,
                 f"{name}: {rows[name]['steps_per_image']:.1f} forwards/image, acc {rows[name]['accuracy']:.3f}")
        print(f"{name}: {rows[name]}", flush=True)
    ar = rows["AR"]["steps_per_image"]
    for r in rows.values():
        r["speedup_steps"] = ar / r["steps_per_image"]
        r["accuracy_delta_pts"] = 100 * (r["accuracy"] - rows["AR"]["accuracy"])
    first10 = np.concatenate([np.where(y_test == c)[0][:10] for c in range(10)])
    grid_png(out / "real_recon.png", recon_test[first10], 10, "tokenizer reconstructions of held-out digits")

    setup = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(jax.devices()[0]),
                 platform=platform.platform(), jax=jax.__version__, tiny=args.tiny, window=args.window,
                 temperature=args.temperature, top_k=args.top_k, per_class=args.per_class,
                 tokenizer=args.tokenizer_id, tokenizer_heldout=tok_eval, codebook_size=k,
                 model=dict(dim=args.dim, layers=args.layers, heads=args.heads), ar_training=info, nar_training=nar_info,
                 seconds=time.time() - t_start)
    (out / "table.json").write_text(json.dumps(dict(setup=setup, methods=rows, references=refs), indent=1))
    md = [f"## SJD on digit tokens ({'tiny smoke run' if args.tiny else 'full'})", "",
          f"{n} images ({args.per_class} per class), 8x8 FSQ tokens (K = {k}) of 32x32 digits; sampler "
          f"temperature {args.temperature}, top-k {args.top_k}; SJD window {args.window}. AR and SJD sample one "
          f"model; NAR is that model fine-tuned {args.nar_steps} steps with NAR's mask and vertical head. "
          f"Forwards = target forwards per image (prefill + decoder steps). Accuracy: logistic regression on 8x8-pooled real "
          f"training digits, conditioned class as label. Fréchet: PCA-20 of the pooled pixels, vs "
          f"{len(x_test)} held-out real digits. Tokenizer on held-out digits: MSE {tok_eval['mse']:.4f}, "
          f"{tok_eval['utilization'] * k:.0f} of {k} codes used. Device {setup['device']}, "
          f"{setup['seconds']:.0f} s in all.", "",
          "| method | forwards / image | speedup (forwards) | accuracy | Δ acc vs AR (pts) | Fréchet |",
          "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['steps_per_image']:.2f} | {r['speedup_steps']:.2f}x | {r['accuracy']:.3f} | "
                  f"{r['accuracy_delta_pts']:+.1f} | {r['frechet']:.3f} |")
    md += ["", "| reference | accuracy | Fréchet |", "|---|---:|---:|"]
    for name, r in refs.items():
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        fd = f"{r['frechet']:.3f}" if "frechet" in r else "-"
        md.append(f"| {name} | {acc} | {fd} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
