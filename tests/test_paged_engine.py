"""The paged engine equals the reference path: mixed adapters, staggered arrivals, chunked prefill,
preemption forced by a small pool; serving never recompiles; streams and cancellation."""

from __future__ import annotations

import dataclasses
import re
import types

import jax
import numpy as np
import pytest

import jlora
import pallas_kernels.lora as lora_api
import pallas_kernels.paged_attention as attention_api
from jlora import loader
from jlora.config import EngineConfig
from jlora.engine import PagedEngine
from pallas_kernels.cpu import kernel_available as cpu_kernels_built
from pallas_kernels.lora import LoraTunables
from pallas_kernels.lora import kernel as lora_kernel
from pallas_kernels.lora import shapes as lora_shapes
from pallas_kernels.paged_attention import PrefillTunables, prefill_kernel
from tests.helpers import tiny_hf_model
from tests.test_multi_lora import adapter_specs, build_peft

PARAMS = jlora.SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)


def small_config(**kw) -> EngineConfig:
    base = dict(
        page_size=8,
        num_pages=400,
        max_model_len=96,
        max_batch=4,
        decode_batch_buckets=(4,),
        prefill_batch_buckets=(2,),
        prefill_chunk_buckets=(8,),
        page_buckets=(12,),
        lora_rank_buckets=(16, 64),
    )
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paged")
    model = tiny_hf_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp / "base", safe_serialization=True)
    _, paths = build_peft(model, adapter_specs(3), tmp / "adapters")
    loaded = loader.load(str(tmp / "base"), progress=False)
    reference = jlora.Engine(loaded, reference=True)
    for name, path in paths.items():
        reference.load_adapter(name, path)
    return loaded, paths, reference


def requests(n: int, seed: int, long_decodes: bool = False):
    rng = np.random.default_rng(seed)
    names = [None, "qv_r4", "all_r8_rslora", "attn_r16_patterns", "mlp_r64", "regex_r12", "layers_r8"]
    out = []
    for i in range(n):
        prompt = rng.integers(0, 384, int(rng.integers(1, 10 if long_decodes else 30))).tolist()
        max_tokens = int(rng.integers(40, 60) if long_decodes else rng.integers(1, 14))
        p = jlora.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True, ignore_eos=True)
        if i % 3 == 2:  # seeded sampling must agree too
            p = jlora.SamplingParams(
                max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=i, logprobs=True, ignore_eos=True
            )
        out.append((prompt, p, names[i % len(names)]))
    return out


def run_staggered(engine: jlora.Engine, reqs, per_step: int = 2):
    """Submit a few requests between steps (continuous batching); collect finished states."""
    runner = engine.runner
    pending = list(reqs)
    ids, results = [], {}
    states = {}
    while pending or runner.has_work():
        for prompt, p, adapter in pending[:per_step]:
            state = engine._prepare(prompt, p, adapter)
            rid = runner.add(state, adapter)
            ids.append(rid)
            states[rid] = state
        pending = pending[per_step:]
        for e in runner.step():
            if e.finish_reason is not None:
                results[e.request_id] = states[e.request_id]
    return [results[i] for i in ids]


