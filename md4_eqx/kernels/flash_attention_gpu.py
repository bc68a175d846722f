"""Flash attention in Pallas for Hopper GPUs (Mosaic GPU, `plgpu.kernel`): the kernels of
md4_eqx.kernels.flash_vjp laid out the FlashAttention-3 way (Shah et al., 2024). A thread block
runs `COMPUTE_WGS` compute warpgroups, each owning its own rows, and one memory warpgroup that
streams the tiles reduced over through a ring of `stages` shared-memory slots with TMA copies,
signalling "loaded" and "consumed" barriers. Matmuls are `wgmma` on 128-byte-swizzled 16-bit
tiles with float32 accumulators; the grid is (heads, q- or kv-blocks, batch). Logits are base 2
(exp2 is the native instruction): lse2 = log2(sum_j 2^(s_ij log2 e)), P = 2^(S log2 e - lse2).
The layout is [batch, seq, heads, head_dim] throughout: a TMA copy of `x.at[b, rows, h]` reads
a (rows, head_dim) tile directly, so nothing is transposed.

Status: NOT YET RUN ON A GPU. On CPU the Mosaic GPU interpreter (`interpret=True`) tests the
numbers and a lowering for CUDA (to NVVM and wgmma PTX) checks the compiled form, alone and in
the training step; ptxas and a run wait for a Hopper GPU. `_Ops` holds all the code that
differs, because the interpreter (JAX 0.10.2) lacks register layouts, `transpose_ref` and
register left operands of wgmma (it copies them to staging SMEM buffers first) and accumulation
in place, `run_state(ACC.init(acc))` (it adds a fresh product). One source serves JAX 0.10 and
0.11: `out_type`/`scratch_types`, the Lane lowering semantics and `lax.axis_index` are explicit.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float

from md4_eqx.kernels.flash_vjp import flash_vjp, out_type, varying

COMPUTE_WGS = 2
LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
# wgmma reads 16-bit tiles as 8 rows x 128 bytes (64 elements), 128-byte swizzled.
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma accumulator
COLUMN = plgpu.Layout.WGMMA.reduce(0)  # one value per column
COMPILER_PARAMS = plgpu.CompilerParams(
    approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per tile: forward (block_q, block_kv), dq kernel (*_dq), dk/dv kernel (*_dkv), of
    which a compute warpgroup owns block_q, block_q_dq or block_kv_dkv rows (a thread block
    COMPUTE_WGS times that); `stages` slots in the ring of streamed tiles. wgmma needs tiles of
    64 rows; 128 columns in the forward halve the softmax rescales. Untuned: no GPU was at hand."""

    block_q: int = 64
    block_kv: int = 128
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    stages: int = 2

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if name != "stages" and (value <= 0 or value % 64):
                raise ValueError(f"{name}={value} must be a positive multiple of 64 (wgmma)")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be at least 1")

    @property
    def q_multiple(self) -> int:
        """What the query length is padded to a multiple of."""
        return math.lcm(COMPUTE_WGS * self.block_q, COMPUTE_WGS * self.block_q_dq, self.block_q_dkv)

    @property
    def kv_multiple(self) -> int:
        """What the key length is padded to a multiple of."""
        return math.lcm(self.block_kv, self.block_kv_dq, COMPUTE_WGS * self.block_kv_dkv)


