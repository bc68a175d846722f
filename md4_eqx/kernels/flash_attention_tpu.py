"""Flash attention in Pallas, written for Mosaic TPU: the forward, dq and dk/dv kernels of
md4_eqx.kernels.flash_vjp, the TPU way: a grid (b, head group, block, reduced block) whose
innermost axis walks the blocks being reduced over ("arbitrary"), with float32 accumulators in
VMEM scratch that live across those steps; lse = m + log(l).

The kernels read and write the projections' own layout, [batch, seq, heads, head_dim], seen as
[batch, seq, heads * head_dim] (a reshape that moves no data): a block is (rows, a group of
heads), and the kernel walks the group's heads in lanes. A transpose to [batch, heads, seq,
head_dim] would be a copy of q, k, v and o in XLA before and after every call. Mosaic tiles the
last two dims of a block in (8, 128): a group's width is a multiple of 128 lanes (two heads of
64), or all the heads (a block as wide as the array is always allowed).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from md4_eqx.kernels.flash_vjp import flash_vjp, out_type

# m and l are kept broadcast over one vreg's 128 lanes, the layout Mosaic handles natively.
LANES = 128
# Interpret mode fills every output buffer with NaN first, so an unwritten element shows.
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
# The last grid axis carries the accumulators, so it runs in order on one core.
COMPILER_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per block: block_q / block_k for the forward, *_bwd for both backward kernels. Blocks
    are clamped to the (rounded-up) sequence length, so short sequences are not padded to a whole
    default block. They change speed, not the result (up to rounding)."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value <= 0 or value % 8:
                raise ValueError(f"{name}={value} must be a positive multiple of 8")

    @classmethod
    def default(cls, interpret: bool) -> "BlockSizes":
        """Defaults for the compiled Mosaic TPU kernel or for the CPU interpreter.

        TPU: 512-row forward tiles keep the MXU busy and s (512 x 512 float32, 1 MiB) well
        inside scoped VMEM; the backward holds more live tiles per step, hence 256. These
        are untuned (no TPU was available). Interpret: 128, since every grid step costs a
        host round trip, while padding a short sequence to a big block wastes work."""
        if interpret:
            return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
        return cls(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T in float32: contracts the last dim of both."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(
    rows: jax.Array, cols: jax.Array, *, scale: float, block: jax.Array, length: int
) -> jax.Array:
    """rows @ cols^T * scale in float32, -inf in the columns of padding: `cols` is block number
    `block` of its sequence, and positions >= length are padding. Traced only when the sequence
    does not fill its blocks."""
    s = _nt(rows, cols) * scale  # (rows, cols)
    if length % cols.shape[0] == 0:
        return s
    position = block * cols.shape[0] + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(position < length, s, -jnp.inf)


def _head(j: int, head_dim: int) -> pl.Slice:
    """The lanes of head `j` of a block's group."""
    return pl.ds(j * head_dim, head_dim)