@pytest.mark.parametrize(
    "variant",
    [
        "roomy",
        "small_pool_preempts",
        "kernels_interpret",
        "kernels_interpret_prefill_reference",
        "kernels_interpret_lora_fused",
        "kernels_interpret_lora_fused_one_launch",
        "unrolled",
        "unrolled_write_at_end",
        "no_overlap",
        "lora_fused",
        "small_pool_preempts_pinned",
        "kernels_interpret_unrolled_lora_fused_projections_fused",
        "roomy_mixed",
        "small_pool_preempts_mixed",
        "unrolled_write_at_end_mixed",
        "kernels_interpret_unrolled_lora_fused_projections_fused_mixed",
        "kernels_interpret_unrolled_lora_fused_projections_fused_mixed_by_adapter",
        "kernels_interpret_unrolled_lora_fused_projections_fused_mixed_one_launch_each",
        "kernels_interpret_unrolled_lora_fused_projections_fused_mixed_rows_off",
        "kernels_interpret_lora_fused_mixed",
        "kernels_interpret_unrolled_lora_fused_projections_fused_rows_all",
        "kernels_interpret_unrolled_lora_fused_projections_fused_norms",
        "cpu_kernels",
        "cpu_kernels_small_pool_preempts",
        "cpu_kernels_unrolled_lora_fused_projections_fused_mixed",
        "xla_matmul",
    ],
)
def test_paged_equals_reference(tiny, variant, monkeypatch):
    """kernels_interpret: the Pallas kernels (LoRA BGMV/SGMV, decode and prefill attention) run by the
    interpreter; _prefill_reference: the same with prefill attention forced to the reference;
    _one_launch: decode LoRA shrink and expand in one launch (bgmv_fused) at every batch size;
    _by_adapter: decode LoRA by adapter (by_adapter_min_rank 16: the tokens grouped, each group an SGMV).
    _mixed: decode rows and prefill chunks in one call, each batch's kernels on its rows of the step's
    arrays (_rows_off: split and joined; _rows_all: every step on rows). _norms: the output of each norm
    feeding LoRA materialised for the matmul and the LoRA kernels (materialize_norms, the engine's
    default; the other variants here turn it off). cpu_kernels: the C++ CPU kernels (BGMV, SGMV, paged
    attention; weights as panels in every variant on the CPU backend but xla_matmul, which keeps XLA's
    matmuls)."""
    loaded, paths, reference = tiny
    impl = "interpret" if variant.startswith("kernels_interpret") else "reference"
    if variant.startswith("cpu_kernels"):
        if jax.default_backend() != "cpu" or not cpu_kernels_built():
            pytest.skip("the C++ CPU kernels run on the CPU backend, where they build")
        impl, variant = "cpu", variant.removeprefix("cpu_kernels").removeprefix("_") or "roomy"
    xla_matmul = variant == "xla_matmul"
    variant = "roomy" if xla_matmul else variant
    if variant.endswith("one_launch"):
        tunables = LoraTunables(fused_max_tokens=1 << 30, fused_chunk_units=2, fused_out_units=2)
        monkeypatch.setitem(lora_shapes.TUNED, loaded.config.head_dim, ((1 << 30, tunables),))
    variant = variant.removesuffix("_one_launch")
    by_adapter = variant.endswith("_by_adapter")
    by_adapter_calls = []  # traced decode LoRA launches by adapter
    if by_adapter:
        tunables = LoraTunables(by_adapter_min_rank=16)
        monkeypatch.setitem(lora_shapes.TUNED, loaded.config.head_dim, ((1 << 30, tunables),))
    real_by_adapter = lora_kernel.bgmv_by_adapter
    monkeypatch.setattr(
        lora_kernel, "bgmv_by_adapter", lambda *a, **k: by_adapter_calls.append(1) or real_by_adapter(*a, **k)
    )
    variant = variant.removesuffix("_by_adapter")
    # _one_launch_each: a mixed step's decode rows and prompt chunks in one LoRA shrink, one LoRA expand
    # and one attention launch
    one_launch_each = variant.endswith("_one_launch_each")
    mixed_launches = []  # traced one-launch LoRA and attention of a mixed step's two batches
    if one_launch_each:
        tunables = LoraTunables(mixed_launch=True)
        monkeypatch.setitem(lora_shapes.TUNED, loaded.config.head_dim, ((1 << 30, tunables),))
        cfg = loaded.config
        key = (8, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
        monkeypatch.setitem(prefill_kernel.TUNED, key, PrefillTunables(mixed_launch=True))
    real_mixed = lora_api.bgmv_sgmv_rows_add
    monkeypatch.setattr(
        lora_api, "bgmv_sgmv_rows_add", lambda *a, **k: mixed_launches.append("lora") or real_mixed(*a, **k)
    )
    real_attention = attention_api.paged_attention_mixed_kernel
    monkeypatch.setattr(
        attention_api,
        "paged_attention_mixed_kernel",
        lambda *a, **k: mixed_launches.append("attention") or real_attention(*a, **k),
    )
    variant = variant.removesuffix("_one_launch_each")
    # _rows_off: mixed steps split and join their batches; _rows_all: every step's kernels on rows in
    # place (default: mixed steps only)
    rows_in_place = (
        "off" if variant.endswith("_rows_off") else "all" if variant.endswith("_rows_all") else "mixed"
    )
    variant = variant.removesuffix("_rows_off").removesuffix("_rows_all")
    materialize_norms = variant.endswith("_norms")
    variant = variant.removesuffix("_norms")
    mixed = variant.endswith("_mixed")  # decode rows and prefill chunks in one call (auto: GPU only)
    variant = variant.removesuffix("_mixed")
    pinned = variant.endswith("_pinned")  # adapters paged in from pinned host memory (auto: GPU only)
    variant = variant.removesuffix("_pinned")
    # the GPU's configuration on CPU: kernels, unrolled layers, shared LoRA launches, q/k/v and gate/up
    # each one matmul
    fused_projections = variant.endswith("_projections_fused")
    variant = variant.removesuffix("_projections_fused")
    config = small_config(
        pin_host_adapters="on" if pinned else "auto",
        num_pages=128 if variant == "small_pool_preempts" else 400,
        implementation=impl,
        layer_loop="unrolled" if "unrolled" in variant else "scan",
        fuse_projections="on" if fused_projections else "auto",
        kv_write="end" if variant.endswith("write_at_end") else "auto",
        overlap=variant != "no_overlap",
        prefill_attention="reference" if variant.endswith("prefill_reference") else "auto",
        fuse_lora="on" if variant.endswith("lora_fused") else "auto",
        mixed_steps="on" if mixed else "auto",
        cpu_matmul="xla" if xla_matmul else "auto",
        rows_in_place=rows_in_place,
        materialize_norms=materialize_norms,
        **({"prefill_chunk_buckets": (16,)} if one_launch_each else {}),  # the kernels' 16-row tiles
    )
    import jlora.model.paged as paged_model

    barriers = []  # traced optimisation barriers (the outputs of norms feeding LoRA, with materialize_norms)
    real_barrier = jax.lax.optimization_barrier
    monkeypatch.setattr(jax.lax, "optimization_barrier", lambda x: barriers.append(1) or real_barrier(x))

    on_rows = []  # traced calls of the attention kernels on a batch's rows of the step's arrays
    for name in ("paged_attention_rows", "paged_attention_mixed_rows"):
        real = getattr(paged_model, name)
        monkeypatch.setattr(paged_model, name, lambda *a, real=real, **k: on_rows.append(1) or real(*a, **k))
    engine = jlora.Engine(loaded, config)
    rows_expected = impl == "interpret" and (rows_in_place == "all" or (mixed and rows_in_place == "mixed"))
    assert bool(on_rows) == rows_expected
    assert bool(barriers) == materialize_norms
    on_cpu = jax.default_backend() == "cpu" and cpu_kernels_built()
    assert (engine.paged.cpu_matmul == "panels") == (on_cpu and not xla_matmul)
    kinds = []
    launch = engine.paged.launch
    monkeypatch.setattr(
        engine.paged, "launch", lambda calls: kinds.extend(c.kind for c in calls) or launch(calls)
    )
    assert (engine.paged._pin_device is not None) == pinned
    layers = engine.paged.params["layers"]
    assert fused_projections == (isinstance(layers, list) and "qkv_proj" in layers[0])
    for name, path in paths.items():
        engine.load_adapter(name, path)
    reqs = requests(14, seed=3, long_decodes=variant != "roomy")
    got = run_staggered(engine, reqs)
    for (prompt, p, adapter), state in zip(reqs, got):
        want = reference.generate([prompt], p, adapters=[adapter])[0]
        assert state.generated == want.token_ids, (adapter, len(prompt))
        assert np.abs(np.array(state.logprobs) - np.array(want.logprobs)).max() < 1e-4
    stats = engine.runner.scheduler.stats
    if variant == "small_pool_preempts":
        assert stats["preemptions"] > 0 and stats["adapter_evictions"] > 0
    assert ("mixed" in kinds) == mixed and ("decode" in kinds and "prefill" in kinds)
    assert bool(by_adapter_calls) == by_adapter
    assert sorted(set(mixed_launches)) == (["attention", "lora"] if one_launch_each else [])
    memory = engine.paged.memory
    assert not memory.page_tables
    memory.check_invariants()


@pytest.mark.gpu
@pytest.mark.parametrize("scheduling,one_launch", [("auto", False), ("concurrent", True)])
def test_gpu_kernels_engine_equals_reference(tiny, monkeypatch, scheduling, one_launch):
    """The GPU's own step: compiled Pallas kernels, unrolled layers, fused projections, mixed steps on their
    rows; with concurrent CUDA-graph scheduling and a mixed step's LoRA and attention in one launch each, or
    neither. Tokens and log-probs as the reference engine's (float32 matmuls at full precision in both)."""
    loaded, paths, reference = tiny
    if one_launch:
        monkeypatch.setitem(
            lora_shapes.TUNED, loaded.config.head_dim, ((1 << 30, LoraTunables(mixed_launch=True)),)
        )
        cfg = loaded.config
        key = (8, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
        monkeypatch.setitem(prefill_kernel.TUNED, key, PrefillTunables(mixed_launch=True))
    config = small_config(
        implementation="pallas",
        layer_loop="unrolled",
        fuse_projections="on",
        mixed_steps="on",
        prefill_chunk_buckets=(16,),
        command_buffer_scheduling=scheduling,
    )
    with jax.default_matmul_precision("highest"):
        engine = jlora.Engine(loaded, config)
        for name, path in paths.items():
            engine.load_adapter(name, path)
        reqs = requests(14, seed=3, long_decodes=True)
        got = run_staggered(engine, reqs)
        for (prompt, p, adapter), state in zip(reqs, got):
            want = reference.generate([prompt], p, adapters=[adapter])[0]
            assert state.generated == want.token_ids, (adapter, len(prompt))
            assert np.abs(np.array(state.logprobs) - np.array(want.logprobs)).max() < 1e-3


def test_decode_steps_take_finer_buckets_than_mixed_steps(tiny, monkeypatch):
    """mixed_decode_batch_buckets: decode-only steps pad their rows to the fine decode buckets, mixed
    steps' decode rows to their own coarser ones (fewer mixed executables); tokens and log-probs as the
    reference's."""
    loaded, paths, reference = tiny
    config = small_config(
        decode_batch_buckets=(2, 4),
        mixed_decode_batch_buckets=(4,),
        mixed_steps="on",
        lora_rank_buckets=(64,),
    )
    engine = jlora.Engine(loaded, config)
    names = set(engine.paged.compiled)
    assert {n for n in names if n.startswith("mixed_")} == {n for n in names if n.startswith("mixed_b4+")}
    assert any(n.startswith("decode_b2_") for n in names) and any(n.startswith("decode_b4_") for n in names)
    used = []
    launch = engine.paged.launch
    monkeypatch.setattr(
        engine.paged, "launch", lambda calls: used.extend(c.bucket for c in calls) or launch(calls)
    )
    for name, path in paths.items():
        engine.load_adapter(name, path)
    reqs = requests(8, seed=5)
    got = run_staggered(engine, reqs)
    for (prompt, p, adapter), state in zip(reqs, got):
        want = reference.generate([prompt], p, adapters=[adapter])[0]
        assert state.generated == want.token_ids, (adapter, len(prompt))
        assert np.abs(np.array(state.logprobs) - np.array(want.logprobs)).max() < 1e-4
    assert any(b.startswith("decode_b2_") for b in used)
    assert any(b.startswith("mixed_b4+") for b in used)
    with pytest.raises(ValueError, match="mixed-step decode bucket"):
        small_config(decode_batch_buckets=(2, 4), mixed_decode_batch_buckets=(2,)).validate()
    with pytest.raises(ValueError, match="mixed-step decode bucket"):
        small_config(decode_batch_buckets=(4,), mixed_decode_batch_buckets=(8,)).validate()


@pytest.mark.parametrize(
    "modules,norms",
    [
        (("q_proj", "v_proj"), ("input_layernorm",)),
        (("o_proj", "down_proj"), ()),
        (("up_proj", "k_proj"), ("input_layernorm", "post_attention_layernorm")),
    ],
)
def test_materialized_norms_are_those_feeding_lora(modules, norms):
    """materialize_norms puts a barrier only on norms whose output an adapter-targeted projection reads
    (o and down read the attention output and SiLU x up, not a norm); on by default; off, on none."""
    assert small_config(lora_modules=modules).materialized_norms() == norms
    assert small_config(lora_modules=modules, materialize_norms=False).materialized_norms() == ()


@pytest.mark.parametrize("kv_write,copied", [("per_layer", False), ("end", True)])
def test_unrolled_cpu_step_updates_the_pool_in_place(tiny, kv_write, copied):
    """The unrolled mixed-adapter decode step on CPU copies the whole donated pool only with the K/V
    written after the last layer (XLA's copy insertion; what kv_write="per_layer" is for)."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA's CPU compiler")
    loaded, _, _ = tiny
    config = small_config(layer_loop="unrolled", kv_write=kv_write, lora_rank_buckets=(16,))
    engine = jlora.Engine(loaded, config)
    pool = engine.paged.pool
    shape = ",".join(map(str, pool.shape))
    name = next(n for n in engine.paged.compiled if n.startswith("decode") and not n.endswith("_r0"))
    hlo = engine.paged.compiled[name].as_text()
    assert bool(re.search(rf"f32\[{shape}\]\{{[0-9,]*\}} copy\(", hlo)) == copied


def test_greedy_only_compiles_half_and_refuses_a_temperature(tiny):
    loaded, paths, reference = tiny
    engine = jlora.Engine(loaded, small_config(greedy_only=True, lora_rank_buckets=(16,)))
    config = small_config(lora_rank_buckets=(16,))
    both = PagedEngine.buckets(
        types.SimpleNamespace(config=config, mixed_steps=config.resolved_mixed_steps())
    )
    assert 2 * engine.compile_count() == len(both)
    assert not any(name.endswith("_draw") for name in engine.paged.compiled)
    with pytest.raises(jlora.InvalidRequestError, match="greedy"):
        engine.generate([[1, 2, 3]], jlora.SamplingParams(max_tokens=4, temperature=0.7))
    want = reference.generate([[1, 2, 3]], PARAMS)[0].token_ids
    assert engine.generate([[1, 2, 3]], PARAMS)[0].token_ids == want


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_mixed_step_runs_each_lora_group_once(tiny, monkeypatch, impl):
    """The decode rows of a mixed step run each shared q/k/v and gate/up LoRA launch once per layer, as a
    decode step does (the members' inputs are one split, not one each). interpret: the kernels, which
    work on the mixed step's rows in place (rows_in_place), here with q/k/v as separate projections."""
    import jlora.model.paged as paged_model

    loaded, _, _ = tiny
    launches, prefill_launches = [], []
    real = paged_model.lora_decode_group
    monkeypatch.setattr(paged_model, "lora_decode_group", lambda *a, **k: launches.append(1) or real(*a, **k))
    real_prefill = paged_model.lora_prefill_group
    monkeypatch.setattr(
        paged_model,
        "lora_prefill_group",
        lambda *a, **k: prefill_launches.append(a[5]) or real_prefill(*a, **k),
    )
    config = small_config(
        mixed_steps="on", fuse_lora="on", greedy_only=True, lora_rank_buckets=(16,), implementation=impl
    )
    engine = jlora.Engine(loaded, dataclasses.replace(config, compilation_cache_dir=None))
    groups = len(engine.paged.lora_groups)
    assert groups == 2 and sorted(n for n in engine.paged.compiled if n.endswith("_r16")) == [
        "decode_b4_t1_p12_r16",
        "mixed_b4+2_t8_p12_r16",
        "prefill_b2_t8_p12_r16",
    ]
    assert len(launches) == 2 * groups  # the scanned layer traced once per bucket with decode rows
    # and the prompt chunks' q/k/v and gate/up SGMV as one launch per group too (prefill and mixed)
    widths = {tuple(w) for w in prefill_launches}
    assert len(prefill_launches) == 2 * groups and len(widths) == groups


def test_mixed_steps_time_the_prefill_estimate(tiny, monkeypatch):
    """A prompt advances only in steps that carry its chunks: with mixed steps those are mixed calls, and
    the scheduler's per-token prefill estimate (its early abort's) is taken from them."""
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config(mixed_steps="on"))
    for name, path in paths.items():
        engine.load_adapter(name, path)
    runner = engine.runner
    observed, collect = [], runner._collect

    def spy(inflight):
        before = runner.scheduler.prefill_seconds_per_token
        out = collect(inflight)
        if runner.scheduler.prefill_seconds_per_token != before:
            observed.append([c.kind for c in inflight.calls])
        return out

    monkeypatch.setattr(runner, "_collect", spy)
    run_staggered(engine, requests(10, seed=4, long_decodes=True), per_step=1)
    assert ["mixed"] in observed
    assert all(kinds in (["mixed"], ["prefill"]) for kinds in observed)


def test_stop_tokens_mid_batch_with_overlap(tiny):
    """Requests that stop on a sampled token while the next step is already queued for them: the extra
    step's output is dropped, their pages are freed, and the others are not disturbed."""
    loaded, paths, reference = tiny
    engine = jlora.Engine(loaded, small_config())
    for name, path in paths.items():
        engine.load_adapter(name, path)
    reqs = []
    for prompt, p, adapter in requests(10, seed=11, long_decodes=True):
        free = reference.generate([prompt], p, adapters=[adapter])[0].token_ids
        stop = free[2 + len(reqs) % 5]  # each stops early, at its own step
        reqs.append((prompt, dataclasses.replace(p, ignore_eos=False, stop_token_ids=(stop,)), adapter))
    got = run_staggered(engine, reqs, per_step=3)
    for (prompt, p, adapter), state in zip(reqs, got):
        want = reference.generate([prompt], p, adapters=[adapter])[0]
        assert want.finish_reason == "stop" and state.finish_reason == "stop"
        assert state.generated == want.token_ids
    assert not engine.paged.memory.page_tables
    engine.paged.memory.check_invariants()


@pytest.mark.parametrize("pin", ["off", "on"])
def test_serving_never_recompiles(tiny, pin):
    """Mixed steps on: their buckets are compiled ahead of time too; so is the adapter page writer, for
    numpy pages and for pinned ones (it compiled again at the first adapter load once)."""
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config(mixed_steps="on", pin_host_adapters=pin))
    assert (engine.paged._pin_device is not None) == (pin == "on")
    compiles = []

    def listener(event, duration, **kw):
        if "backend_compile" in event or "compile_time" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for name, path in paths.items():
            engine.load_adapter(name, path)
        run_staggered(engine, requests(20, seed=5), per_step=3)
        engine.generate([[5, 6, 7]] * 4, PARAMS, adapters=[None, "mlp_r64", "qv_r4", None])
        chunks = list(engine.stream([1, 2, 3, 4, 5], PARAMS, adapter="regex_r12"))
        assert chunks[-1].finish_reason == "length"
        engine.unload_adapter("qv_r4")
        engine.generate([list(range(40))], PARAMS)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener) if hasattr(
            jax.monitoring, "unregister_event_duration_listener"
        ) else None
    assert compiles == [], f"recompiled while serving: {compiles}"
    assert engine.compile_count() == len(engine.paged.buckets())


