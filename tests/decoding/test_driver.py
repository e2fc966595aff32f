import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model


@pytest.fixture(scope="module")
def tiny():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=()))
    return model, model.init(jax.random.key(3))


def _reference_greedy(model, params, prompt, n, width=32):
    """Greedy decoding by a full causal re-forward of the whole sequence each step (no cache)."""

    @jax.jit
    def next_token(tokens, last):
        cache = kv.init_cache(model.config, 1, width)
        out = model.apply(params, tokens, jnp.arange(width)[None], cache, empty_cache=True)
        return jnp.argmax(out.logits[0, last])

    seq = list(prompt)
    for _ in range(n):
        padded = jnp.array([seq + [0] * (width - len(seq))])
        seq.append(int(next_token(padded, len(seq) - 1)))
    return seq[len(prompt):]


def test_greedy_equals_full_reforward(tiny):
    model, params = tiny
    prompt = [5, 17, 3, 88, 41]
    out = generate(autoregressive(model), params, [prompt], max_new_tokens=12)
    assert out.rows()[0] == _reference_greedy(model, params, prompt, 12)
    assert out.calls[0] == 12 and np.allclose(out.tau, 1.0)


def test_ragged_batch_equals_each_prompt_alone(tiny):
    model, params = tiny
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], [10, 20, 30, 40, 50]]
    dec = autoregressive(model)
    batch = generate(dec, params, prompts, max_new_tokens=10).rows()
    alone = [generate(dec, params, [p], max_new_tokens=10).rows()[0] for p in prompts]
    assert batch == alone


def test_sampling_is_deterministic_given_key_and_differs_across_keys(tiny):
    model, params = tiny
    dec = autoregressive(model, sampling.make_sampler(temperature=1.0))
    a = generate(dec, params, [[1, 2, 3]], max_new_tokens=16, key=jax.random.key(1)).rows()
    b = generate(dec, params, [[1, 2, 3]], max_new_tokens=16, key=jax.random.key(1)).rows()
    c = generate(dec, params, [[1, 2, 3]], max_new_tokens=16, key=jax.random.key(2)).rows()
    assert a == b and a != c


def test_eos_and_stop_sequences_per_row(tiny):
    model, params = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    dec = autoregressive(model)
    free = generate(dec, params, prompts, max_new_tokens=12).rows()
    eos = free[0][4]
    out = generate(dec, params, prompts, max_new_tokens=12, eos_ids=[eos]).rows()
    assert out[0] == free[0][: free[0].index(eos) + 1]
    assert out[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])
    stop = free[1][5:7]
    out = generate(dec, params, prompts, max_new_tokens=12, stop_sequences=[stop]).rows()
    first = next(i for i in range(1, 12) if free[1][i - 1 : i + 1] == stop)
    assert out[1] == free[1][: first + 1]


def test_bad_input_raises_before_tracing(tiny):
    model, params = tiny
    dec = autoregressive(model)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\).*got 97"):
        generate(dec, params, [[1, 97]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"got -1"):
        generate(dec, params, [[-1, 3]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        generate(dec, params, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="cache capacity 16 is too small"):
        generate(dec, params, [list(range(1, 20))], max_new_tokens=4, capacity=16)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(dec, params, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="context length"):
        generate(dec, params, [[1] * 500], max_new_tokens=100)
