"""The paged engine: owns params and the unified pool, compiles one step per bucket ahead of time,
and executes the scheduler's Schedules. It never decides anything itself.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, PartitionSpec

from checkpoints.peft import PeftAdapter
from jlora import multihost
from jlora.config import EngineConfig, ModelConfig
from jlora.metadata import DecodeGroup, DecodeLora, PagedBatch, PrefillGroup, PrefillLora
from jlora.model.paged import forward_paged, pack_linear_weights, unstack_layers
from jlora.packing import PackedSpec, pack, spec_of, unpack
from jlora.pool.device import (
    WRITE_CHUNK,
    PinnedPages,
    adapter_page_data,
    block_page_ids,
    can_pin,
    empty_block,
    largest_write,
    new_pool,
    pin_pages,
    to_device,
    write_block_sizes,
    write_blocks,
    write_pages,
)
from jlora.pool.layout import PoolLayout
from jlora.pool.memory import PoolManager
from jlora.sampling import SamplingArrays, sample
from jlora.scheduler import Schedule, ScheduledChunk
from jlora.sharding import (
    POOL_AXES,
    local_config,
    local_module_shapes,
    model_ways,
    param_specs,
    pool_sharding,
    replicated,
    shard_params,
)
from jlora.sharding import (
    spec as logical_spec,
)
from pallas_kernels.lora import prefill_group_width

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Bucket:
    kind: str  # "decode" | "prefill" | "mixed" (decode rows and prefill chunks in one call)
    batch: int  # rows (mixed: decode rows)
    tokens: int  # tokens per row (mixed: per prefill row; decode rows have one)
    pages: int
    lora: int  # 0: no LoRA; else the rank bucket (decode: K = batch * tokens * lora pairs)
    draw: bool = False  # some row samples with a temperature (sampling.sample's draw, chosen on the host)
    prefill_batch: int = 0  # mixed: prefill rows

    @property
    def name(self) -> str:
        rows = f"b{self.batch}+{self.prefill_batch}" if self.kind == "mixed" else f"b{self.batch}"
        name = f"{self.kind}_{rows}_t{self.tokens}_p{self.pages}_r{self.lora}"
        return name + "_draw" if self.draw else name

    def parts(self) -> list[tuple[str, int, int]]:
        """(kind, rows, tokens per row) of each batch the call carries, in order."""
        if self.kind == "mixed":
            return [("decode", self.batch, 1), ("prefill", self.prefill_batch, self.tokens)]
        return [(self.kind, self.batch, self.tokens)]


@dataclasses.dataclass
class SamplingRow:
    temperature: float
    top_k: int
    top_p: float
    seed_key: np.ndarray  # [2] uint32


PENDING = -1  # a token sampled by a step still in flight: the device feeds it from the token carry


@flax.struct.dataclass
class TokenFeed:
    """Where a step reads the tokens it does not know on the host and writes the ones it samples, in
    the engine's token carry (a small device array threaded through every step)."""

    source: jax.Array  # [B, T] int32 carry index of a pending token; -1: the packed token is real
    dest: jax.Array  # [B] int32 carry index for the row's sampled token; carry size: not kept


@dataclasses.dataclass
class PreparedCall:
    """One compiled call with its packed metadata, ready to launch."""

    bucket: str
    packed: np.ndarray
    sample_requests: list[int]  # requests whose row samples a token ...
    sample_rows: list[int]  # ... their batch rows
    carry_slots: list[int]  # ... and where in the token carry the step writes their tokens
    kind: str
    prefill_tokens: int  # prompt tokens the call prefills (its prefill chunks')


@dataclasses.dataclass
class InFlight:
    """Calls queued on the device; collect() waits for them."""

    calls: list[PreparedCall]
    outputs: list[jax.Array]
    launched_at: float
    sources: dict[int, int]  # request -> carry index of the token this step samples for it

    @property
    def sample_requests(self) -> list[int]:
        return [rid for call in self.calls for rid in call.sample_requests]


