"""BGMV expand on Mosaic GPU (jax.experimental.pallas.mosaic_gpu, Hopper), the Triton expand's
counterpart for choosing by measurement (bench/kernels/lora.py): the same inputs, the same output,
and the same oracle (reference.lora_decode_expand_reference, through lora_decode_expand_group).

Grid (token, block of output units), one warpgroup each. A program copies each of its token's B rows'
block ([out_units, Dh] from the unified pool, at the pair's dynamic unit) into shared memory with the
TMA, up to max_rank (at most 32) copies in flight on their own barriers, then sums s * rows in float32 and
writes its block back through shared memory. Tokens with more pairs than one load holds take more
loads (the barriers are reused; their phase flips each time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lora.shapes import LoraTunables, output_blocks, pow2_at_least, projection_of

MAX_BARRIERS = 32  # a barrier group holds at most 32 barriers: larger ranks take several loads


def interpret_params() -> object | None:
    """Mosaic GPU's own interpreter (simulated shared memory, TMA and barriers) for running on CPU;
    None where this JAX has none (the generic interpreter cannot run TMA copies)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams()


def _expand_body(
    layer_ref, off_ref, b_ref, s_ref, pool_ref, o_ref, *, out_units, pairs, n_pairs, n_tokens, block_starts
):
    n = lax.axis_index("n")
    j = lax.axis_index("j")
    layer = layer_ref[0]
    m, local = projection_of(j, block_starts)
    start = off_ref[m * (n_tokens + 1) + n]
    count = off_ref[m * (n_tokens + 1) + n + 1] - start
    dh = pool_ref.shape[2]

    def scope(rows_smem, acc_smem, out_smem, barriers):
        def load(c, carry):
            first = start + c * pairs
            for p in range(pairs):  # issue every copy first: they fly together

                @pl.when(c * pairs + p < count)
                def _(p=p):
                    unit = b_ref[m * n_pairs + first + p] + local * out_units
                    plgpu.copy_gmem_to_smem(
                        pool_ref.at[layer, pl.ds(unit, out_units)], rows_smem.at[p], barriers.at[p]
                    )

            acc = acc_smem[...]
            for p in range(pairs):
                valid = c * pairs + p < count

                @pl.when(valid)
                def _(p=p):
                    plgpu.barrier_wait(barriers.at[p])

                s = s_ref[m * n_pairs + jnp.minimum(first + p, n_pairs - 1)]
                acc = acc + jnp.where(valid, rows_smem[p].astype(jnp.float32) * s, 0.0)
            acc_smem[...] = acc  # in shared memory, not a loop carry: its register layout may change
            return carry

        acc_smem[...] = jnp.zeros((out_units, dh), jnp.float32)
        lax.fori_loop(0, (count + pairs - 1) // pairs, load, jnp.int32(0))
        out_smem[...] = acc_smem[...].astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, o_ref.at[n, pl.ds(j * out_units, out_units)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scope,
        plgpu.SMEM((pairs, out_units, dh), pool_ref.dtype),
        plgpu.SMEM((out_units, dh), jnp.float32),
        plgpu.SMEM((out_units, dh), o_ref.dtype),
        plgpu.Barrier(num_barriers=pairs),
    )


@functools.partial(jax.jit, static_argnames=("h_outs", "dtype", "tunables", "max_rank", "interpret"))
def bgmv_expand_mosaic(
    shrunk: jax.Array,  # [G*K] float32
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    b_start: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32
    *,
    h_outs: tuple[int, ...],
    dtype: jnp.dtype,
    tunables: LoraTunables,
    max_rank: int = 16,
    interpret: bool = False,
) -> jax.Array:  # [N, sum(h_outs)] in dtype, as kernel.bgmv_expand
    params = interpret_params() if interpret else False
    if interpret and params is None:
        raise NotImplementedError("this JAX has no Mosaic GPU interpreter: run the Mosaic expand on a GPU")
    g = len(h_outs)
    n = offsets.shape[0] // g - 1
    dh = pool.shape[2]
    # a warpgroup's register arrays hold a multiple of 128 elements: blocks of at least 128 / Dh units
    units, out_units, blocks, starts = output_blocks(h_outs, dh, max(tunables.out_units, -(-128 // dh)))
    if (out_units * dh) % 128:
        raise ValueError(f"the Mosaic expand needs output blocks of 128 elements; widths {h_outs}, Dh {dh}")
    body = functools.partial(
        _expand_body,
        out_units=out_units,
        pairs=min(pow2_at_least(max_rank), MAX_BARRIERS),
        n_pairs=b_start.shape[0] // g,
        n_tokens=n,
        block_starts=starts,
    )
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, sum(units), dh), dtype),
        grid=(n, sum(blocks)),
        grid_names=("n", "j"),
        # lane semantics (per-thread register arrays, scalar broadcasts) on every JAX: 0.11 defaults to
        # warpgroup semantics, which has no implicit broadcast
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=params,
    )
    out = call(jnp.reshape(layer, (1,)).astype(jnp.int32), offsets, b_start, shrunk, pool)
    return out.reshape(n, sum(h_outs))
