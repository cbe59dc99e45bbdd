"""The decoder over the unified paged pool: forward_paged(params, pool, batch, lora) -> (pool, logits).

Layers run under lax.scan over stacked weights, or as an unrolled loop when params["layers"] is a list
of per-layer trees (unstack_layers): then every layer's weights are their own buffers and no per-layer
slice is copied before its matmuls. Inside the layer loop the pool is read-only (cached K/V pages and
adapter rows); the step's new K/V come out of the loop and are written into their pages in one in-place
scatter (the pool is donated), or, with kv_write="per_layer", each layer's before its attention.

`batch` may be a tuple of batches (a mixed step: decode rows, then prefill chunks): their tokens share
every matmul, and each batch has its own attention and LoRA (_Parts). With the Pallas kernels each
batch's attention and LoRA kernels read and write its rows of the step's arrays in place (no slices of
the step's activations and no joins of the batches' outputs); other paths split and join.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.metadata import DecodeGroup, DecodeLora, PagedBatch, PrefillGroup, PrefillLora
from jlora.model.llama import GATE_UP, QKV, DecoderLayer, add_deltas, lm_head, side_by_side
from pallas_kernels.backend import resolve
from pallas_kernels.cpu import pack_panels
from pallas_kernels.lora import (
    lora_decode,
    lora_decode_group,
    lora_decode_group_add,
    lora_mixed_group_add,
    lora_prefill,
    lora_prefill_group,
    lora_prefill_group_add,
)
from pallas_kernels.paged_attention import (
    paged_attention,
    paged_attention_mixed_rows,
    paged_attention_rows,
    write_kv,
    write_kv_layer,
)


def unstack_layers(params: dict[str, Any], fuse: bool = False) -> dict[str, Any]:
    """The same params with "layers" as a list of per-layer trees (for the unrolled layer loop); with
    fuse, each layer's q/k/v and gate/up kernels (and biases) joined column-wise (fuse_layer)."""
    stacked = params["layers"]
    if isinstance(stacked, list | tuple):
        layers = list(stacked)
    else:
        n = jax.tree.leaves(stacked)[0].shape[0]
        layers = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
    if fuse:
        layers = [fuse_layer(layer) for layer in layers]
    return {**params, "layers": layers}


