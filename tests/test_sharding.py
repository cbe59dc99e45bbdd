"""Tensor parallelism on 4 host devices: model-parallel 2 and 4 equal one device on mixed-adapter
batches, parameters and pool are really split, and LoRA adds no collective to the compiled step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jlora
from jlora import loader
from jlora.config import EngineConfig, MeshConfig
from jlora.sharding import count_collectives, make_mesh

NAMES = [None, "qv_r4", "all_r8_rslora", "attn_r16_patterns", "mlp_r64", "regex_r12", "layers_r8"]


ENGINE_KW = dict(  # plain values: the multihost test sends them to its processes as JSON
    page_size=8,
    num_pages=300,
    max_model_len=64,
    max_batch=4,
    decode_batch_buckets=(4,),
    prefill_batch_buckets=(2,),
    prefill_chunk_buckets=(8,),
    page_buckets=(8,),
    lora_rank_buckets=(16, 64),
    compilation_cache_dir=None,
)


def config(**kw) -> EngineConfig:
    return EngineConfig(**{**ENGINE_KW, **kw})


def run(engine: jlora.Engine, paths) -> list:
    for name, path in paths.items():
        engine.load_adapter(name, path)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 384, int(rng.integers(3, 20))).tolist() for _ in range(10)]
    params = jlora.SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, ignore_eos=True)
    return engine.generate(prompts, params, adapters=[NAMES[i % len(NAMES)] for i in range(10)])


@pytest.mark.parametrize(
    "ways,layer_loop,fuse_lora,mixed_steps", [(2, "scan", "on", "off"), (4, "unrolled", "off", "on")]
)
def test_model_parallel_equals_one_device(tiny_tp, ways, layer_loop, fuse_lora, mixed_steps):
    """fuse_lora="on": q/k/v and gate/up LoRA in shared launches, each shard over its own slices;
    mixed_steps="on": decode rows and prefill chunks in one call."""
    loaded, paths = tiny_tp
    want = run(jlora.Engine(loaded, config(layer_loop=layer_loop)), paths)
    engine = jlora.Engine(
        loaded,
        config(layer_loop=layer_loop, fuse_lora=fuse_lora, mixed_steps=mixed_steps),
        mesh=MeshConfig(model=ways),
    )
    kinds = []
    launch = engine.paged.launch
    engine.paged.launch = lambda calls: kinds.extend(c.kind for c in calls) or launch(calls)
    got = run(engine, paths)
    assert ("mixed" in kinds) == (mixed_steps == "on")
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert np.abs(np.array(g.logprobs) - np.array(w.logprobs)).max() < 1e-4

    paged = engine.paged
    q = (
        paged.params["layers"]["q_proj"]["kernel"]
        if layer_loop == "scan"
        else paged.params["layers"][0]["q_proj"]["kernel"]
    )
    assert q.sharding.shard_shape(q.shape)[-1] == q.shape[-1] // ways  # heads split, not replicated
    assert paged.pool.sharding.shard_shape(paged.pool.shape)[1] == paged.pool.shape[1] // ways
    assert len(paged.pool.sharding.device_set) == ways
    paged.memory.check_invariants()


def test_lora_adds_no_collective(tiny_tp):
    loaded, _ = tiny_tp
    layers = loaded.config.num_hidden_layers
    engine = jlora.Engine(loaded, config(layer_loop="unrolled"), mesh=make_mesh(MeshConfig(model=2)))
    compiled = engine.paged.compiled
    for kind in ("decode_b4_t1_p8", "prefill_b2_t8_p8"):
        base = count_collectives(compiled[f"{kind}_r0"].as_text())
        # two all-reduces per layer (after o_proj and down_proj) and the logits' all-gather
        assert base["all-reduce"] == 2 * layers, base
        assert base["all-gather"] >= 1
        for rank in (16, 64):
            assert count_collectives(compiled[f"{kind}_r{rank}"].as_text()) == base, (kind, rank)


def test_bad_mesh_is_refused(tiny_tp):
    loaded, _ = tiny_tp
    with pytest.raises(ValueError, match="data axis"):
        jlora.Engine(loaded, config(), mesh=MeshConfig(data=2, model=2))
    with pytest.raises(ValueError, match="does not split"):
        jlora.Engine(loaded, config(), mesh=MeshConfig(model=3))


def test_loaders_place_shards(tiny_tp, tmp_path):
    """HF folders and orbax checkpoints load straight into their shards, equal to the unsharded load."""
    loaded, _ = tiny_tp
    mesh = make_mesh(MeshConfig(model=2))
    sharded = loader.load(loaded.source, progress=False, mesh=mesh)
    loader.save_checkpoint(loaded, str(tmp_path / "orbax"))
    restored = loader.load(str(tmp_path / "orbax"), progress=False, mesh=mesh)
    for tree in (sharded.params, restored.params):
        q = tree["layers"]["q_proj"]["kernel"]
        assert q.sharding.shard_shape(q.shape)[-1] == q.shape[-1] // 2
        down = tree["layers"]["down_proj"]["kernel"]
        assert down.sharding.shard_shape(down.shape)[1] == down.shape[1] // 2
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