def test_stream_matches_generate_and_cancel_frees_pages(tiny):
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config())
    engine.load_adapter("all_r8_rslora", paths["all_r8_rslora"])
    prompt = list(range(3, 25))
    want = engine.generate([prompt], PARAMS, adapters=["all_r8_rslora"])[0]
    chunks = list(engine.stream(prompt, PARAMS, adapter="all_r8_rslora"))
    assert [c.token_id for c in chunks] == want.token_ids
    assert [c.logprob for c in chunks] == pytest.approx(want.logprobs, abs=1e-6)
    stream = engine.stream(
        prompt, jlora.SamplingParams(max_tokens=40, temperature=0.0), adapter="all_r8_rslora"
    )
    next(stream)
    next(stream)
    assert engine.paged.memory.page_tables  # the stream holds pages while it runs
    stream.close()  # the caller goes away: cancel
    assert not engine.paged.memory.page_tables
    assert engine.runner.adapter_users("all_r8_rslora") == 0
    engine.paged.memory.check_invariants()


def test_adapter_pages_are_laid_out_outside_the_engine_lock(tiny, monkeypatch):
    """Loads from several threads at once: each adapter's pages are built while the engine stays free
    for a serving caller, and every adapter then serves as the reference does."""
    import concurrent.futures
    import threading

    loaded, paths, reference = tiny
    engine = jlora.Engine(loaded, small_config())
    free_during_layout = []
    layout = engine.paged.adapter_pages

    def checked_layout(adapter, ranks):
        def try_lock():  # another thread, as a serving caller would be
            if engine._lock.acquire(blocking=False):
                engine._lock.release()
                free_during_layout.append(True)
            else:
                free_during_layout.append(False)

        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        return layout(adapter, ranks)

    monkeypatch.setattr(engine.paged, "adapter_pages", checked_layout)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda item: engine.load_adapter(*item), paths.items()))
    assert free_during_layout == [True] * len(paths)
    names = sorted(paths)
    prompts = [list(range(2 + i, 9 + 2 * i)) for i in range(len(names))]
    got = engine.generate(prompts, PARAMS, adapters=names)
    for prompt, name, out in zip(prompts, names, got):
        want = reference.generate([prompt], PARAMS, adapters=[name])[0]
        assert out.token_ids == want.token_ids
        assert np.abs(np.array(out.logprobs) - np.array(want.logprobs)).max() < 1e-4