def _product(a, b_ref, shape: tuple[int, int]) -> jax.Array:
    """a @ b in a fresh float32 wgmma accumulator of `shape`."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The operations whose compiled and interpreted forms differ (module docstring); `t_stage`
    and `lhs_stage` are this warpgroup's staging SMEM buffers (interpret only)."""

    interpret: bool
    t_stage: Any = None
    lhs_stage: Any = None

    def layout(self, x: jax.Array, layout) -> jax.Array:
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, layout) -> jax.Array:
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def mask_columns(self, s: jax.Array, start: jax.Array, length: int) -> jax.Array:
        """s with -inf in the columns of padding: column j is position start + j, and
        positions >= length are padding. Traced only when the sequence does not fill its blocks."""
        if length % s.shape[1] == 0:
            return s
        if self.interpret:
            column = lax.broadcasted_iota(jnp.int32, s.shape, 1)
        else:
            column = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        return jnp.where(column < length - start, s, -jnp.inf)

    def matmul_t(self, a_ref, b_ref) -> jax.Array:
        """a @ b^T in float32 for SMEM tiles a (m, d) and b (n, d)."""
        if self.interpret:
            self.t_stage[...] = b_ref[...].T  # (d, n)
            b_t = self.t_stage
        else:
            b_t = plgpu.transpose_ref(b_ref, (1, 0))
        return _product(a_ref, b_t, (a_ref.shape[0], b_ref.shape[0]))

    def matmul_add(self, acc: jax.Array, a: jax.Array, b_ref) -> jax.Array:
        """acc + a @ b for a float32 accumulator, a (m, k) in registers, b (k, n) in SMEM."""
        if self.interpret:
            self.lhs_stage[...] = a
            return acc + _product(self.lhs_stage, b_ref, acc.shape)

        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _stream(tiles, slots, loaded, consumed, *, steps: int, stages: int):
    """Memory warpgroup: copies tile `step` of every input into ring slot step % stages, once
    the compute warpgroups have released that slot. tiles[i](step) is a GMEM ref view."""

    def issue(step, slot):
        for tile, slot_ref, barrier in zip(tiles, slots, loaded, strict=True):
            plgpu.copy_gmem_to_smem(tile(step), slot_ref.at[slot], barrier.at[slot])

    for step in range(stages):
        issue(step, step)

    @pl.loop(0, steps - stages)
    def _refill(step):
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        plgpu.barrier_wait(consumed.at[slot])
        issue(step + stages, slot)

    # Waits out the last releases too, so that every phase of each barrier is observed
    # (the interpreter checks this; on the GPU it only delays this warpgroup's exit).
    for step in range(max(steps - stages, 0), steps):
        plgpu.barrier_wait(consumed.at[step % stages])


def _consume(step_fn, carry, loaded, consumed, *, steps: int, stages: int):
    """Compute warpgroup: runs carry = step_fn(slot, step, carry) for each streamed step,
    waiting for the slot's tiles and releasing the slot afterwards."""

    def body(step, carry):
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        for barrier in loaded:
            plgpu.barrier_wait(barrier.at[slot])
        carry = step_fn(slot, step, carry)
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    return lax.fori_loop(0, steps, body, carry)


def _load_tiles(pairs, barriers):
    """Compute warpgroup: TMA-copies each (GMEM view, SMEM ref) pair and waits for all."""
    for (src, dst), barrier in zip(pairs, barriers, strict=True):
        plgpu.copy_gmem_to_smem(src, dst, barrier)
    for barrier in barriers:
        plgpu.barrier_wait(barrier)


def _store_tiles(pairs):
    """Compute warpgroup: writes each (SMEM ref, GMEM view) pair out and waits."""
    plgpu.commit_smem()
    for src, dst in pairs:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def _warp_specialize(compute, tiles, slots, loaded, consumed, *, steps: int, stages: int):
    """Runs compute(wg) on warpgroups 0..COMPUTE_WGS-1 and `_stream` on the last one, which
    hands its registers to the others (it only issues TMA copies)."""
    wg = lax.axis_index("wg")

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        compute(wg)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        _stream(tiles, slots, loaded, consumed, steps=steps, stages=stages)


def _seq_tiles(refs, batch, head, block: int) -> list:
    """For each [b, seq, h, d] ref, the function step -> its (block, d) tile number step."""
    return [lambda i, x=x: x.at[batch, pl.ds(i * block, block), head] for x in refs]


