"""The shared trainer: exact resume from orbax checkpoints, 1 device == 8 devices (data x fsdp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decodax.model.config import ModelConfig
from decodax.model.transformer import Model
from decodax.train import (CheckpointError, Checkpoints, create_state, fit, lm_loss, make_mesh,
                           make_train_step, shard_batch)

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def setup():
    model = Model(CONFIG)
    params = model.init(jax.random.key(0))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 2, 20), weight_decay=0.01)
    state = create_state(params, tx, jax.random.key(1))

    def batch_fn(step):
        return {"tokens": jax.random.randint(jax.random.fold_in(jax.random.key(2), step), (8, 12), 0, 64)}

    return state, make_train_step(lm_loss(model)), batch_fn


def test_loss_decreases_and_log(tmp_path):
    state, step, batch_fn = setup()
    fixed = lambda s: batch_fn(0)  # one batch over and over: the loss must fall
    state, hist = fit(state, step, fixed, 15, log_path=tmp_path / "m.jsonl", progress=False)
    assert int(state.step) == 15 and hist[-1]["loss"] < hist[0]["loss"] - 0.5
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 16)) and {"loss", "grad_norm", "tokens"} <= set(rows[0])


def test_killed_run_resumes_to_the_same_state(tmp_path):
    state0, step, batch_fn = setup()
    full, hist_full = fit(state0, step, batch_fn, 7, progress=False)

    def crashing(s):
        if s == 5:
            raise KeyboardInterrupt("killed")
        return batch_fn(s)

    ckpt = Checkpoints(tmp_path / "ckpt", save_every=2, keep=2)
    state0, _, _ = setup()
    with pytest.raises(KeyboardInterrupt):
        fit(state0, step, crashing, 7, checkpoints=ckpt, log_path=tmp_path / "m.jsonl", progress=False)
    ckpt.wait()
    assert ckpt.latest_step() == 4 and ckpt.manager.all_steps() == [2, 4]  # keep=2
    ckpt = Checkpoints(tmp_path / "ckpt", save_every=2, keep=2)
    fresh, _, _ = setup()
    resumed, hist = fit(fresh, step, batch_fn, 7, checkpoints=ckpt, log_path=tmp_path / "m.jsonl", progress=False)
    assert [h["step"] for h in hist] == [5, 6, 7] and ckpt.latest_step() == 7
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist_full[4:]]
    ckpt.close()


def test_checkpoint_errors(tmp_path):
    state, step, batch_fn = setup()
    ckpt = Checkpoints(tmp_path / "c", save_every=1)
    assert ckpt.restore(state) is None
    with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
        ckpt.restore(state, step=3)
    fit(state, step, batch_fn, 1, checkpoints=ckpt, progress=False)
    ckpt.close()
    for f in (tmp_path / "c" / "1").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"c/1 is corrupt"):
        Checkpoints(tmp_path / "c").restore(setup()[0])
    with pytest.raises(ValueError, match="save_every"):
        Checkpoints(tmp_path / "d", save_every=0)


def test_mesh_shapes_and_errors():
    n = len(jax.devices())
    assert make_mesh().shape == {"data": n, "fsdp": 1}
    with pytest.raises(ValueError, match="data x fsdp"):
        make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="multiple of"):
        shard_batch({"x": jnp.ones((n + 1, 2))}, make_mesh()) if n > 1 else shard_batch(
            {"x": jnp.ones((3, 2))}, make_mesh(devices=jax.devices() * 2, data=2))


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from test_trainer import setup
    from decodax.train import fit, make_mesh
    state, step, batch_fn = setup()
    mesh = make_mesh(data=2, fsdp=4) if len(jax.devices()) == 8 else None
    final, hist = fit(state, step, batch_fn, 5, mesh=mesh, progress=False)
    spec = str(final.params["embed"].sharding.spec) if mesh is not None else ""
    print(json.dumps({{"devices": len(jax.devices()), "losses": [h["loss"] for h in hist], "embed": spec}}))
""")


def test_one_device_equals_eight_devices(tmp_path):
    """The same 5 steps on 1 CPU device and on 8 forced host devices (2 data x 4 fsdp)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    out = {}
    for n in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["devices"] == n
        assert n == 1 or "fsdp" in res["embed"], res  # the [64, 32] embedding is split over fsdp
        out[n] = res["losses"]
    np.testing.assert_allclose(out[8], out[1], atol=1e-5, rtol=0)
    assert out[1][0] != out[1][-1]
