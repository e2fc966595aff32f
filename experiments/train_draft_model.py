"""Distil a small draft model from SmolLM2-135M and train its SpecDec++ acceptance head.

1. Data: the target's greedy answers (``--new-tokens``) to instructions over
   WikiText-2 *validation* passages (the prompts of ``train_draft_heads.py``,
   not Spec-Bench), generated with decodax; the target's top-``--topk``
   next-token log-probabilities at every position (teacher forcing).
2. Distillation (DistillSpec-style KD): the draft = embedding + the target's
   first ``--layers`` layers + final norm + tied LM head, initialised from the
   target, layers and norm trained (embedding frozen) on the cross-entropy to
   the teacher's top-K distribution over the generated positions, with the
   shared trainer (orbax checkpoints under ``<out>/distilled/train``, resumable).
3. SpecDec++: the acceptance head on the distilled draft's last hidden state,
   labels "draft argmax = target token", weighted BCE (rejections x``--w-reject``);
   the stopping threshold is chosen on the training generations by simulating
   chains (tokens per unit cost with the measured verify-cost curve).
4. Held-out (``--eval-passages``): draft/target top-1 agreement before and after
   distillation, acceptance-head accuracy, simulated τ per threshold; written
   to ``experiments/results/draft_model/``. The draft (and head) is saved with
   ``decodax.speculative.distill.save_draft`` to ``<out>/distilled`` where
   ``decodax bench --methods distilled,specdec++`` loads it.

    .venv/bin/python experiments/train_draft_model.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import decodax
from decodax.kernels import unpack
from decodax.model import cache as kv
from decodax.speculative.distill import draft_init, kd_loss, save_draft, teacher_topk
from decodax.speculative.draft_model import first_layers_model
from decodax.speculative.specdecpp import acceptance_logit, acceptance_loss, init_acceptance_head
from decodax.train import Checkpoints, create_state, epoch_batches, fit, frozen_base_optimizer, make_train_step

from train_draft_heads import DATA, generations, passages  # same prompts as the heads (not Spec-Bench)

ROOT = Path(__file__).resolve().parent
# Verify cost of T tokens relative to T = 1 (packed weights, README step-cost table), interpolated.
STEP_COST = {1: 1.0, 2: 1.093, 4: 1.279, 8: 2.289, 16: 4.216}


def verify_cost(t: int) -> float:
    xs = sorted(STEP_COST)
    return float(np.interp(t, xs, [STEP_COST[x] for x in xs]))


def make_data(model, params, tok, texts, new_tokens, topk, batch=8):
    seqs, starts = generations(model, params, tok, texts, new_tokens, batch)
    width = -(-max(map(len, seqs)) // 64) * 64
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.float32)  # position t counts when token t + 1 was generated
    for i, (s, start) in enumerate(zip(seqs, starts)):
        tokens[i, : len(s)] = s
        mask[i, start - 1 : len(s) - 1] = 1.0
    teach = jax.jit(lambda x: teacher_topk(model, params, x, topk))
    ids = np.zeros((len(seqs), width, topk), np.int32)
    logp = np.zeros((len(seqs), width, topk), np.float32)
    for i in range(len(seqs)):
        a, b = teach(jnp.asarray(tokens[i : i + 1]))
        ids[i], logp[i] = np.asarray(a[0]), np.asarray(b[0])
    return {"tokens": tokens, "mask": mask, "teacher_ids": ids, "teacher_logp": logp}


def draft_states(draft, dparams, data):
    """Teacher-forced draft hidden states, draft argmax and the accept labels at masked positions."""
    fwd = jax.jit(lambda x: draft.apply(dparams, x, jnp.arange(x.shape[1])[None],
                                        kv.init_cache(draft.config, 1, x.shape[1]), empty_cache=True))
    hs, acc, rows = [], [], []
    for i in range(len(data["tokens"])):
        out = fwd(jnp.asarray(data["tokens"][i : i + 1]))
        m = data["mask"][i] > 0
        hs.append(np.asarray(out.hidden[0])[m])
        acc.append((np.asarray(out.logits[0]).argmax(-1) == data["teacher_ids"][i, :, 0])[m])
        rows.append(np.full(int(m.sum()), i))
    return np.concatenate(hs), np.concatenate(acc).astype(np.float32), np.concatenate(rows)


def simulate(accept, p_accept, rows, k, threshold, draft_cost):
    """Chains started at every position: drafts stop when 1 - Π p > threshold (or at k); a chain
    emits min(run of accepted drafts, drafts) + 1 tokens. Returns (τ, tokens per target-forward cost)."""
    n = len(accept)
    emitted, cost = 0.0, 0.0
    for t in range(n):
        log_p, run, s = 0.0, 0, k
        running = True
        for i in range(k):
            j = t + i
            if j >= n or rows[j] != rows[t]:
                s = i if i > 0 else 1
                break
            if running and accept[j] > 0.5:
                run += 1
            else:
                running = False
            log_p += np.log(max(p_accept[j], 1e-12))
            if threshold is not None and 1 - np.exp(log_p) > threshold:
                s = i + 1
                break
        emitted += min(run, s) + 1
        cost += s * draft_cost + verify_cost(s + 1)
    return emitted / n, emitted / cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-passages", type=int, default=96)
    ap.add_argument("--eval-passages", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--head-steps", type=int, default=400)
    ap.add_argument("--w-reject", type=float, default=3.0)
    ap.add_argument("--k", type=int, default=6, help="SpecDec++'s longest draft")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "checkpoints"))
    ap.add_argument("--results", default=str(ROOT / "results" / "draft_model"))
    args = ap.parse_args()

    t0 = time.time()
    model, params, tok = decodax.load_default()
    texts = passages(DATA, args.train_passages + args.eval_passages)
    cache = Path(args.out) / f"draft_data_{len(texts)}x{args.new_tokens}_top{args.topk}.npz"
    if cache.exists():  # greedy generations and teacher forcing are deterministic: reuse them
        data = dict(np.load(cache))
    else:
        data = make_data(model, params, tok, texts, args.new_tokens, args.topk)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    train = {k: v[: args.train_passages] for k, v in data.items()}
    held = {k: v[args.train_passages :] for k, v in data.items()}
    print(f"data: {len(texts)} generations + teacher top-{args.topk} ready in {time.time() - t0:.0f} s")

    flat = unpack({k: params[k] for k in ("embed", "lm_head") if k in params})
    draft = first_layers_model(model, args.layers)
    loss = kd_loss(draft)
    init = {"draft": draft_init(params, args.layers), "base": flat}
    state = create_state(init, frozen_base_optimizer(args.lr, args.steps), jax.random.key(0))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(Path(args.out) / "distilled" / "train", save_every=args.save_every, keep=2)
    t1 = time.time()
    state, hist = fit(state, make_train_step(loss), epoch_batches(train, args.batch), args.steps,
                      checkpoints=ckpt, log_path=results / "distill_train.jsonl")
    ckpt.close()
    kd_seconds = time.time() - t1
    evaluate = jax.jit(loss)
    heldj = {k: jnp.asarray(v) for k, v in held.items()}
    before = {k: float(v) for k, v in evaluate(init, heldj, None)[1].items()}
    after = {k: float(v) for k, v in evaluate(state.params, heldj, None)[1].items()}
    print(f"distillation ({kd_seconds:.0f} s): held-out agreement {before['agree']:.3f} -> {after['agree']:.3f}")

    # SpecDec++ acceptance head on the distilled draft
    dparams = {**flat, **state.params["draft"]}
    h_tr, y_tr, r_tr = draft_states(draft, dparams, train)
    h_ev, y_ev, r_ev = draft_states(draft, dparams, held)
    head_state = create_state({"acceptance": init_acceptance_head(jax.random.key(1), model.config.dim)},
                              frozen_base_optimizer(1e-3, args.head_steps), jax.random.key(1))
    head_data = {"hidden": h_tr, "accept": y_tr, "mask": np.ones_like(y_tr)}
    head_state, _ = fit(head_state, make_train_step(acceptance_loss(1.0, args.w_reject)),
                        epoch_batches(head_data, min(1024, len(y_tr))), args.head_steps,
                        log_path=results / "acceptance_train.jsonl")
    head = head_state.params["acceptance"]
    p_tr = np.asarray(jax.nn.sigmoid(acceptance_logit(head, jnp.asarray(h_tr))))
    p_ev = np.asarray(jax.nn.sigmoid(acceptance_logit(head, jnp.asarray(h_ev))))
    head_acc = float(np.mean((p_ev > 0.5) == (y_ev > 0.5)))

    # threshold: best simulated tokens per cost on the training generations
    layer_share = args.layers / model.config.n_layers
    draft_cost = 0.25 + 0.75 * layer_share  # LM head ~ a quarter of a packed decode step, layers the rest
    grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    sweep = {h: simulate(y_tr, p_tr, r_tr, args.k, h, draft_cost) for h in grid}
    best = max(grid, key=lambda h: sweep[h][1])
    fixed = {kk: simulate(y_ev, p_ev, r_ev, kk, None, draft_cost) for kk in range(1, args.k + 1)}
    held_sweep = {h: simulate(y_ev, p_ev, r_ev, args.k, h, draft_cost) for h in grid}
    save_draft(Path(args.out) / "distilled", {**state.params["draft"], "acceptance": head},
               info={"steps": args.steps, "train_passages": args.train_passages, "stop_threshold": best,
                     "k": args.k, "acceptance_hidden": int(head["w_in"].shape[1])})
    report = {"kd_seconds": kd_seconds, "steps_run": len(hist), "held_out_before": before, "held_out_after": after,
              "acceptance_head_accuracy": head_acc, "held_out_accept_rate": float(y_ev.mean()),
              "threshold": best, "draft_cost": draft_cost,
              "held_out_fixed_k": {kk: list(v) for kk, v in fixed.items()},
              "held_out_threshold": {h: list(v) for h, v in held_sweep.items()}}
    (results / "draft_model.json").write_text(json.dumps(report, indent=1))
    lines = ["# Distilled draft model + SpecDec++ acceptance head (SmolLM2-135M target)", "",
             f"Draft: target layers 0..{args.layers - 1} + final norm + tied LM head; KD on {args.train_passages} "
             f"greedy generations of {args.new_tokens} tokens (WikiText-2 valid prompts), {args.steps} steps of "
             f"{args.batch} sequences ({kd_seconds:.0f} s); held-out: {args.eval_passages} generations. "
             f"jax {jax.__version__} on {jax.devices()[0].platform}.", "",
             "| held-out | before KD | after KD |", "|---|---:|---:|",
             f"| draft/target top-1 agreement | {before['agree']:.3f} | {after['agree']:.3f} |",
             f"| KL(teacher top-{args.topk} ‖ draft) | {before['kl']:.3f} | {after['kl']:.3f} |", "",
             f"Acceptance head (w_reject = {args.w_reject}): held-out accuracy {head_acc:.3f} "
             f"(accept rate {y_ev.mean():.3f}); threshold chosen on training data: h = {best}.", "",
             f"Simulated chains on held-out positions (draft step = {draft_cost:.2f} of a target step, verify "
             "costs from the step-cost curve): τ and tokens per unit cost.", "",
             "| policy | τ | tokens / cost |", "|---|---:|---:|"]
    lines += [f"| fixed K = {kk} | {v[0]:.3f} | {v[1]:.3f} |" for kk, v in fixed.items()]
    lines += [f"| SpecDec++ h = {h}{' (chosen)' if h == best else ''} | {v[0]:.3f} | {v[1]:.3f} |"
              for h, v in held_sweep.items()]
    (results / "draft_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