def _forward_kernel(
    q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem2, lse_smem2, k_smem, v_smem, q_bars, loaded,
    consumed, stage, *, bq, bk, kv_len, stages, interpret,
):  # fmt: skip
    """Online softmax (FlashAttention Algorithm 1) for bq rows per compute warpgroup."""
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    steps = k_ref.shape[1] // bk
    dtype, head_dim = q_ref.dtype, q_ref.shape[-1]
    logit_scale = head_dim**-0.5 * LOG2E  # base-2 logits: exp2 is the native instruction

    def compute(wg):
        ops = _Ops(interpret, *(buffer.at[wg] for buffer in stage))
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        q_start = lax.axis_index("q_blocks") * (COMPUTE_WGS * bq) + wg * bq
        rows = (batch, pl.ds(q_start, bq), head)
        _load_tiles([(q_ref.at[rows], q_smem)], [q_bars.at[wg]])
        m = ops.layout(jnp.full((bq,), -jnp.inf, jnp.float32), ROW)  # running row max
        ell = ops.layout(jnp.zeros((bq,), jnp.float32), ROW)  # FlashAttention's l: sum of 2^(s - m)
        acc = ops.layout(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)

        def step(slot, kv_step, carry):
            acc, m, ell = carry
            s = ops.matmul_t(q_smem, k_smem.at[slot]) * logit_scale  # (bq, bk)
            s = ops.mask_columns(s, kv_step * bk, kv_len)
            # The first kv tile holds a real key, so m_next is finite from then on.
            m_next = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_next)  # rescales what was accumulated under the old max
            p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))  # (bq, bk)
            ell = ell * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            acc = ops.matmul_add(acc, p.astype(dtype), v_smem.at[slot])  # (bq, head_dim)
            return acc, m_next, ell

        acc, m, ell = _consume(step, (acc, m, ell), loaded, consumed, steps=steps, stages=stages)
        q_smem[...] = (acc / lax.broadcast_in_dim(ell, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m + jnp.log2(ell)
        _store_tiles(
            [(q_smem, o_ref.at[rows]), (lse_smem, lse_ref.at[batch, head, pl.ds(q_start, bq)])]
        )

    tiles = _seq_tiles((k_ref, v_ref), batch, head, bk)
    _warp_specialize(compute, tiles, (k_smem, v_smem), loaded, consumed, steps=steps, stages=stages)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2, lse_smem2,
    delta_smem2, k_smem, v_smem, own_bars, loaded, consumed, stage, *, bq, bk, kv_len, stages,
    interpret,
):  # fmt: skip
    """dq for bq rows per compute warpgroup, over streamed K, V (FlashAttention Alg. 2)."""
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    steps = k_ref.shape[1] // bk
    dtype, head_dim = q_ref.dtype, q_ref.shape[-1]
    scale = head_dim**-0.5

    def compute(wg):
        ops = _Ops(interpret, *(buffer.at[wg] for buffer in stage))
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
        q_start = lax.axis_index("q_blocks") * (COMPUTE_WGS * bq) + wg * bq
        rows, stats = (batch, pl.ds(q_start, bq), head), (batch, head, pl.ds(q_start, bq))
        pairs = [(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem)]
        pairs += [(lse_ref.at[stats], lse_smem), (delta_ref.at[stats], delta_smem)]
        _load_tiles(pairs, [bars.at[wg] for bars in own_bars])
        lse = lax.broadcast_in_dim(ops.load(lse_smem, ROW), (bq, bk), [0])
        delta = lax.broadcast_in_dim(ops.load(delta_smem, ROW), (bq, bk), [0])
        dq = ops.layout(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)

        def step(slot, kv_step, dq):
            s = ops.matmul_t(q_smem, k_smem.at[slot]) * (scale * LOG2E)  # (bq, bk)
            s = ops.mask_columns(s, kv_step * bk, kv_len)
            p = jnp.exp2(s - lse)
            dp = ops.matmul_t(do_smem, v_smem.at[slot])  # (bq, bk)
            ds = p * (dp - delta)
            return ops.matmul_add(dq, ds.astype(dtype), k_smem.at[slot])  # (bq, head_dim)

        dq = _consume(step, dq, loaded, consumed, steps=steps, stages=stages)
        q_smem[...] = (dq * scale).astype(dtype)
        _store_tiles([(q_smem, dq_ref.at[rows])])

    tiles = _seq_tiles((k_ref, v_ref), batch, head, bk)
    _warp_specialize(compute, tiles, (k_smem, v_smem), loaded, consumed, steps=steps, stages=stages)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem2, v_smem2,
    own_bars, q_smem, do_smem, lse_smem, delta_smem, loaded, consumed, stage, *, bq, bk, q_len,
    stages, interpret,
):  # fmt: skip
    """dk, dv for bk rows per compute warpgroup over streamed Q, dO, lse2, delta, computed
    transposed so that lse2 and delta broadcast along columns (FlashAttention Alg. 2)."""
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    steps = q_ref.shape[1] // bq
    dtype, head_dim = k_ref.dtype, k_ref.shape[-1]
    scale = head_dim**-0.5

    def compute(wg):
        ops = _Ops(interpret, *(buffer.at[wg] for buffer in stage))
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        kv_start = lax.axis_index("kv_blocks") * (COMPUTE_WGS * bk) + wg * bk
        rows = (batch, pl.ds(kv_start, bk), head)
        _load_tiles(
            [(k_ref.at[rows], k_smem), (v_ref.at[rows], v_smem)], [bars.at[wg] for bars in own_bars]
        )
        dk = dv = ops.layout(jnp.zeros((bk, head_dim), jnp.float32), plgpu.Layout.WGMMA)

        def step(slot, q_step, carry):
            dk, dv = carry
            s_t = ops.matmul_t(k_smem, q_smem.at[slot]) * (scale * LOG2E)  # (bk, bq)
            s_t = ops.mask_columns(s_t, q_step * bq, q_len)
            lse = lax.broadcast_in_dim(ops.load(lse_smem.at[slot], COLUMN), s_t.shape, [1])
            p_t = jnp.exp2(s_t - lse)
            dv = ops.matmul_add(dv, p_t.astype(dtype), do_smem.at[slot])  # (bk, head_dim)
            dp_t = ops.matmul_t(v_smem, do_smem.at[slot])  # (bk, bq)
            delta = lax.broadcast_in_dim(ops.load(delta_smem.at[slot], COLUMN), s_t.shape, [1])
            ds_t = p_t * (dp_t - delta)
            dk = ops.matmul_add(dk, ds_t.astype(dtype), q_smem.at[slot])  # (bk, head_dim)
            return dk, dv

        dk, dv = _consume(step, (dk, dv), loaded, consumed, steps=steps, stages=stages)
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        _store_tiles([(k_smem, dk_ref.at[rows]), (v_smem, dv_ref.at[rows])])

    tiles = _seq_tiles((q_ref, do_ref), batch, head, bq)
    tiles += [lambda i, x=x: x.at[batch, head, pl.ds(i * bq, bq)] for x in (lse_ref, delta_ref)]
    slots = (q_smem, do_smem, lse_smem, delta_smem)
    _warp_specialize(compute, tiles, slots, loaded, consumed, steps=steps, stages=stages)