def _forward_kernel(
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, scale, kv_len
):
    """One (q-block, kv-block) step of the online softmax (FlashAttention Algorithm 1), for each
    head of the block's group."""
    kv_index, num_kv = pl.program_id(3), pl.num_programs(3)
    heads, _, head_dim = acc_scratch.shape

    @pl.when(kv_index == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    for j in range(heads):
        cols = _head(j, head_dim)
        s = _scores(q_ref[:, cols], k_ref[:, cols], scale=scale, block=kv_index, length=kv_len)
        m_prev, l_prev = m_scratch[j], l_scratch[j]  # (block_q, LANES)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (block_q, LANES)
        # The first kv block holds a real key, so m_next is finite from then on: no inf - inf.
        p = jnp.exp(s - m_next[:, :1])  # (block_q, block_k)
        alpha = jnp.exp(m_prev - m_next)  # rescales what was accumulated under the old max
        l_scratch[j] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scratch[j] = m_next
        pv = _nn(p.astype(v_ref.dtype), v_ref[:, cols])  # (block_q, head_dim)
        acc_scratch[j] = acc_scratch[j] * alpha[:, :1] + pv

    @pl.when(kv_index == num_kv - 1)
    def _finish():
        for j in range(heads):
            total = l_scratch[j]
            o_ref[:, _head(j, head_dim)] = (acc_scratch[j] / total[:, :1]).astype(o_ref.dtype)
            lse = m_scratch[j] + jnp.log(total)  # (block_q, LANES), equal lanes
            lse_ref[j] = lse.T[:1]  # the row (1, block_q) the backward kernels read


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scratch, *, scale, kv_len
):
    """dq for one q block, accumulated over kv blocks (FlashAttention Algorithm 2), for each
    head of the block's group."""
    kv_index, num_kv = pl.program_id(3), pl.num_programs(3)
    heads, _, head_dim = dq_scratch.shape

    @pl.when(kv_index == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    for j in range(heads):
        cols = _head(j, head_dim)
        k = k_ref[:, cols]
        s = _scores(q_ref[:, cols], k, scale=scale, block=kv_index, length=kv_len)  # (bq, bk)
        lse = jnp.expand_dims(lse_ref[j, 0], -1)  # (block_q, 1)
        delta = jnp.expand_dims(delta_ref[j, 0], -1)  # (block_q, 1)
        p = jnp.exp(s - lse)
        dp = _nt(do_ref[:, cols], v_ref[:, cols])  # (block_q, block_k)
        ds = p * (dp - delta)
        dq_scratch[j] += _nn(ds.astype(k.dtype), k)  # (block_q, head_dim)

    @pl.when(kv_index == num_kv - 1)
    def _finish():
        for j in range(heads):
            dq_ref[:, _head(j, head_dim)] = (dq_scratch[j] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_scratch,
    dv_scratch,
    *,
    scale,
    q_len,
):
    """dk and dv for one kv block, accumulated over q blocks, computed transposed so that
    lse and delta broadcast as rows (FlashAttention Algorithm 2), for each head of the block's
    group."""
    q_index, num_q = pl.program_id(3), pl.num_programs(3)
    heads, _, head_dim = dk_scratch.shape

    @pl.when(q_index == 0)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    for j in range(heads):
        cols = _head(j, head_dim)
        q, do = q_ref[:, cols], do_ref[:, cols]
        s_t = _scores(k_ref[:, cols], q, scale=scale, block=q_index, length=q_len)  # (bk, bq)
        p_t = jnp.exp(s_t - lse_ref[j])  # lse row (1, block_q)
        dv_scratch[j] += _nn(p_t.astype(do.dtype), do)  # (block_k, head_dim)
        dp_t = _nt(v_ref[:, cols], do)  # (block_k, block_q)
        ds_t = p_t * (dp_t - delta_ref[j])
        dk_scratch[j] += _nn(ds_t.astype(q.dtype), q)  # (block_k, head_dim)

    @pl.when(q_index == num_q - 1)
    def _finish():
        for j in range(heads):
            cols = _head(j, head_dim)
            dk_ref[:, cols] = (dk_scratch[j] * scale).astype(dk_ref.dtype)
            dv_ref[:, cols] = dv_scratch[j].astype(dv_ref.dtype)


def _group(heads: int, head_dim: int) -> int:
    """Heads per block: the fewest that divide `heads` and fill whole 128-lane vregs, else all
    of them (Mosaic takes a block as wide as the array whatever its width)."""
    return next(
        (g for g in range(1, heads + 1) if heads % g == 0 and g * head_dim % LANES == 0), heads
    )


def _rows(block: int, width: int, *, seq_axis: int) -> pl.BlockSpec:
    """Spec for a (block, width) tile of a [b, seq, heads * head_dim] array: the grid's
    `seq_axis`-th index (2 or 3) picks the block along seq, its second index the head group."""
    return pl.BlockSpec((None, block, width), lambda b, g, i, j: (b, (i, j)[seq_axis - 2], g))


def _stats(group: int, block: int, *, q_axis: int) -> pl.BlockSpec:
    """Spec for the (group, 1, block) rows of a [b, h, 1, seq] per-query statistic (lse,
    delta): the grid's `q_axis`-th index (2 or 3) picks the q block."""
    return pl.BlockSpec((None, group, 1, block), lambda b, g, i, j: (b, g, 0, (i, j)[q_axis - 2]))


def _backward_specs(
    bq: int, bk: int, d: int, group: int, *, q_axis: int, kv_axis: int
) -> list[pl.BlockSpec]:
    """Specs for (q, k, v, do, lse rows, delta rows); q_axis and kv_axis are the grid axes
    (2 or 3) that walk the query and key blocks."""
    q_rows, kv_rows = _rows(bq, group * d, seq_axis=q_axis), _rows(bk, group * d, seq_axis=kv_axis)
    stats = _stats(group, bq, q_axis=q_axis)
    return [q_rows, kv_rows, kv_rows, q_rows, stats, stats]


def _nbytes(*arrays) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in arrays)