def test_unknown_adapter_and_bad_input_leave_paged_engine_serving(tiny):
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config())
    engine.load_adapter("qv_r4", paths["qv_r4"])
    want = engine.generate([[1, 2, 3]], PARAMS, adapters=["qv_r4"])[0].token_ids
    with pytest.raises(jlora.AdapterNotFoundError):
        engine.generate([[1, 2, 3]], PARAMS, adapters=["nope"])
    with pytest.raises(jlora.InvalidRequestError, match="context length"):
        engine.generate([[1] * 90], PARAMS)
    assert engine.generate([[1, 2, 3]], PARAMS, adapters=["qv_r4"])[0].token_ids == want


def test_smollm_paged_equals_reference():
    loaded = loader.load("smollm2-135m", progress=False)
    config = EngineConfig(
        max_model_len=256,
        num_pages=64,
        max_batch=4,
        decode_batch_buckets=(4,),
        prefill_batch_buckets=(1,),
        prefill_chunk_buckets=(64,),
        page_buckets=(16,),
        lora_rank_buckets=(16,),
    )
    paged = jlora.Engine(loaded, config)
    reference = jlora.Engine(loaded, reference=True)
    convos = [
        [{"role": "user", "content": q}] for q in ["What is the capital of France?", "Name a color.", "Hi!"]
    ]
    p = jlora.SamplingParams(max_tokens=20, temperature=0.0, logprobs=True)
    for a, b in zip(paged.chat(convos, p), reference.chat(convos, p)):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-4


