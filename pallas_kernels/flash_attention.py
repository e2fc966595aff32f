"""Flash attention for prefill / verify blocks as a Pallas kernel.

FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", Algorithm 1): the grid runs over
(batch, query head, query block); each program keeps its query block resident
and streams key/value blocks with an online softmax (running max ``m``, running
sum ``l``, unnormalised accumulator), dividing by ``l`` once at the end.

* Masks: causal (``mask=None``; key blocks above the diagonal are skipped), or
  an arbitrary boolean ``mask[B, T, T]`` among the new tokens (token-tree
  ancestor masks, lookahead windows).
* GQA by index mapping: query head ``h`` reads KV head ``h // G`` through the
  BlockSpec index map; K/V are never repeated.
* The wrapper moves heads in front (``[B, H, T, D]``, the cache's layout) and
  pads T to a block multiple and D to a power of two >= 16, so blocks are powers
  of two (Triton) and the last two block dims are ``(block, D)`` (Mosaic).
  Padded keys get ``-inf`` (never attended); masked real keys get ``-1e30``
  exactly as in ``reference.attention_reference``.

Semantics are those of ``pallas_kernels.reference.attention_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Bool, Float

from pallas_kernels.reference import HIGHEST, NEG_INF

_NT = (((1,), (1,)), ((), ()))  # [m, d] x [n, d] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # [m, n] x [n, d] -> [m, d]


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_interpret() -> bool:
    """``interpret=None`` resolves to True on CPU (no Pallas compiler there)."""
    return jax.default_backend() == "cpu"


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Backend compiler parameters: Triton ones on GPU (selects the Triton lowering
    rather than Mosaic GPU), the defaults elsewhere (Mosaic on TPU)."""
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _flash_kernel(*refs, scale, block_q, block_k, t_valid, n_kblocks, causal):
    if causal:
        q_ref, k_ref, v_ref, o_ref = refs
        mask_ref = None
    else:
        q_ref, k_ref, v_ref, mask_ref, o_ref = refs
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale  # [block_q, D]
    q_idx = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        s = jax.lax.dot_general(q, k, _NT, precision=HIGHEST, preferred_element_type=jnp.float32)
        k_idx = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        if causal:
            allowed = k_idx <= q_idx
        else:
            allowed = mask_ref[:, pl.ds(start, block_k)] != 0
        s = jnp.where(allowed, s, NEG_INF)
        s = jnp.where(k_idx < t_valid, s, -jnp.inf)  # padding keys: exactly zero weight
        m_new = jnp.maximum(m_prev, s.max(axis=-1))  # finite: m starts at NEG_INF
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = alpha * l_prev + p.sum(axis=-1)
        pv = jax.lax.dot_general(p, v, _NN, precision=HIGHEST, preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, l_new

    d = q.shape[-1]
    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), NEG_INF, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    if causal:  # key blocks entirely above the diagonal contribute nothing
        # lax.div (C division; operands >= 0) rather than floor division: Mosaic-friendly
        upper = jnp.minimum(jax.lax.div((i + 1) * block_q + block_k - 1, block_k), n_kblocks)
    else:
        upper = n_kblocks
    acc, _, l = jax.lax.fori_loop(0, upper, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_q", "block_k", "causal", "interpret")
)
def _flash_impl(q, k, v, mask, *, scale, block_q, block_k, causal, interpret):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    t_pad = _round_up(t, max(block_q, block_k))
    d_pad = max(16, _next_pow2(d))

    def prep(x):  # [B, T, N, D] -> [B, N, T_pad, D_pad]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, d_pad - d)))

    qh, kh, vh = prep(q), prep(k), prep(v)
    n_kblocks = t_pad // block_k
    grid = (b, h, t_pad // block_q)
    in_specs = [
        pl.BlockSpec((None, None, block_q, d_pad), lambda bi, hi, qi: (bi, hi, qi, 0)),
        pl.BlockSpec((None, None, t_pad, d_pad), lambda bi, hi, qi: (bi, jax.lax.div(hi, g), 0, 0)),
        pl.BlockSpec((None, None, t_pad, d_pad), lambda bi, hi, qi: (bi, jax.lax.div(hi, g), 0, 0)),
    ]
    args = [qh, kh, vh]
    if not causal:
        m8 = jnp.pad(mask.astype(jnp.int8), ((0, 0), (0, t_pad - t), (0, t_pad - t)))
        in_specs.append(pl.BlockSpec((None, block_q, t_pad), lambda bi, hi, qi: (bi, qi, 0)))
        args.append(m8)
    kernel = functools.partial(
        _flash_kernel,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        t_valid=t,
        n_kblocks=n_kblocks,
        causal=causal,
    )
    o = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_q, d_pad), lambda bi, hi, qi: (bi, hi, qi, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, t_pad, d_pad), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decodax_flash_attention",
    )(*args)
    return jnp.swapaxes(o[:, :, :t, :d], 1, 2)


def flash_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T KV D"],
    v: Float[Array, "B T KV D"],
    mask: Bool[Array, "B T T"] | None = None,
    *,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool | None = None,
) -> Float[Array, "B T H D"]:
    """FlashAttention-2 (Dao, 2023, Algorithm 1) over T new tokens, GQA, causal or masked.

    Args:
      q: queries ``[B, T, H, D]``; ``H`` a multiple of the KV heads.
      k, v: keys/values of the same T tokens ``[B, T, KV, D]``.
      mask: ``mask[b, i, j]`` = query i may attend to key j; None = causal.
      scale: score scale, default ``D ** -0.5``.
      block_q, block_k: query / key block sizes (powers of two; clamped to the
        padded sequence, never below 16).
      interpret: run the Pallas interpreter (None: True on CPU only).

    Returns ``[B, T, H, D]`` in q's dtype, equal to
    ``reference.attention_reference(q, k, v, mask, scale)``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B,T,H,D], k/v [B,T,KV,D]; got ranks {q.ndim}, {k.ndim}, {v.ndim}"
        )
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(
            f"k and v must be [B={b}, T={t}, KV, D={d}] and equal; got k {k.shape}, v {v.shape}"
        )
    kvh = k.shape[2]
    if kvh < 1 or h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    if t < 1:
        raise ValueError(f"need at least one token, got T={t}")
    if mask is not None and tuple(mask.shape) != (b, t, t):
        raise ValueError(f"mask must be [B, T, T] = {(b, t, t)}, got {tuple(mask.shape)}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2(blk):
            raise ValueError(f"{name} must be a positive power of two, got {blk}")
    cap = max(16, _next_pow2(t))
    block_q, block_k = max(16, min(block_q, cap)), max(16, min(block_k, cap))
    scale = float(d**-0.5 if scale is None else scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _flash_impl(
        q,
        k,
        v,
        mask,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        causal=mask is None,
        interpret=interpret,
    )