def _tiles(count: int, lead: int, rows: int, head_dim: int, dtype) -> tuple:
    """`count` (lead, rows, head_dim) SMEM buffers in the swizzled layout wgmma reads."""
    return tuple(
        plgpu.SMEM((lead, rows, head_dim), dtype, transforms=TRANSFORMS) for _ in range(count)
    )


def _stage(head_dim: int, lhs_rows: int, cols: int, dtype, interpret: bool) -> tuple:
    """Per-warpgroup staging buffers of the interpreted form (B^T tiles, left operands)."""
    if not interpret:
        return ()
    return (
        plgpu.SMEM((COMPUTE_WGS, head_dim, cols), dtype),  # B^T tiles
        plgpu.SMEM((COMPUTE_WGS, lhs_rows, cols), dtype),  # left operands
    )


def _barriers(count: int, num_barriers: int) -> tuple:
    return tuple(plgpu.Barrier(num_barriers=num_barriers) for _ in range(count))


def _call(kernel, operands, outs, scratch, *, grid: dict, interpret: bool, name: str, **params):
    """kernel(*operands, *outputs, *scratch, interpret=, **params) as a plgpu.kernel over
    `grid` (axis name: size) with COMPUTE_WGS + 1 warpgroups named "wg", compiled or
    interpreted; `outs` are the outputs' (shape, dtype)."""
    body = functools.partial(kernel, interpret=interpret, **params)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        # NaN-filled fresh buffers, so an output tile the kernel never writes shows.
        interpret = InterpretGPUParams(uninitialized_memory="nan")
    out_types = [out_type(shape, dtype, *operands) for shape, dtype in outs]
    outputs = plgpu.kernel(
        body, out_type=out_types, scratch_types=scratch, grid=tuple(grid.values()),
        grid_names=tuple(grid), num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=COMPILER_PARAMS, interpret=interpret or None, kernel_name=name,
    )(*operands)  # fmt: skip
    # JAX 0.10's plgpu.kernel runs with the vma check off and drops the varying axes that
    # out_type declares; add back those the inputs vary over.
    inputs = varying(*operands)
    return [lax.pcast(x, tuple(inputs - varying(x)), to="varying") for x in outputs]