def test_async_engine_concurrent_streams_and_cancel(tiny):
    import asyncio

    from jlora.async_engine import AsyncEngine

    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config())
    engine.load_adapter("qv_r4", paths["qv_r4"])
    engine.load_adapter("layers_r8", paths["layers_r8"])
    reqs = [([1, 2, 3, i + 4], PARAMS, [None, "qv_r4", "layers_r8"][i % 3]) for i in range(9)]
    want = [engine.generate([p], s, adapters=[a])[0].token_ids for p, s, a in reqs]
    front = AsyncEngine(engine)

    async def main():
        outs = await asyncio.gather(*(front.generate(p, s, a) for p, s, a in reqs))
        long = jlora.SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        stream = front.stream([9, 9, 9], long, "qv_r4")
        got = [await stream.__anext__(), await stream.__anext__()]  # running, holding pages
        await stream.aclose()  # the caller goes away: cancel
        assert all(c.finish_reason is None for c in got)
        for _ in range(200):  # the engine thread applies the cancel between steps
            if not engine.runner.has_work():
                break
            await asyncio.sleep(0.01)
        return outs

    outs = asyncio.run(main())
    front.shutdown()
    assert [o.token_ids for o in outs] == want
    assert not engine.paged.memory.page_tables  # the cancelled request's pages are free
    assert engine.runner.adapter_users("qv_r4") == 0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lora_modules", ("q_proj", "lm_head"), "unknown lora_modules"),
        ("layer_loop", "sideways", "layer_loop"),
        ("prefill_attention", "flash", "prefill_attention"),
        ("fuse_lora", "yes", "fuse_lora"),
        ("num_pages", 1, "num_pages"),
        ("command_buffer_scheduling", "parallel", "command_buffer_scheduling"),
    ],
)
def test_bad_engine_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        small_config(**{field: value}).validate()