def fuse_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """One layer's params with q/k/v as "qkv_proj" and gate/up as "gate_up_proj" (DecoderLayer's
    fused form): one matmul each instead of three and two."""
    out = dict(layer)
    for name, members in (("qkv_proj", QKV), ("gate_up_proj", GATE_UP)):
        parts = [out.pop(m) for m in members]
        out[name] = {k: jnp.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    return out


def pack_linear_weights(params: dict[str, Any]) -> dict[str, Any]:
    """The same params with every projection's "kernel" [.., in, out] replaced by "panels" (column
    panels, pallas_kernels.cpu.pack_panels: the CPU panel kernel's layout), and the logits' weights
    added as "lm_head_panels" (a tied head keeps "embed" for the token lookup)."""

    def pack_layer(layer: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, leaf in layer.items():
            if isinstance(leaf, dict) and "kernel" in leaf:
                rest = {k: v for k, v in leaf.items() if k != "kernel"}
                out[name] = {**rest, "panels": pack_panels(leaf["kernel"])}
            else:
                out[name] = leaf
        return out

    layers = params["layers"]
    packed = [pack_layer(x) for x in layers] if isinstance(layers, list | tuple) else pack_layer(layers)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    out["layers"] = packed
    head = params["lm_head"] if "lm_head" in params else params["embed"].T  # [D, V]
    out["lm_head_panels"] = pack_panels(head)
    return out


def is_fused(layer_params: dict[str, Any]) -> bool:
    return "qkv_proj" in layer_params


class _BatchLora:
    """One batch's LoRA in a layer. deltas(modules, x [B, T, in], pool as of this point of the layer)
    -> the modules' deltas side by side, or None. add_rows(modules, x [N, in], y [N, out], pool,
    row_start, (B, T)) -> y with the deltas of the batch's rows [row_start, row_start + B*T) added (a
    mixed step's batch; the kernels read x and add into y in place). direct(modules): the metadata that
    add_rows hands to the kernels as it is (a group asked for whole, or one ungrouped projection), else
    None."""

    def __init__(self, deltas: Callable, add_rows: Callable, direct: Callable):
        self.deltas = deltas
        self.add_rows = add_rows
        self.direct = direct


def _rank_bucket(meta: Any, members: int, n_tokens: int) -> int:
    """The rank bucket of a projection's (or group's) LoRA metadata: the kernels' tile."""
    if isinstance(meta, PrefillGroup):
        return meta.rank
    if isinstance(meta, PrefillLora):
        return meta.a_start.shape[1]
    return meta.token_index.shape[0] // (members * n_tokens)


def _lora_for(
    lora: dict[str, Any], layer: jax.Array, shapes: dict[str, tuple[int, int]], impl: str
) -> _BatchLora:
    """One batch's LoRA (_BatchLora). A DecodeGroup or PrefillGroup asked for as a whole (a fused
    projection) returns its launches' output as it is; asked for by member, its first member runs the
    group's launches and the others reuse them."""
    groups = {m: g for g in lora.values() if isinstance(g, DecodeGroup | PrefillGroup) for m in g.modules}
    shared: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}  # group -> (its input, its deltas)

    def launch(meta: Any, modules: tuple[str, ...], x: jax.Array, rows_pool: jax.Array) -> jax.Array:
        """The deltas of one projection's or group's metadata, side by side: [B, T, sum of widths]."""
        b, t, h_in = x.shape
        widths = tuple(shapes[m][1] for m in modules)
        rank = _rank_bucket(meta, len(modules), b * t)
        if isinstance(meta, PrefillGroup):
            return lora_prefill_group(
                x, rows_pool, layer, meta.a_start, meta.b_start, widths, rank, implementation=impl
            )
        if isinstance(meta, PrefillLora):
            return lora_prefill(
                x, rows_pool, layer, meta.a_start, meta.b_start, widths[0], implementation=impl
            )
        pairs = (meta.token_index, meta.a_start, meta.b_start)
        flat = x.reshape(b * t, h_in)
        if isinstance(meta, DecodeGroup):
            out = lora_decode_group(
                flat, rows_pool, layer, *pairs, meta.offsets, widths, implementation=impl, max_rank=rank
            )
        else:
            out = lora_decode(
                flat, rows_pool, layer, *pairs, widths[0], meta.offsets, implementation=impl, max_rank=rank
            )
        return out.reshape(b, t, -1)

    def lora_fn(names: tuple[str, ...], x: jax.Array, rows_pool: jax.Array) -> jax.Array | None:
        group = groups.get(names[0])
        if group is not None and group.modules == names:  # the fused projection's members, in order
            return launch(group, names, x, rows_pool)
        deltas = [one(name, x, rows_pool) for name in names]
        return side_by_side(deltas, [shapes[m][1] for m in names], x)

    def one(name: str, x: jax.Array, rows_pool: jax.Array) -> jax.Array | None:
        group = groups.get(name)
        if group is not None:
            if group.modules not in shared or shared[group.modules][0] is not x:
                shared[group.modules] = (x, launch(group, group.modules, x, rows_pool))
            i = group.modules.index(name)
            col = sum(shapes[m][1] for m in group.modules[:i])
            return shared[group.modules][1][..., col : col + shapes[name][1]]
        meta = lora.get(name)
        return None if meta is None else launch(meta, (name,), x, rows_pool)

    row_inputs: dict[int, tuple[jax.Array, jax.Array]] = {}  # row_start -> (x, its rows as [B, T, in])

    def direct(names: tuple[str, ...]) -> Any:
        group = groups.get(names[0])
        if group is not None and group.modules == names:
            return group
        return lora.get(names[0]) if len(names) == 1 and names[0] not in groups else None

    def add_rows(names, x, y, rows_pool, row_start: int, shape: tuple[int, int]) -> jax.Array:
        b, t = shape
        meta = direct(names)
        if meta is None and len(names) == 1 and names[0] not in groups:
            return y  # no LoRA on this projection
        if meta is None:  # members of a group asked for apart, or several ungrouped projections
            rows = slice(row_start, row_start + b * t)
            if row_inputs.get(row_start, (None,))[0] is not x:  # one slice, so a group launches once
                row_inputs[row_start] = (x, x[rows].reshape(b, t, -1))
            delta = lora_fn(names, row_inputs[row_start][1], rows_pool)
            return y if delta is None else y.at[rows].add(delta.reshape(b * t, -1).astype(y.dtype))
        widths = tuple(shapes[m][1] for m in names)
        rank = _rank_bucket(meta, len(names), b * t)
        kw = dict(row_start=row_start, implementation=impl)
        if isinstance(meta, PrefillGroup | PrefillLora):
            return lora_prefill_group_add(
                y, x, rows_pool, layer, meta.a_start, meta.b_start, widths, rank, seq_len=t, **kw
            )
        pairs = (meta.token_index, meta.a_start, meta.b_start, meta.offsets)
        return lora_decode_group_add(y, x, rows_pool, layer, *pairs, widths, max_rank=rank, **kw)

    return _BatchLora(lora_fn, add_rows, direct)


def _add_mixed_rows(fns, parts, names, shapes, x, y, rows_pool, layer, impl) -> jax.Array | None:
    """y with a mixed step's LoRA deltas added when its two batches are decode rows and prompt chunks
    whose metadata go to the kernels as they are (lora_mixed_group_add: one shrink and one expand launch
    for both where the tuned shapes say so); None otherwise."""
    pair = parts.decode_and_chunks
    if pair is None or any(fn is None for fn in fns):
        return None
    i_dec, i_pre = pair
    dec, pre = fns[i_dec].direct(names), fns[i_pre].direct(names)
    if not (isinstance(dec, DecodeGroup | DecodeLora) and isinstance(pre, PrefillGroup | PrefillLora)):
        return None
    batches, starts = parts.batches, parts.starts
    n_dec = batches[i_dec].tokens.shape[0]  # one token a row
    b, t = batches[i_pre].tokens.shape
    return lora_mixed_group_add(
        y,
        x,
        rows_pool,
        layer,
        (dec.token_index, dec.a_start, dec.b_start, dec.offsets),
        (pre.a_start, pre.b_start),
        tuple(shapes[m][1] for m in names),
        decode_row_start=starts[i_dec],
        prefill_row_start=starts[i_pre],
        max_rank=_rank_bucket(dec, len(names), n_dec),
        rank=_rank_bucket(pre, len(names), b * t),
        seq_len=t,
        implementation=impl,
    )


class _Parts:
    """A step's batches as one token sequence: a single batch keeps its [B, T] rows; several (a mixed
    step: decode rows and prefill chunks) are flattened and joined into one row [1, sum B*T], so that
    every matmul reads the weights once for all of them, and split again for attention and LoRA."""

    def __init__(self, batches: tuple[PagedBatch, ...]):
        self.batches = batches
        self.sizes = [b.tokens.shape[0] * b.tokens.shape[1] for b in batches]
        self.starts = [sum(self.sizes[:i]) for i in range(len(batches))]  # each batch's first row

    @property
    def single(self) -> bool:
        return len(self.batches) == 1

    @property
    def decode_and_chunks(self) -> tuple[int, int] | None:
        """(index of the decode batch, index of the prompt-chunk batch) of a mixed step of those two
        batches (their kernels may share launches); None for any other step."""
        lens = [b.tokens.shape[1] for b in self.batches]
        if len(lens) != 2 or sorted(lens)[0] != 1 or max(lens) == 1:
            return None
        return lens.index(1), 1 - lens.index(1)

    def join(self, xs: list[jax.Array]) -> jax.Array:
        """Per-batch [B_i, T_i, ...] -> the step's layout ([B, T, ...] or [1, N, ...])."""
        if self.single:
            return xs[0]
        return jnp.concatenate([x.reshape(1, -1, *x.shape[2:]) for x in xs], axis=1)

    def split(self, x: jax.Array) -> list[jax.Array]:
        """The step's layout -> per-batch [B_i, T_i, ...]."""
        if self.single:
            return [x]
        out, start = [], 0
        for batch, size in zip(self.batches, self.sizes):
            out.append(x[0, start : start + size].reshape(*batch.tokens.shape, *x.shape[2:]))
            start += size
        return out

    def sampled_rows(self, h: jax.Array) -> jax.Array:
        """The hidden state of each row's sampled token: [sum B_i, D] (h in the step's layout)."""
        start, index = 0, []
        for batch, size in zip(self.batches, self.sizes):
            b, t = batch.tokens.shape
            index.append(start + jnp.arange(b, dtype=jnp.int32) * t + batch.logits_at)
            start += size
        return h.reshape(-1, h.shape[-1])[jnp.concatenate(index)]


def forward_paged(
    params: dict[str, Any],
    pool: jax.Array,  # [L, U, Dh]
    batch: PagedBatch | tuple[PagedBatch, ...],
    lora: dict[str, DecodeLora] | dict[str, PrefillLora] | None | tuple,
    *,
    config: ModelConfig,
    page_size: int,
    impl: str = "reference",
    prefill_kernel: bool | None = None,
    tp_axis: str | None = None,
    kv_write: str = "end",
    in_place: str = "mixed",
    materialize_norms: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:  # pool, logits [B, V] float32 (B: every batch's rows, in order)
    """With tp_axis (inside shard_map), `config` is one shard's geometry and `pool` its slice; row-split
    outputs are summed over tp_axis and vocab-split logits gathered.

    A tuple of batches (with a tuple of their LoRA metadata) is one mixed step: decode rows and prefill
    chunks through the same matmuls (_Parts), each batch with its own attention and LoRA.

    kv_write (unrolled layers only): "end" writes every layer's new K/V in one scatter after the last
    layer; "per_layer" writes each layer's K/V before its attention, and what follows reads the pool as
    written. Results are the same. XLA's CPU compiler copies the whole donated pool twice per step when
    reads of it (the attention and LoRA gathers) do not all flow into the final scatter, as with "end";
    with "per_layer" every read precedes a write in dataflow or comes after the last one, so the pool is
    updated in place.

    in_place ("mixed", "all", "off"): in which steps, with the Pallas kernels, each batch's attention and
    LoRA kernels work on its rows of the step's arrays and add LoRA deltas into the projection's output
    (no slices, joins or separate adds); other paths always split and join.

    materialize_norms: the norms (by parameter name) whose scaled output, with LoRA, is written once for
    both the matmul and the LoRA kernels (DecoderLayer.materialize_norms)."""
    if kv_write not in ("end", "per_layer"):
        raise ValueError(f"kv_write must be 'end' or 'per_layer', not {kv_write!r}")
    if in_place not in ("mixed", "all", "off"):
        raise ValueError(f"in_place must be 'mixed', 'all' or 'off', not {in_place!r}")
    batches = batch if isinstance(batch, tuple) else (batch,)
    loras = lora if isinstance(lora, tuple) else (lora,)
    if len(loras) != len(batches):
        raise ValueError(f"{len(batches)} batches but {len(loras)} LoRA metadata entries")
    parts = _Parts(batches)
    reduce = (lambda x: jax.lax.psum(x, tp_axis)) if tp_axis else None
    layers = params["layers"]
    fused = isinstance(layers, list | tuple) and is_fused(layers[0])
    layer_module = DecoderLayer(
        config, params["embed"].dtype, fused=fused, materialize_norms=materialize_norms
    )
    h = jnp.take(params["embed"], parts.join([b.tokens for b in batches]), axis=0)  # [B, T, D]
    positions = parts.join([b.positions for b in batches])
    write_units = parts.join([b.write_units for b in batches])
    shapes = config.module_shapes()
    any_lora = any(m is not None for m in loras)
    # with the Pallas kernels ("cpu" resolves to the reference), each batch's kernels work on its rows
    # of the step's arrays in place
    kernels = resolve(impl) != "reference"
    rows_mode = kernels and (in_place == "all" or (in_place == "mixed" and not parts.single))

    def body(h, xs, pool=pool, write_now=False):
        """One layer. With write_now the attention state is the pool: K/V are written into it first and
        the layer returns it; otherwise the state is the layer's (k, v), written after the loop."""
        layer_params, layer = xs

        def attend(q, k, v, state):
            pages = state if write_now else pool  # with write_now, the pool as `store` left it
            new_state = pages if write_now else (k, v)
            window = dict(page_size=page_size, sliding_window=config.sliding_window, implementation=impl)
            if rows_mode:  # every batch's kernels on its rows of the step's q/k/v, into one output
                n = q.shape[0] * q.shape[1]
                qf, kf, vf = (x.reshape(n, *x.shape[2:]) for x in (q, k, v))
                if parts.decode_and_chunks is not None:  # both batches' attention in one call
                    i_dec, i_pre = parts.decode_and_chunks
                    dec, pre = batches[i_dec], batches[i_pre]
                    out = paged_attention_mixed_rows(
                        qf,
                        kf,
                        vf,
                        pages,
                        layer,
                        (dec.page_tables, dec.positions, dec.cached_lens, dec.new_lens),
                        (pre.page_tables, pre.positions, pre.cached_lens, pre.new_lens),
                        decode_row_start=parts.starts[i_dec],
                        prefill_row_start=parts.starts[i_pre],
                        prefill_kernel=prefill_kernel,
                        **window,
                    )
                    return out.reshape(*q.shape[:2], -1), new_state
                out = None
                for b, start in zip(batches, parts.starts):
                    out = paged_attention_rows(
                        qf,
                        kf,
                        vf,
                        pages,
                        layer,
                        b.page_tables,
                        b.positions,
                        b.cached_lens,
                        b.new_lens,
                        out,
                        row_start=start,
                        prefill_kernel=prefill_kernel,
                        **window,
                    )
                return out.reshape(*q.shape[:2], -1), new_state
            outs = []
            for b, qi, ki, vi in zip(batches, parts.split(q), parts.split(k), parts.split(v)):
                out = paged_attention(
                    qi,
                    ki,
                    vi,
                    pages,
                    layer,
                    b.page_tables,
                    b.positions,
                    b.cached_lens,
                    b.new_lens,
                    prefill_kernel=prefill_kernel,
                    **window,
                )
                outs.append(out.reshape(*out.shape[:2], -1))
            return parts.join(outs), new_state

        lora_fn = None
        if any_lora:
            fns = [_lora_for(m, layer, shapes, impl) if m is not None else None for m in loras]
            # (x, its per-batch parts, or its rows flat): a group's members share one input
            last_split: list = [None, None]

            def lora_fn(names, x, y, state):
                rows_pool = state if write_now else pool  # the pool as of this point of the layer
                if rows_mode:
                    n = x.shape[0] * x.shape[1]
                    if last_split[0] is not x:  # the same flat array, so a group's slice is made once
                        last_split[:] = [x, x.reshape(n, -1)]
                    xf, yf = last_split[1], y.reshape(n, -1)
                    mixed = _add_mixed_rows(fns, parts, names, shapes, xf, yf, rows_pool, layer, impl)
                    if mixed is not None:
                        return mixed.reshape(y.shape)
                    for fn, b, start in zip(fns, batches, parts.starts):
                        if fn is not None:
                            yf = fn.add_rows(names, xf, yf, rows_pool, start, b.tokens.shape)
                    return yf.reshape(y.shape)
                if last_split[0] is not x:  # the same split arrays, so a group launches once
                    last_split[:] = [x, parts.split(x)]
                xs = last_split[1]
                deltas = [fn.deltas(names, xi, rows_pool) if fn else None for fn, xi in zip(fns, xs)]
                if all(d is None for d in deltas):
                    return y
                width = sum(shapes[m][1] for m in names)
                return add_deltas(
                    y,
                    parts.join(
                        [
                            d if d is not None else jnp.zeros((*xi.shape[:2], width), x.dtype)
                            for d, xi in zip(deltas, xs)
                        ]
                    ),
                )

        def store(k, v, state):
            return write_kv_layer(state, layer, k, v, write_units)

        return layer_module.apply(
            {"params": layer_params},
            h,
            positions,
            pool if write_now else None,
            attend,
            lora_fn,
            reduce,
            store if write_now else None,
        )

    if isinstance(params["layers"], list | tuple) and kv_write == "per_layer":
        for i, layer_params in enumerate(params["layers"]):
            h, pool = body(h, (layer_params, jnp.int32(i)), pool, write_now=True)
    else:
        if isinstance(params["layers"], list | tuple):  # unstacked: one buffer per layer, no slicing
            ks, vs = [], []
            for i, layer_params in enumerate(params["layers"]):
                h, (k, v) = body(h, (layer_params, jnp.int32(i)))
                ks.append(k)
                vs.append(v)
            k, v = jnp.stack(ks), jnp.stack(vs)
        else:
            layers = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
            h, (k, v) = jax.lax.scan(body, h, (params["layers"], layers))  # k, v: [L, B, T, Hkv, Dh]
        pool = write_kv(pool, k, v, write_units, implementation=impl)
    logits = lm_head(params, config, parts.sampled_rows(h))
    if tp_axis and not config.tie_word_embeddings:  # lm_head is split by vocab columns
        logits = jax.lax.all_gather(logits, tp_axis, axis=logits.ndim - 1, tiled=True)
    return pool, logits
