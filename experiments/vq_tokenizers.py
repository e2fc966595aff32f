"""VQ tokenizers compared at an equal code budget on real images that ship with the libraries.

Every quantizer of decodax.quantizers sits in the same small conv autoencoder
(decodax.quantizers.autoencoder: 32x32 images -> 8x8 = 64 tokens, K = 1024 ids per token)
and is trained with the same steps, batch and learning rate on

* ``digits``: scikit-learn's 1797 handwritten digits (8x8, upsampled to 32x32 grey), a
  seeded 80/20 train/test split;
* ``patches``: random 32x32 RGB patches of scikit-image's bundled photographs, training
  patches from the top 3/4 of each photograph, test patches from the bottom 1/4.

Held-out metrics: token utilization (fraction of the 1024 ids used on the test set), code
perplexity (exp of the entropy of the test token histogram), reconstruction MSE and PSNR
(the decoder applied to the code vectors, i.e. detokenize(tokenize(x))). Writes
``table.md``, ``table.json`` and ``reconstructions_<dataset>.png`` under
``experiments/results/vq_tokenizers/`` (``.../tiny/`` with ``--tiny``) and saves the digit
tokenizers named by ``--save`` (default fsq, vq) to
``experiments/checkpoints/digits_tokenizer_<name>/`` (``.../tiny/...`` with ``--tiny``).

    python experiments/vq_tokenizers.py            # full: sized for ~4 min on one H100
    python experiments/vq_tokenizers.py --tiny     # CPU smoke test, digits only (~1-2 min)
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv and "XLA_FLAGS" not in os.environ:
    # CPU smoke test: compile time dominates; the test suite's fast-compile flags (tests/conftest.py)
    os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false "
                               "--xla_cpu_parallel_codegen_split_count=1")

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from decodax.quantizers import autoencoder as ae
from decodax.quantizers import images as imgs

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "vq_tokenizers"
CKPT = ROOT / "checkpoints"

FULL = dict(steps=2000, batch=128, channels=64, latent_dim=16, patches_train=20000, patches_test=2000)
TINY = dict(steps=6, batch=32, channels=8, latent_dim=8, patches_train=256, patches_test=64)

NOTES = {
    "vq": "VQ-VAE, codebook + 0.25 commitment loss, U(-1/K, 1/K) init",
    "vq-ema": "EMA codebook (0.99) + dead-code restart (50 steps)",
    "simvq": "frozen N(0, 1/D) codes x one learnt linear layer",
    "fsq": "levels [8, 8, 4, 4], no loss, gradient through the tanh bound",
    "lfq": "10 sign bits, entropy loss 0.1 (MAGVIT-v2)",
    "group-lfq": "2 groups x 5 bits, per-group entropy loss (WeTok)",
    "qlae": "5 dims x 4 learnt values, AdamW wd 0.1 off the values",
    "rvq": "2 stages x 32 codes, EMA + k-means init + restart (SoundStream)",
}


def load_dataset(name: str, cfg: dict, seed: int, tiny: bool = False):
    if name == "digits":
        x, _ = imgs.digit_images(32)
        train, test = imgs.train_test_split(x, test_fraction=0.2, seed=seed)
        if tiny:
            train, test = train[:256], test[:64]
        return train, test
    if name == "patches":
        return (imgs.image_patches(32, cfg["patches_train"], seed, split="train"),
                imgs.image_patches(32, cfg["patches_test"], seed + 1, split="test"))
    raise ValueError(f"unknown dataset {name!r}")


def reconstruction_grid(path: Path, test: np.ndarray, recons: dict[str, np.ndarray], n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", test[:n])] + [(k, v[:n]) for k, v in recons.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95), squeeze=False)
    for r, (label, ims) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            im = np.clip(ims[c], 0, 1)
            ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results: dict, header: str) -> str:
    lines = [header]
    for ds, rows in results.items():
        lines += [f"\n## {ds}\n",
                  "| quantizer | utilization % | perplexity | MSE | PSNR dB | per-book util % | train s | setup |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for q, r in rows.items():
            book = f"{100 * r['book_utilization']:.1f}" if "book_utilization" in r else "-"
            lines.append(f"| {q} | {100 * r['utilization']:.1f} | {r['perplexity']:.1f} | {r['mse']:.5f} | "
                         f"{r['psnr']:.2f} | {book} | {r['train_s']:.0f} | {NOTES[q]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="few steps, small network (CPU smoke test)")
    ap.add_argument("--datasets", default=None, help="default digits,patches (--tiny: digits)")
    ap.add_argument("--quantizers", default=",".join(ae.QUANTIZERS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--channels", type=int, default=None, help="conv width (full: 64)")
    ap.add_argument("--latent-dim", type=int, default=None, help="VQ/SimVQ/RVQ code dimension (full: 16)")
    ap.add_argument("--patches", type=str, default=None, help="train,test patch counts (full: 20000,2000)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-latent-norm", action="store_true",
                    help="no GroupNorm before the encoder's projection (Tokenizer.latent_norm=False)")
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default="fsq,vq", help="digit tokenizers to save under experiments/checkpoints")
    ap.add_argument("--out", default=None)
    ap.add_argument("--checkpoints", default=None)
    args = ap.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    cfg["steps"] = args.steps or cfg["steps"]
    cfg["batch"] = args.batch or cfg["batch"]
    cfg["channels"] = args.channels or cfg["channels"]
    cfg["latent_dim"] = args.latent_dim or cfg["latent_dim"]
    if args.patches:
        cfg["patches_train"], cfg["patches_test"] = map(int, args.patches.split(","))
    out = Path(args.out or (OUT / "tiny" if args.tiny else OUT))
    ckpt = Path(args.checkpoints or (CKPT / "tiny" if args.tiny else CKPT))
    out.mkdir(parents=True, exist_ok=True)
    quantizers = args.quantizers.split(",")
    for q in quantizers:
        if q not in ae.QUANTIZERS:
            raise ValueError(f"unknown quantizer {q!r}; choose from {ae.QUANTIZERS}")
    save = [s for s in args.save.split(",") if s]
    dev = jax.devices()[0]
    header = (f"# VQ tokenizers at an equal budget (K = {args.codebook_size} ids per token, 64 tokens per 32x32 "
              f"image)\n\n{datetime.date.today()} · jax {jax.__version__} on {dev.platform} "
              f"({getattr(dev, 'device_kind', platform.machine())}){' · TINY smoke run' if args.tiny else ''}\n\n"
              f"One conv autoencoder for all (width {cfg['channels']}, VQ/SimVQ/RVQ code dim {cfg['latent_dim']}, "
              f"{'no' if args.no_latent_norm else 'a'} GroupNorm before the projection to the latents), "
              f"{cfg['steps']} steps of batch {cfg['batch']}, Adam lr {args.lr} (QLAE: AdamW wd 0.1), seed "
              f"{args.seed}. Metrics on held-out images: utilization = share of the {args.codebook_size} token ids "
              f"used, perplexity = exp(entropy) of the token histogram, MSE / PSNR of detokenize(tokenize(x)) "
              f"(pixels in [0, 1]). Per-book utilization: mean over RVQ stages / group-LFQ groups / QLAE dims "
              f"of the share of that book's codes used. train s includes compilation.\n")
    results: dict = {}
    t_all = time.time()
    for ds in (args.datasets or ("digits" if args.tiny else "digits,patches")).split(","):
        train, test = load_dataset(ds, cfg, args.seed, args.tiny)
        print(f"{ds}: train {train.shape}, test {test.shape}", flush=True)
        results[ds], recons = {}, {}
        for q in quantizers:
            tok = ae.make_tokenizer(q, codebook_size=args.codebook_size, channels=cfg["channels"],
                                    latent_dim=cfg["latent_dim"], image_channels=train.shape[-1],
                                    latent_norm=not args.no_latent_norm)
            t0 = time.time()
            variables, history = ae.train_tokenizer(tok, train, steps=cfg["steps"], batch_size=cfg["batch"],
                                                    lr=args.lr, seed=args.seed)
            jax.block_until_ready(variables)
            train_s = time.time() - t0
            ev = ae.evaluate(tok, variables, test)
            ev.update(train_s=train_s, final_train_loss=history[-1]["loss"] if history else None,
                      final_train_mse=history[-1]["mse"] if history else None)
            results[ds][q] = ev
            recons[q] = np.asarray(ae.reconstruct(tok, variables, test))[:8]  # same shapes as evaluate: no compile
            print(f"  {q:10s} util {100 * ev['utilization']:5.1f}%  ppl {ev['perplexity']:7.1f}  "
                  f"mse {ev['mse']:.5f}  psnr {ev['psnr']:5.2f}  ({train_s:.0f} s)", flush=True)
            if ds == "digits" and q in save:
                path = ae.save_tokenizer(ckpt / f"digits_tokenizer_{q}", tok, variables,
                                         info={"dataset": "sklearn digits 32x32", "steps": cfg["steps"],
                                               "batch": cfg["batch"], "lr": args.lr, "seed": args.seed,
                                               "split": "train_test_split(test_fraction=0.2, seed)",
                                               "test_metrics": ev, "tiny": args.tiny})
                print(f"    saved {path}", flush=True)
        reconstruction_grid(out / f"reconstructions_{ds}.png", test, recons)
    text = markdown(results, header) + f"\nTotal {time.time() - t_all:.0f} s.\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"config": {**cfg, "lr": args.lr, "seed": args.seed,
                                                           "codebook_size": args.codebook_size,
                                                           "jax": jax.__version__, "device": str(dev)},
                                                "results": results}, indent=1))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