def _shape(*shape: int, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _smallest(options: tuple[int, ...], n: int) -> int:
    for o in sorted(options):
        if o >= n:
            return o
    raise ValueError(f"{n} exceeds the largest bucket {max(options)}")


def enable_compilation_cache(folder: str | None) -> None:
    if folder:
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pool_layout(
    model_config: ModelConfig,
    *,
    num_pages: int,
    page_size: int,
    lora_modules: tuple[str, ...],
    shards: int = 1,
) -> PoolLayout:
    """One shard's pool layout. A page holds that shard's KV heads, while the A rows of column-parallel
    projections stay whole, so an adapter takes more pages as the model is split further
    (`PoolManager(layout).adapter_pages_needed(ranks)`)."""
    local = local_config(model_config, shards)
    shapes = local_module_shapes(model_config, shards)
    return PoolLayout(
        num_layers=model_config.num_hidden_layers,
        num_pages=num_pages,
        page_size=page_size,
        num_kv_heads=local.num_key_value_heads,
        head_dim=model_config.head_dim,
        module_shapes=tuple((m, *shapes[m]) for m in lora_modules),
    )


class PagedEngine:
    """mesh: a jax.sharding.Mesh with axes ("data", "model") for tensor parallelism (jlora.sharding);
    params are placed with their shardings, the pool is split by KV head, and each step runs the model
    under shard_map. Without a mesh everything lives on the default device."""

    def __init__(
        self,
        model_config: ModelConfig,
        params: dict[str, Any],
        config: EngineConfig,
        compile_now: bool = True,
        mesh: Mesh | None = None,
    ):
        config.validate()
        enable_compilation_cache(config.compilation_cache_dir)
        if mesh is not None and mesh.shape["data"] != 1:
            raise ValueError("the data axis must be 1 inside one engine: run one engine per data replica")
        self.model_config = model_config
        self.config = config
        self.mesh = mesh
        self.shards = model_ways(mesh)
        local = local_config(
            model_config, self.shards
        )  # one shard's geometry (the whole model without a mesh)
        fuse = config.resolved_fuse_projections()
        if fuse and mesh is not None:
            if config.fuse_projections == "on":
                raise ValueError("fuse_projections='on' needs one device (no mesh)")
            fuse = False
        if config.resolved_layer_loop() == "unrolled":
            params = unstack_layers(params, fuse=fuse)
        self.cpu_matmul = config.resolved_cpu_matmul(params["embed"].dtype, mesh)
        if self.cpu_matmul == "panels":
            params = pack_linear_weights(params)
        self.params = shard_params(params, mesh) if mesh is not None else params
        self.dtype = params["embed"].dtype
        self.layout = pool_layout(
            model_config,
            num_pages=config.num_pages,
            page_size=config.page_size,
            lora_modules=config.lora_modules,
            shards=self.shards,
        )
        self.layout.check()
        self.memory = PoolManager(self.layout)
        self.pool = new_pool(
            self.layout, self.dtype, self.shards, pool_sharding(mesh) if mesh is not None else None
        )
        # token carry: two halves (alternate steps write alternate halves, so a step never overwrites
        # what the step before it wrote while that is still being read), each with room for a decode
        # call's rows and then a prefill call's rows
        self._carry_half = max(config.decode_batch_buckets) + max(config.prefill_batch_buckets)
        carry = np.zeros(2 * self._carry_half, np.int32)
        self.carry = jax.device_put(carry, replicated(mesh)) if mesh is not None else jnp.asarray(carry)
        self._half = 0
        forward = functools.partial(
            forward_paged,
            config=local,
            page_size=config.page_size,
            impl=config.implementation,
            prefill_kernel=config.prefill_kernel(),
            kv_write=config.resolved_kv_write(),
            in_place=config.rows_in_place,
            materialize_norms=config.materialized_norms(),
        )
        if mesh is not None:
            forward = self._sharded_forward(forward, mesh)
        self._step_fn = jax.jit(
            functools.partial(self._step, forward=forward),
            static_argnames=("spec", "draw"),
            donate_argnums=(1, 2),
        )
        # adapters' host pages in pinned memory (one device and one process only: the sharded and
        # multihost paths write numpy blocks)
        pin = config.resolved_pin_host_adapters() and mesh is None and not multihost.is_multiprocess()
        device = jax.devices()[0]
        self._pin_device = device if pin and can_pin(device) else None
        # an adapter is copied and written in blocks of up to this many pages (a power of two): its
        # largest adapter in one (the multihost followers' writes take the smallest block only)
        self.write_largest = (
            WRITE_CHUNK
            if multihost.is_multiprocess()
            else largest_write(self.layout, {m: config.max_lora_rank for m in config.lora_modules})
        )
        self.lora_groups = config.lora_groups()
        self.mixed_steps = config.resolved_mixed_steps()  # resolved once: prepare() asks every step
        self._lora_cache: dict[tuple, tuple[tuple, dict[str, Any]]] = {}  # _decode_lora's recent results
        self.compiled: dict[str, Any] = {}
        self._specs: dict[str, PackedSpec] = {}
        self.compile_seconds = 0.0
        self.warm_up_seconds = 0.0
        if compile_now:
            self.compile_all()

    # ---- compiled steps ---------------------------------------------------------------------------
    def _sharded_forward(self, forward, mesh: Mesh):
        """The model under shard_map: each shard its heads, MLP columns, pool slice and LoRA slices."""
        specs = param_specs(self.params)

        def sharded(params, pool, batch, lora):
            return shard_map(
                functools.partial(forward, tp_axis="model"),
                mesh=mesh,
                in_specs=(specs, logical_spec(POOL_AXES), PartitionSpec(), PartitionSpec()),
                out_specs=(logical_spec(POOL_AXES), PartitionSpec()),
                check_vma=False,
            )(params, pool, batch, lora)

        return sharded

    @staticmethod
    def _step(params, pool, carry, packed, *, spec, draw, forward):
        """One step. packed: the step's metadata (batch, lora, sampling, counters, feed) as one int32
        array. Returns the pool, the token carry and [2, B] int32: sampled tokens, and their log-probs'
        float32 bits."""
        batch, lora, sampling, counters, feed = unpack(packed, spec)

        def fed(batch: PagedBatch, feed: TokenFeed) -> PagedBatch:
            pending = carry[jnp.maximum(feed.source, 0)]
            return batch.replace(tokens=jnp.where(feed.source >= 0, pending, batch.tokens))

        if isinstance(batch, tuple):  # a mixed call: (decode rows, prefill chunks), rows sampled in order
            batch = tuple(fed(b, f) for b, f in zip(batch, feed))
            dest = jnp.concatenate([f.dest for f in feed])
        else:
            batch, dest = fed(batch, feed), feed.dest
        pool, logits = forward(params, pool, batch, lora)
        keys = jax.vmap(jax.random.fold_in)(sampling.keys, counters)
        tokens, logprobs = sample(logits, sampling.replace(keys=keys), draw=draw)
        tokens = tokens.astype(jnp.int32)
        carry = carry.at[dest].set(tokens, mode="drop")
        return pool, carry, jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)])

    def buckets(self) -> list[Bucket]:
        c = self.config
        out = []
        for p in c.resolved_page_buckets():
            for r in (0, *c.lora_rank_buckets):
                for draw in (False,) if c.greedy_only else (False, True):
                    out += [Bucket("decode", b, 1, p, r, draw) for b in c.decode_batch_buckets]
                    out += [
                        Bucket("prefill", b, t, p, r, draw)
                        for b in c.prefill_batch_buckets
                        for t in c.prefill_chunk_buckets
                    ]
                    if self.mixed_steps:
                        out += [
                            Bucket("mixed", d, t, p, r, draw, prefill_batch=b)
                            for d in c.resolved_mixed_decode_buckets()
                            for b in c.prefill_batch_buckets
                            for t in c.prefill_chunk_buckets
                        ]
        return out

    def _abstract_args(self, bucket: Bucket) -> tuple:
        """The step's metadata as shapes: (batch, lora, sampling, counters, feed); a mixed call's batch,
        lora and feed are (decode rows', prefill chunks') pairs."""
        parts = [self._abstract_part(kind, b, t, bucket.pages, bucket.lora) for kind, b, t in bucket.parts()]
        rows = sum(b for _, b, _ in bucket.parts())
        sampling = SamplingArrays(
            temperature=_shape(rows, dtype=jnp.float32),
            top_k=_shape(rows),
            top_p=_shape(rows, dtype=jnp.float32),
            keys=_shape(rows, 2, dtype=jnp.uint32),
        )
        batch, lora, feed = parts[0] if len(parts) == 1 else tuple(zip(*parts))
        return batch, lora, sampling, _shape(rows, dtype=jnp.uint32), feed

    def _abstract_part(self, kind: str, b: int, t: int, p: int, rank: int) -> tuple:
        """One batch's (PagedBatch, LoRA metadata, TokenFeed) as shapes."""
        batch = PagedBatch(
            tokens=_shape(b, t),
            positions=_shape(b, t),
            write_units=_shape(b, t),
            page_tables=_shape(b, p),
            cached_lens=_shape(b),
            new_lens=_shape(b),
            logits_at=_shape(b),
        )
        lora = None
        if rank:
            if kind == "decode":
                k = b * t * rank
                lora = {
                    m: DecodeLora(_shape(k), _shape(k), _shape(k), _shape(b * t + 1))
                    for m in self.config.lora_modules
                }
                for group in self.lora_groups:  # a group's entry replaces its members'
                    for m in group:
                        del lora[m]
                    g = len(group)
                    lora["+".join(group)] = DecodeGroup(
                        _shape(g * k), _shape(g * k), _shape(g * k), _shape(g * (b * t + 1)), group
                    )
            else:
                lora = {m: PrefillLora(_shape(b, rank), _shape(b, rank)) for m in self.config.lora_modules}
                for group in self.lora_groups:  # a group's entry replaces its members'
                    for m in group:
                        del lora[m]
                    width = prefill_group_width(len(group), rank)
                    lora["+".join(group)] = PrefillGroup(_shape(b, width), _shape(b, width), group, rank)
        return batch, lora, TokenFeed(_shape(b, t), _shape(b))

    def compile_all(self) -> None:
        """Compile every bucket ahead of time (and the adapter page writer)."""
        start = time.perf_counter()
        for size in write_block_sizes(self.write_largest):  # the adapter page writer, every block size
            ids, block = empty_block(self.layout, self.shards, size)
            self.write_block(ids, block)
            if self._pin_device is not None:  # pinned adapters' writes take a device array: compiled apart
                pinned = pin_pages(block.astype(self.dtype), self._pin_device, self.write_largest)
                self.write_pinned_block(ids, pinned.blocks[0])
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params
        )
        pool = jax.ShapeDtypeStruct(self.pool.shape, self.pool.dtype, sharding=self.pool.sharding)
        carry = jax.ShapeDtypeStruct(self.carry.shape, self.carry.dtype, sharding=self.carry.sharding)
        packed_sharding = replicated(self.mesh) if self.mesh is not None else None
        options = self.config.compiler_options(jax.default_backend())
        for bucket in self.buckets():
            if bucket.name not in self.compiled:
                spec = spec_of(self._abstract_args(bucket))
                packed = jax.ShapeDtypeStruct((spec.size,), jnp.int32, sharding=packed_sharding)
                self.compiled[bucket.name] = self._step_fn.lower(
                    params, pool, carry, packed, spec=spec, draw=bucket.draw
                ).compile(compiler_options=options or None)
                self._specs[bucket.name] = spec
        self.bucket_names = sorted(self.compiled)  # the order the multihost leader and followers share
        self._bucket_index = {name: i for i, name in enumerate(self.bucket_names)}
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled %d steps in %.1fs", len(self.compiled), self.compile_seconds)
        if self.config.resolved_warm_up():
            self.warm_up()

    def warm_up(self) -> None:
        """Run every compiled step once, on metadata that is all padding, before any request: a step's
        first run on a GPU loads its kernels (CUDA loads modules lazily: 0.2 s for the first step of a
        7B trace on the H200), which would otherwise land on the first request of each shape. Padding
        rows write no K/V (their units are out of range), sample into no carry slot and read the zero
        page, so the pool and the token carry are left as they were."""
        start = time.perf_counter()
        for bucket in self.buckets():
            metas = []
            for kind, b, t in bucket.parts():
                batch, samp, counters = self._fill_rows([], {}, b, t, bucket.pages)
                lora = None
                if bucket.lora:
                    lora = (
                        self._build_decode_lora([], b * t, bucket.lora)
                        if kind == "decode"
                        else self._prefill_lora([], b, bucket.lora)
                    )
                feed = TokenFeed(np.full((b, t), -1, np.int32), np.full(b, 2 * self._carry_half, np.int32))
                metas.append((batch, lora, samp, counters, feed))
            out = self._dispatch(bucket.name, pack(_joined(metas), self._specs[bucket.name]))
        if self.compiled:
            jax.block_until_ready((out, self.pool))
        self.warm_up_seconds = time.perf_counter() - start
        log.info("ran %d steps once in %.1fs", len(self.compiled), self.warm_up_seconds)

    # ---- adapters ---------------------------------------------------------------------------------
    def adapter_pages(self, adapter: PeftAdapter, ranks: dict[str, int]) -> np.ndarray | PinnedPages:
        """The adapter as page-major host data [n_pages, L, shards, PU, Dh] in the pool's dtype; as
        write blocks in pinned host memory when the engine pins (EngineConfig.pin_host_adapters)."""
        data = adapter_page_data(
            self.layout, adapter, ranks, self.model_config.module_shapes(), self.shards, self.dtype
        )
        if self._pin_device is None:
            return data
        return pin_pages(data, self._pin_device, self.write_largest)

    def copy_adapter(self, name: str, pages: np.ndarray | PinnedPages) -> None:
        """Copy a placed adapter's host pages into its device pages (queued before the next step)."""
        placement = self.memory.adapters[name].placement
        if isinstance(pages, PinnedPages):  # one device, one process: DMA from pinned memory
            for ids, block in zip(block_page_ids(self.layout, placement, self.write_largest), pages.blocks):
                self.write_pinned_block(ids, block)
            return
        for ids, block in write_blocks(self.layout, placement, pages, self.write_largest):
            if multihost.is_multiprocess():  # the followers make the same write
                multihost.announce(
                    multihost.WRITE,
                    0,
                    np.concatenate([ids.astype(np.float32), block.reshape(-1).astype(np.float32)]),
                )
            self.write_block(ids, block)

    def write_pinned_block(self, ids: np.ndarray, block: jax.Array) -> None:
        """One write block from pinned host memory: copied to the device (DMA), then into the pool."""
        self.pool = write_pages(self.pool, self.layout, ids, to_device(block, self._pin_device))

    def write_block(self, ids: np.ndarray, block: np.ndarray) -> None:
        ids, data = np.asarray(ids, np.int32), np.asarray(block, self.dtype)
        if multihost.is_multiprocess():
            ids, data = (multihost.to_global(x, replicated(self.mesh)) for x in (ids, data))
        self.pool = write_pages(self.pool, self.layout, ids, data)

    def split_write_payload(self, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, block = payload[:WRITE_CHUNK].astype(np.int32), payload[WRITE_CHUNK:]
        return ids, block.reshape(empty_block(self.layout, self.shards)[1].shape)

    def run_compiled(self, name: str, packed: np.ndarray) -> np.ndarray:
        """Run one compiled step on packed metadata; [2, B] int32 (tokens, log-prob bits) on the host."""
        return np.asarray(self._dispatch(name, packed).addressable_data(0))

    def _dispatch(self, name: str, packed: np.ndarray) -> jax.Array:
        """Queue one compiled step on the device and return its (not yet ready) output."""
        if multihost.is_multiprocess():
            packed = multihost.to_global(packed, replicated(self.mesh))
        self.pool, self.carry, out = self.compiled[name](self.params, self.pool, self.carry, packed)
        return out

    # ---- one step: prepare on the host, launch, collect -------------------------------------------
    def execute(self, schedule: Schedule, sampling: dict[int, SamplingRow]) -> dict[int, tuple[int, float]]:
        """Run the schedule's decode and prefill batches; (token, logprob) for each chunk that samples."""
        return self.collect(self.launch(self.prepare(schedule, sampling)))

    def prepare(
        self, schedule: Schedule, sampling: dict[int, SamplingRow], sources: Mapping[int, int] | None = None
    ) -> list[PreparedCall]:
        """The schedule's compiled calls with their metadata packed: decode rows and prefill chunks in
        one mixed call (EngineConfig.mixed_steps), or a call each. A chunk token that is still PENDING
        is read on the device from the token carry, at sources[request] (InFlight.sources of the step
        that samples it, which must be the last one launched)."""
        parts = [
            (k, chunks)
            for k, chunks in (("decode", schedule.decodes), ("prefill", schedule.prefills))
            if chunks
        ]
        if len(parts) == 2 and self.mixed_steps:
            return [self._prepare_call(parts, sampling, sources or {})]
        return [self._prepare_call([part], sampling, sources or {}) for part in parts]

    def launch(self, calls: list[PreparedCall]) -> InFlight:
        """Queue the calls on the device without waiting for them (nor for the step before)."""
        outs = []
        for call in calls:
            if multihost.is_multiprocess():  # the followers run the same step
                multihost.announce(multihost.STEP, self._bucket_index[call.bucket], call.packed)
            out = self._dispatch(call.bucket, call.packed)
            out.copy_to_host_async()
            outs.append(out)
        sources = {rid: slot for call in calls for rid, slot in zip(call.sample_requests, call.carry_slots)}
        self._half = 1 - self._half  # the next step writes the other half
        return InFlight(calls, outs, time.perf_counter(), sources)

    def collect(self, inflight: InFlight) -> dict[int, tuple[int, float]]:
        """Wait for a launched step; (token, logprob) for each chunk that samples."""
        results: dict[int, tuple[int, float]] = {}
        for call, out in zip(inflight.calls, inflight.outputs):
            host = np.asarray(out.addressable_data(0))
            new_tokens, new_logprobs = host[0], host[1].view(np.float32)
            for i, rid in zip(call.sample_rows, call.sample_requests):
                results[rid] = (int(new_tokens[i]), float(new_logprobs[i]))
        return results

    def _prepare_call(
        self,
        parts: list[tuple[str, list[ScheduledChunk]]],
        sampling: dict[int, SamplingRow],
        sources: Mapping[int, int],
    ) -> PreparedCall:
        """One call over (kind, chunks) parts: one part, or decode rows then prefill chunks (mixed)."""
        c = self.config
        shapes = []  # (rows, tokens per row) of each part's bucket
        decode_buckets = c.decode_batch_buckets if len(parts) == 1 else c.resolved_mixed_decode_buckets()
        for kind, chunks in parts:
            if kind == "decode":
                shapes.append((_smallest(decode_buckets, len(chunks)), 1))
            else:
                t = _smallest(c.prefill_chunk_buckets, max(len(ch.tokens) for ch in chunks))
                shapes.append((_smallest(c.prefill_batch_buckets, len(chunks)), t))
        every = [ch for _, chunks in parts for ch in chunks]
        p = _smallest(c.resolved_page_buckets(), max(len(ch.page_table) for ch in every))
        r_bucket = max(
            self._rank_bucket(kind, chunks, b * t) for (kind, chunks), (b, t) in zip(parts, shapes)
        )
        draw = any(sampling[ch.request_id].temperature > 0 for ch in every)
        if len(parts) == 1:
            bucket = Bucket(parts[0][0], *shapes[0], p, r_bucket, draw)
        else:
            (b_decode, _), (b_prefill, t) = shapes
            bucket = Bucket("mixed", b_decode, t, p, r_bucket, draw, prefill_batch=b_prefill)
        if bucket.name not in self.compiled:
            raise RuntimeError(f"no compiled step for bucket {bucket.name}")

        metas, sample_requests, sample_rows, carry_slots, first_row = [], [], [], [], 0
        for (kind, chunks), (b, t) in zip(parts, shapes):
            batch, samp, counters = self._fill_rows(chunks, sampling, b, t, p)
            lora = None
            if r_bucket:
                lora = (
                    self._decode_lora(chunks, b * t, r_bucket)
                    if kind == "decode"
                    else self._prefill_lora(chunks, b, r_bucket)
                )
            tokens = batch.tokens
            source = np.full((b, t), -1, np.int32)
            rows, cols = np.nonzero(tokens == PENDING)
            for i, j in zip(rows, cols):
                rid = chunks[i].request_id
                if rid not in sources:
                    raise RuntimeError(
                        f"request {rid} has a pending token that the last launched step does not sample"
                    )
                source[i, j] = sources[rid]
            tokens[rows, cols] = 0
            rows_sampled = [i for i, ch in enumerate(chunks) if ch.sample]
            # this step's half of the carry: decode rows first, then prefill rows
            first_slot = self._half * self._carry_half + (
                max(c.decode_batch_buckets) if kind == "prefill" else 0
            )
            slots = [first_slot + i for i in rows_sampled]
            dest = np.full(b, 2 * self._carry_half, np.int32)  # out of range: dropped
            dest[rows_sampled] = slots
            metas.append((batch, lora, samp, counters, TokenFeed(source, dest)))
            sample_requests += [chunks[i].request_id for i in rows_sampled]
            sample_rows += [first_row + i for i in rows_sampled]
            carry_slots += slots
            first_row += b
        return PreparedCall(
            bucket=bucket.name,
            packed=pack(_joined(metas), self._specs[bucket.name]),
            sample_requests=sample_requests,
            sample_rows=sample_rows,
            carry_slots=carry_slots,
            kind=bucket.kind,
            prefill_tokens=sum(
                len(ch.tokens) for kind, chunks in parts if kind == "prefill" for ch in chunks
            ),
        )

    def _rank_bucket(self, kind: str, chunks: list[ScheduledChunk], n_tokens: int) -> int:
        """The LoRA rank bucket the chunks need (0: no adapter among them). A decode call's pairs are
        packed by token: it needs room for the pairs of its most-used projection too."""
        c = self.config
        ranks = [self.memory.adapters[ch.adapter].placement.ranks for ch in chunks if ch.adapter]
        if not ranks:
            return 0
        max_rank = max((r for rk in ranks for r in rk.values()), default=0)
        if kind == "decode":
            pairs = max(sum(rk.get(m, 0) for rk in ranks) for m in c.lora_modules)
            return _smallest(c.lora_rank_buckets, max(max_rank, -(-pairs // n_tokens)))
        return _smallest(c.lora_rank_buckets, max_rank)

    def _fill_rows(
        self, chunks: list[ScheduledChunk], sampling: dict[int, SamplingRow], b: int, t: int, p: int
    ) -> tuple[PagedBatch, SamplingArrays, np.ndarray]:
        """The call's per-row arrays, padded to its bucket (b rows of t tokens, p pages)."""
        layout, n = self.layout, len(chunks)
        lens = np.array([len(ch.tokens) for ch in chunks], np.int32)
        starts = np.array([ch.start for ch in chunks], np.int32)
        tokens = np.zeros((b, t), np.int32)
        page_tables = np.zeros((b, p), np.int32)
        for i, ch in enumerate(chunks):
            tokens[i, : lens[i]] = ch.tokens
            page_tables[i, : len(ch.page_table)] = ch.page_table
        offsets = np.arange(t, dtype=np.int32)
        positions = np.zeros((b, t), np.int32)
        positions[:n] = starts[:, None] + offsets
        real = np.zeros((b, t), bool)
        real[:n] = offsets < lens[:, None]
        positions[~real] = 0
        pages = np.take_along_axis(page_tables, positions // layout.page_size, axis=1)
        write_units = pages * layout.page_units + (positions % layout.page_size) * 2 * layout.num_kv_heads
        write_units[~real] = layout.total_units  # out of bounds: dropped
        cached_lens, new_lens, logits_at = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        cached_lens[:n], new_lens[:n], logits_at[:n] = starts, lens, lens - 1
        rows = [sampling[ch.request_id] for ch in chunks]
        temperature, top_k, top_p = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32)
        keys, counters = np.zeros((b, 2), np.uint32), np.zeros(b, np.uint32)
        if n:
            temperature[:n] = [r.temperature for r in rows]
            top_k[:n] = [r.top_k for r in rows]
            top_p[:n] = [r.top_p for r in rows]
            keys[:n] = [r.seed_key for r in rows]
            counters[:n] = [ch.num_generated for ch in chunks]
        batch = PagedBatch(tokens, positions, write_units, page_tables, cached_lens, new_lens, logits_at)
        return batch, SamplingArrays(temperature, top_k, top_p, keys), counters

    def _rows(self, adapter: str, module: str) -> tuple[np.ndarray, np.ndarray]:
        """The adapter's A and B row starts for a module ([r] int32 each; empty if it has none)."""
        placement = self.memory.adapters[adapter].placement
        return placement.a_start.get(module, _EMPTY), placement.b_start.get(module, _EMPTY)

    def _decode_lora(self, chunks: list[ScheduledChunk], n_tokens: int, r_bucket: int) -> dict[str, Any]:
        """Pairs grouped by token; padding pairs last, on token n_tokens (out of range) and the zero page.
        Successive decode steps mostly repeat the last composition (the same adapters in the same rows):
        it is kept, keyed by the placements themselves, which the cache holds so that an evicted
        adapter's placement cannot be mistaken for a new one."""
        placements = tuple(
            self.memory.adapters[ch.adapter].placement if ch.adapter else None for ch in chunks
        )
        key = (n_tokens, r_bucket, tuple(map(id, placements)))
        hit = self._lora_cache.get(key)
        if hit is not None:
            return hit[1]
        out = self._build_decode_lora(chunks, n_tokens, r_bucket)
        if len(self._lora_cache) >= 8:
            self._lora_cache.pop(next(iter(self._lora_cache)))
        self._lora_cache[key] = (placements, out)
        return out

    def _build_decode_lora(
        self, chunks: list[ScheduledChunk], n_tokens: int, r_bucket: int
    ) -> dict[str, Any]:
        k = n_tokens * r_bucket
        out = {}
        for m in self.config.lora_modules:
            rows = [self._rows(ch.adapter, m) if ch.adapter else (_EMPTY, _EMPTY) for ch in chunks]
            counts = np.array([len(a) for a, _ in rows], np.int32)
            n = int(counts.sum())
            tok, a, bb = np.full(k, n_tokens, np.int32), np.zeros(k, np.int32), np.zeros(k, np.int32)
            tok[:n] = np.repeat(np.arange(len(chunks), dtype=np.int32), counts)
            if n:
                a[:n] = np.concatenate([r[0] for r in rows])
                bb[:n] = np.concatenate([r[1] for r in rows])
            offsets = np.zeros(n_tokens + 1, np.int32)
            offsets[1 : len(chunks) + 1] = np.cumsum(counts)
            offsets[len(chunks) + 1 :] = n
            out[m] = DecodeLora(tok, a, bb, offsets)
        for group in self.lora_groups:  # shared launches over the members' pairs, in their place
            members = [out.pop(m) for m in group]
            cat = lambda field, members=members: np.concatenate([getattr(d, field) for d in members])  # noqa: E731
            out["+".join(group)] = DecodeGroup(
                cat("token_index"), cat("a_start"), cat("b_start"), cat("offsets"), group
            )
        return out

    def _prefill_lora(self, chunks: list[ScheduledChunk], b: int, r: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.config.lora_modules:
            a, bb = np.zeros((b, r), np.int32), np.zeros((b, r), np.int32)
            for i, ch in enumerate(chunks):
                if ch.adapter:
                    rows_a, rows_b = self._rows(ch.adapter, m)
                    a[i, : len(rows_a)] = rows_a
                    bb[i, : len(rows_b)] = rows_b
            out[m] = PrefillLora(a, bb)
        for group in self.lora_groups:  # shared launches over the members' rows, in their place
            width = prefill_group_width(len(group), r)
            a, bb = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)  # the rest: zero page
            for i, m in enumerate(group):
                member = out.pop(m)
                a[:, i * r : (i + 1) * r], bb[:, i * r : (i + 1) * r] = member.a_start, member.b_start
            out["+".join(group)] = PrefillGroup(a, bb, group, r)
        return out


_EMPTY = np.zeros(0, np.int32)


def _joined(metas: list[tuple]) -> tuple:
    """One call's metadata from its batches' (batch, lora, sampling, counters, feed): a lone batch's as
    it is; a mixed call's per-batch parts as pairs, sampling rows joined (decode rows first)."""
    if len(metas) == 1:
        return metas[0]
    batches, loras, samps, counters, feeds = zip(*metas)
    joined = jax.tree.map(lambda *x: np.concatenate(x), *samps)
    return (batches, loras, joined, np.concatenate(counters), feeds)


__all__ = ["PENDING", "Bucket", "InFlight", "PagedEngine", "PreparedCall", "SamplingRow", "TokenFeed"]