def _forward(q, k, v, *, kv_len, blocks, interpret):
    """o and lse2 (float32, [b, h, tq]) of padded [b, seq, h, d] inputs."""
    b, tq, h, d = q.shape
    bq, bk = blocks.block_q, blocks.block_kv
    stages = min(blocks.stages, k.shape[1] // bk)
    scratch = [
        *_tiles(1, COMPUTE_WGS, bq, d, q.dtype),  # q, then o
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse2
        *_tiles(2, stages, bk, d, q.dtype),  # k, v rings
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q loaded
        _barriers(2, stages),  # k, v loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # slot consumed, by every wg
        _stage(d, bq, bk, q.dtype, interpret),
    ]
    return _call(
        _forward_kernel, (q, k, v), [(q.shape, q.dtype), ((b, h, tq), jnp.float32)], scratch,
        grid={"heads": h, "q_blocks": tq // (COMPUTE_WGS * bq), "batch": b}, interpret=interpret,
        name="flash_attention_gpu_forward", bq=bq, bk=bk, kv_len=kv_len, stages=stages,
    )  # fmt: skip


def _backward(q, k, v, do, lse, delta, *, q_len, kv_len, blocks, interpret):
    """dq, dk, dv of padded [b, seq, h, d] inputs; lse2 and delta are [b, h, seq]."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    operands = (q, k, v, do, lse, delta)

    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    stages = min(blocks.stages, tk // bk)
    dq_scratch = [
        *_tiles(2, COMPUTE_WGS, bq, d, q.dtype),  # q (then dq), do
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse2
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # delta
        *_tiles(2, stages, bk, d, q.dtype),  # k, v rings
        _barriers(4, COMPUTE_WGS),  # q, do, lse2, delta loaded
        _barriers(2, stages),  # k, v loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # slot consumed, by every wg
        _stage(d, bq, bk, q.dtype, interpret),
    ]
    (dq,) = _call(
        _dq_kernel, operands, [(q.shape, q.dtype)], dq_scratch,
        grid={"heads": h, "q_blocks": tq // (COMPUTE_WGS * bq), "batch": b}, interpret=interpret,
        name="flash_attention_gpu_dq", bq=bq, bk=bk, kv_len=kv_len, stages=stages,
    )  # fmt: skip

    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    stages = min(blocks.stages, tq // bq)
    dkv_scratch = [
        *_tiles(2, COMPUTE_WGS, bk, d, q.dtype),  # k, v (then dk, dv)
        _barriers(2, COMPUTE_WGS),  # k, v loaded
        *_tiles(2, stages, bq, d, q.dtype),  # q, do rings
        plgpu.SMEM((stages, bq), jnp.float32),  # lse2 ring
        plgpu.SMEM((stages, bq), jnp.float32),  # delta ring
        _barriers(4, stages),  # q, do, lse2, delta loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # slot consumed, by every wg
        _stage(d, bk, bq, q.dtype, interpret),
    ]
    dk, dv = _call(
        _dkv_kernel, operands, [(k.shape, k.dtype), (v.shape, v.dtype)], dkv_scratch,
        grid={"heads": h, "kv_blocks": tk // (COMPUTE_WGS * bk), "batch": b}, interpret=interpret,
        name="flash_attention_gpu_dkv", bq=bq, bk=bk, q_len=q_len, stages=stages,
    )  # fmt: skip
    return dq, dk, dv


_flash = flash_vjp(_forward, _backward, seq_axis=1)


def flash_attention_gpu(
    q: Float[Array, "b t h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"], *,
    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
) -> Float[Array, "b t h d"]:  # fmt: skip
    """softmax(q k^T / sqrt(d)) v with the Mosaic GPU kernels, differentiable: compiled for
    Hopper GPUs (sm_90+), or run on CPU by the Mosaic GPU interpreter with `interpret=True`.
    Any sequence lengths; accumulation is float32."""
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype={q.dtype} must be bfloat16 or float16")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]} must be one of {HEAD_DIMS}")
    return _flash(
        q,
        k,
        v,
        block_sizes,
        interpret,
        q_multiple=block_sizes.q_multiple,
        kv_multiple=block_sizes.kv_multiple,
    )