def test_command_buffer_scheduling_goes_to_every_gpu_compile(tiny, monkeypatch):
    """command_buffer_scheduling becomes XLA's option on the GPU only, and the engine hands its options to
    each step's compile (an option XLA does not know fails there)."""
    config = small_config(command_buffer_scheduling="concurrent")
    assert config.compiler_options("gpu") == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    assert config.compiler_options("cpu") == {} and small_config().compiler_options("gpu") == {}
    loaded, _, _ = tiny
    monkeypatch.setattr(EngineConfig, "compiler_options", lambda self, backend: {"xla_no_such_option": "1"})
    with pytest.raises(Exception, match="xla_no_such_option"):
        jlora.Engine(loaded, small_config(warm_up="off"))


@pytest.mark.parametrize(
    "fuse_lora,path,fused",
    [
        ("auto", "pallas", True),
        ("auto", "interpret", False),
        ("auto", "reference", False),
        ("on", "reference", True),
        ("off", "pallas", False),
    ],
)
def test_fuse_lora_auto_follows_the_kernels(monkeypatch, fuse_lora, path, fused):
    """'auto' shares the q/k/v and gate/up launches where the GPU kernels run (measured faster there)."""
    config = small_config(
        fuse_lora=fuse_lora, lora_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
    )
    monkeypatch.setattr(type(config), "resolved_implementation", lambda self: path)
    want = (("q_proj", "k_proj", "v_proj"),) if fused else ()
    assert config.lora_groups() == want