def _cost(matmuls: int, q, k, *, once: tuple, streamed: tuple, passes: int) -> pl.CostEstimate:
    """What XLA's cost analysis and scheduler are told of one kernel, which they cannot see into:
    `matmuls` products of a [tq, tk] score tile with head_dim, one exp per score, the arrays
    `once` read or written once and those `streamed` read `passes` times (once per block of
    the axis the grid walks outside them). Padded sizes: the work the kernel does."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    return pl.CostEstimate(
        flops=2 * matmuls * b * h * tq * tk * d,
        transcendentals=b * h * tq * tk,
        bytes_accessed=_nbytes(*once) + passes * _nbytes(*streamed),
    )


def _pallas_call(kernel, *, interpret: bool, **kwargs):
    """pl.pallas_call with this module's compiler parameters, compiled or interpreted."""
    interpret = INTERPRET if interpret else False
    return pl.pallas_call(kernel, compiler_params=COMPILER_PARAMS, interpret=interpret, **kwargs)


def _lanes(x: jax.Array) -> jax.Array:
    """[b, seq, h, d] -> [b, seq, h * d], the kernels' view: the same bytes."""
    return x.reshape(*x.shape[:2], -1)


def _forward(q, k, v, *, kv_len, blocks, interpret):
    """o ([b, tq, h, d]) and lse (float32, [b, h, tq]) of padded [b, seq, h, d] inputs."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, bk, group = blocks.block_q, blocks.block_k, _group(h, d)
    out_shape = [
        out_type((b, tq, h * d), q.dtype, q, k, v),
        out_type((b, h, 1, tq), jnp.float32, q, k, v),
    ]
    o, lse = _pallas_call(
        functools.partial(_forward_kernel, scale=d**-0.5, kv_len=kv_len),
        grid=(b, h // group, tq // bq, tk // bk),
        in_specs=[
            _rows(bq, group * d, seq_axis=2),
            _rows(bk, group * d, seq_axis=3),
            _rows(bk, group * d, seq_axis=3),
        ],
        out_specs=[
            _rows(bq, group * d, seq_axis=2),
            _stats(group, bq, q_axis=2),
        ],
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((group, bq, LANES), jnp.float32),  # m: running row max
            pltpu.VMEM((group, bq, LANES), jnp.float32),  # l: running row sum of exp(s - m)
            pltpu.VMEM((group, bq, d), jnp.float32),  # acc: unnormalised output
        ],
        # s = q k^T, o = p v; the outputs are written once
        cost_estimate=_cost(2, q, k, once=(q, *out_shape), streamed=(k, v), passes=tq // bq),
        interpret=interpret,
        name="flash_attention_forward",
    )(_lanes(q), _lanes(k), _lanes(v))
    return o.reshape(q.shape), lse[:, :, 0]  # lse: (b, h, tq)


def _backward(q, k, v, do, lse, delta, *, q_len, kv_len, blocks, interpret):
    """dq, dk, dv ([b, seq, h, d]) of padded [b, seq, h, d] inputs; lse and delta [b, h, tq]."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, bk, group = blocks.block_q_bwd, blocks.block_k_bwd, _group(h, d)
    scale = d**-0.5
    # q, k, v, do as [b, seq, h * d]; lse and delta rows: (b, h, 1, tq)
    operands = (*map(_lanes, (q, k, v, do)), lse[:, :, None], delta[:, :, None])

    dq = _pallas_call(
        functools.partial(_dq_kernel, scale=scale, kv_len=kv_len),
        grid=(b, h // group, tq // bq, tk // bk),
        in_specs=_backward_specs(bq, bk, d, group, q_axis=2, kv_axis=3),
        out_specs=_rows(bq, group * d, seq_axis=2),
        out_shape=out_type(operands[0].shape, q.dtype, *operands),
        scratch_shapes=[pltpu.VMEM((group, bq, d), jnp.float32)],
        # s = q k^T, dp = do v^T, dq = ds k; the output is q's size
        cost_estimate=_cost(3, q, k, once=(q, q, do, lse, delta), streamed=(k, v), passes=tq // bq),
        interpret=interpret,
        name="flash_attention_dq",
    )(*operands)

    dk, dv = _pallas_call(
        functools.partial(_dkv_kernel, scale=scale, q_len=q_len),
        grid=(b, h // group, tk // bk, tq // bq),
        in_specs=_backward_specs(bq, bk, d, group, q_axis=3, kv_axis=2),
        out_specs=[_rows(bk, group * d, seq_axis=2), _rows(bk, group * d, seq_axis=2)],
        out_shape=[
            out_type(operands[1].shape, k.dtype, *operands),
            out_type(operands[2].shape, v.dtype, *operands),
        ],
        scratch_shapes=[
            pltpu.VMEM((group, bk, d), jnp.float32),
            pltpu.VMEM((group, bk, d), jnp.float32),
        ],
        # s^T = k q^T, dv = p^T do, dp^T = v do^T, dk = ds^T q; the outputs are k's and v's sizes
        cost_estimate=_cost(
            4, q, k, once=(k, v, k, v), streamed=(q, do, lse, delta), passes=tk // bk
        ),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*operands)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


_flash = flash_vjp(_forward, _backward, seq_axis=1)


def flash_attention(
    q: Float[Array, "b t h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"], *,
    block_sizes: BlockSizes | None = None, interpret: bool = False,
) -> Float[Array, "b t h d"]:  # fmt: skip
    """softmax(q k^T / sqrt(d)) v with the Pallas kernels, differentiable: compiled for TPU by
    Mosaic, or run anywhere with `interpret=True`. Inputs may be bfloat16 or float32 (one dtype
    for all three); accumulation is float32."""
    block_sizes = block_sizes or BlockSizes.default(interpret)
    # Mosaic TPU: block_k is the lane dim of s and block_q that of s^T and of the lse rows.
    align = 8 if interpret else LANES
    if not interpret:
        for name, value in dataclasses.asdict(block_sizes).items():
            if value % LANES:
                raise ValueError(f"{name}={value} must be a multiple of {LANES} on TPU")
    # Each block clamped to its sequence length rounded up to `align`.
    q_cap, kv_cap = _round_up(q.shape[1], align), _round_up(k.shape[1], align)
    blocks = BlockSizes(
        min(block_sizes.block_q, q_cap),
        min(block_sizes.block_k, kv_cap),
        min(block_sizes.block_q_bwd, q_cap),
        min(block_sizes.block_k_bwd, kv_cap),
    )
    return _flash(
        q,
        k,
        v,
        blocks,
        interpret,
        q_multiple=math.lcm(blocks.block_q, blocks.block_q_bwd),
        kv_multiple=math.lcm(blocks.block_k, blocks.block_k_bwd),
    )