def test_decode_lora_cache_follows_adapter_placement(tiny):
    """The decode LoRA metadata of a repeated batch composition is reused, and an adapter evicted and
    loaded again (at other pages) is never served from the cached entry of its old placement."""
    from jlora.scheduler import ScheduledChunk

    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config())
    paged = engine.paged
    one = jlora.SamplingParams(max_tokens=1, temperature=0.0)
    engine.load_adapter("qv_r4", paths["qv_r4"])
    engine.generate([[5, 6]], one, adapters=["qv_r4"])  # placed on the device when first used
    chunks = [ScheduledChunk(i, [1], 4, [1], "qv_r4", True, 0) for i in range(2)]
    first = paged._decode_lora(chunks, 4, 16)
    assert paged._decode_lora(chunks, 4, 16) is first  # the repeated composition: reused
    old_rows = paged.memory.adapters["qv_r4"].placement.a_start["q_proj"].copy()
    engine.unload_adapter("qv_r4")
    engine.load_adapter("mlp_r64", paths["mlp_r64"])
    engine.generate([[5, 6]], one, adapters=["mlp_r64"])  # takes the freed pages first
    engine.load_adapter("qv_r4", paths["qv_r4"])
    engine.generate([[5, 6]], one, adapters=["qv_r4"])
    new_rows = paged.memory.adapters["qv_r4"].placement.a_start["q_proj"]
    assert not np.array_equal(old_rows, new_rows)
    again = paged._decode_lora(chunks, 4, 16)
    assert again is not first
    q = next(v for k, v in again.items() if "q_proj" in k)
    assert set(new_rows) <= set(np.asarray(q.a_start).tolist())
    assert not set(old_rows) & set(np.asarray(q.a_start).tolist())


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_warm_up_runs_every_step_and_leaves_pool_and_carry(tiny, monkeypatch, impl):
    """warm_up runs each compiled step once on padding: with adapters and K/V in the pool, every byte of
    the pool and of the token carry is as it was, and the engine then serves as the reference does.
    interpret: the GPU's shape of step (kernels, unrolled layers, fused projections, mixed steps with
    rows in place), whose padding rows go through the kernels' own bounds."""
    loaded, paths, reference = tiny
    config = small_config(
        implementation=impl,
        mixed_steps="on",
        greedy_only=True,
        layer_loop="unrolled" if impl == "interpret" else "scan",
        fuse_projections="on" if impl == "interpret" else "auto",
        fuse_lora="on" if impl == "interpret" else "auto",
    )
    on_gpu = jax.default_backend() == "gpu" and jax.process_count() == 1
    assert config.resolved_warm_up() == on_gpu  # auto: a GPU in one process only
    engine = jlora.Engine(loaded, config)
    paged = engine.paged
    assert (paged.warm_up_seconds > 0) == on_gpu
    for name, path in paths.items():
        engine.load_adapter(name, path)
    reqs = [r for r in requests(6, seed=5) if r[1].temperature == 0.0]
    run_staggered(engine, reqs)  # adapters and K/V now in the pool
    pool, carry = np.asarray(paged.pool).copy(), np.asarray(paged.carry).copy()
    ran = []
    dispatch = paged._dispatch
    monkeypatch.setattr(paged, "_dispatch", lambda name, packed: ran.append(name) or dispatch(name, packed))
    paged.warm_up()
    assert sorted(ran) == sorted(paged.compiled) and len(ran) == len(set(ran))
    assert any(n.startswith("mixed") and not n.endswith("_r0") for n in ran)
    np.testing.assert_array_equal(np.asarray(paged.pool), pool)
    np.testing.assert_array_equal(np.asarray(paged.carry), carry)
    assert paged.warm_up_seconds > 0
    got = run_staggered(engine, reqs)
    for (prompt, p, adapter), state in zip(reqs, got):
        assert state.generated == reference.generate([prompt], p, adapters=[adapter])[0].token_ids


def test_warm_up_on_at_start(tiny):
    loaded, _, _ = tiny
    engine = jlora.Engine(loaded, small_config(warm_up="on", greedy_only=True, lora_rank_buckets=(16,)))
    assert engine.paged.warm_up_seconds > 0
    with pytest.raises(ValueError, match="warm_up"):
        small_config(warm_up="yes").validate()


@pytest.mark.parametrize("variant", ["split", "longest-first"])
def test_ragged_decode_attention_in_the_engine(tiny, monkeypatch, variant):
    """The decode kernel's tunings for ragged steps - the flash-decoding split (AttentionTunables.
    split_keys) or the grid walking the sequences longest first (longest_first) - in the GPU's shape
    of step, interpreted: decode-only steps and a mixed step's decode rows (written into the step's
    output in place) serve what the reference serves."""
    import pallas_kernels.paged_attention as attention
    from pallas_kernels.paged_attention import kernel as attention_kernel

    if variant == "split":
        tunables = attention.AttentionTunables(pages_per_block=1, split_keys=8)
        hook, wrapped = "combine_splits", attention_kernel.combine_splits
    else:
        tunables = attention.AttentionTunables(pages_per_block=1, longest_first=True)
        hook, wrapped = "_grid_position", attention_kernel._grid_position
    monkeypatch.setattr(attention, "tunables_for", lambda *a, **k: tunables)
    merged = []  # the variant's own code traced into the compiled steps
    monkeypatch.setattr(attention_kernel, hook, lambda *a: merged.append(a) or wrapped(*a))
    loaded, paths, reference = tiny
    config = small_config(
        implementation="interpret",
        mixed_steps="on",
        greedy_only=True,
        layer_loop="unrolled",
        fuse_projections="on",
        fuse_lora="on",
        lora_rank_buckets=(16, 64),
    )
    engine = jlora.Engine(loaded, config)
    assert merged if variant == "split" else any(ordered for _, ordered, _ in merged)
    for name, path in paths.items():
        engine.load_adapter(name, path)
    reqs = [r for r in requests(6, seed=11) if r[1].temperature == 0.0]
    for (prompt, p, adapter), state in zip(reqs, run_staggered(engine, reqs)):
        want = reference.generate([prompt], p, adapters=[adapter])[0]
        assert state.generated == want.token_ids
        assert np.abs(np.array(state.logprobs) - np.array(want.logprobs)).max() < 1e-4
