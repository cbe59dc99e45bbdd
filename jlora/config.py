"""Frozen configuration: the model's geometry, the engine's limits, named presets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jlora.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling: 'default', 'linear' or 'llama3'."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Geometry of a Llama-family decoder. Field names follow Hugging Face's config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear projection of one decoder layer, by its PEFT name."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """A config from a Hugging Face config.json dictionary."""
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"unsupported model_type {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"unsupported rope scaling {kind!r}")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = RopeScaling(
            kind=kind,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of from_hf_dict (what an orbax checkpoint stores beside the weights)."""
        out = dataclasses.asdict(self)
        out["model_type"] = out.pop("architecture")
        rs = out.pop("rope_scaling")
        out["rope_scaling"] = {"rope_type": rs.pop("kind"), **rs}
        out["eos_token_id"] = list(out.pop("eos_token_ids"))
        if self.sliding_window and self.architecture == "qwen2":
            out["use_sliding_window"] = True
        return out


def _preset(**kw: Any) -> ModelConfig:
    base = dict(
        architecture="llama",
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    base.update(kw)
    return ModelConfig(**base)


# Geometries for random-weight benchmarks (weights of real checkpoints come from their files).
PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": _preset(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
    ),
    "llama2-70b": _preset(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "llama3-8b": _preset(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    ),
    "tiny": _preset(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    ),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `model` ways of tensor parallelism (Megatron-style heads and MLP columns, KV
    pages split by KV head, LoRA split like the layer it adapts). `data` replicas are separate engines."""

    data: int = 1
    model: int = 1

    @property
    def size(self) -> int:
        return self.data * self.model


ALL_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# projections that read the same input in a decoder layer
SHARED_INPUT_MODULES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits and buckets of the paged engine. Every traced shape comes from these lists."""

    page_size: int = 16  # tokens per KV page
    num_pages: int = 512  # the unified pool (KV + adapters), page 0 reserved
    max_model_len: int = 2048
    max_batch: int = 8  # running sequences
    decode_batch_buckets: tuple[int, ...] = (1, 8)
    # the decode rows' buckets in mixed steps (None: decode_batch_buckets). A padded decode row costs
    # ~20 us a step on the H200 (slora-trace's per-step records, bench/RESULTS.md), so decode-only steps
    # want fine buckets; a mixed step's buckets multiply with the prompt-chunk buckets, so they can
    # stay coarse
    mixed_decode_batch_buckets: tuple[int, ...] | None = None
    prefill_batch_buckets: tuple[int, ...] = (1,)
    prefill_chunk_buckets: tuple[int, ...] = (128,)  # the largest is the per-step prefill budget
    page_buckets: tuple[int, ...] | None = None  # pages per sequence; None: powers of 4 up to the max
    lora_rank_buckets: tuple[int, ...] = (16, 64)  # the largest is the largest rank accepted
    lora_modules: tuple[str, ...] = ALL_LORA_MODULES  # projections adapters may target
    host_adapter_bytes: int = 8 << 30  # host registry budget (LRU by bytes)
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("JLORA_CACHE", os.path.expanduser("~/.cache/jlora/xla"))
    )
    implementation: str = (
        "auto"  # "auto": Pallas kernels on GPU, references elsewhere; "reference"; "interpret"
    )
    # "scan" over stacked layers, "unrolled" (per-layer buffers: no per-layer weight copy; longer
    # compiles), or "auto": unrolled on GPU (decode-7b on the H200: 11.7 vs 18.9 ms/step), scan
    # elsewhere (SmolLM2 on this 2-core CPU: 76 vs 35 tok/s)
    layer_loop: str = "auto"
    # schedule and pack step N+1 on the host while step N runs on the device (Runner.step); False runs
    # each step to the end before the next is scheduled
    overlap: bool = True
    # prefill chunks' attention: "kernel" (the flash-style Pallas kernel, where the implementation has
    # kernels), "reference", or "auto" (pallas_kernels.paged_attention.PREFILL_KERNEL: the kernel on the
    # GPU and in the interpreter; H100, 512-token chunks: 307 vs 1,002 us MHA, 190 vs 943 us GQA 32/8)
    prefill_attention: str = "auto"
    # decode LoRA of projections that read the same input (q/k/v, gate/up): "on" runs them in one shrink
    # and one expand launch, "off" in one of each per projection. "auto": on with the GPU kernels
    # (decode-7b mixed on the H100: 8.35 vs 8.94 ms/step, BGMV 0.87 vs 1.36 ms), off elsewhere (this
    # 2-core CPU, cpu-smol shape: 89.7 vs 92.1 tok/s)
    fuse_lora: str = "auto"
    # where an unrolled step writes the new K/V (forward_paged's kv_write): "end" (one scatter after the
    # last layer), "per_layer" (before each layer's attention), or "auto": per_layer on CPU, where XLA
    # otherwise copies the whole pool twice a step, end elsewhere (one launch instead of one per layer)
    kv_write: str = "auto"
    # with the Pallas kernels, which steps run attention and LoRA as kernels on their batch's rows of the
    # step's arrays, LoRA deltas added into the projection's output in place (forward_paged's in_place):
    # "mixed" (steps with decode rows and prefill chunks: no slices of activations, no joins of the
    # batches' outputs), "all" (every step: no separate add of the LoRA delta), or "off"
    rows_in_place: str = "mixed"
    # the scaled output of each norm that feeds an adapter-targeted projection written once for the
    # matmul and the LoRA kernels (materialized_norms(), forward_paged's materialize_norms): on the GPU,
    # XLA otherwise folds the norm's weight into the GEMM and scales the input again for the LoRA
    # kernels, a launch a layer. Measured on the H200 (trace-shaped decode step 5.57 -> 5.36 ms, 536 ->
    # 504 kernels a step; bench/RESULTS.md, seventeenth session)
    materialize_norms: bool = True
    # compile only the greedy step variants (half the start-up compiles); requests with a temperature
    # are then refused with InvalidRequestError
    greedy_only: bool = False
    # keep adapters' host pages in pinned host memory, so that paging one in is a DMA (H100 host:
    # 47.8 vs 7.1 GB/s from pageable memory): "on", "off", or "auto" (on with a GPU)
    pin_host_adapters: str = "auto"
    # unrolled layers only, one device: q/k/v as one matmul and gate/up as one (fewer, larger launches;
    # each projection's LoRA still adds to its own columns). "on", "off", or "auto": on with the GPU
    # kernels
    fuse_projections: str = "auto"
    # a step with both decode rows and prefill chunks runs them in one call (one pass over the weights)
    # instead of two: "on", "off", or "auto" (on with a GPU). Adds a compiled step per (decode batch,
    # prefill batch, chunk) bucket
    mixed_steps: str = "auto"
    # base weight matmuls on the CPU: "panels" (weights stored as column panels and multiplied by the
    # C++ panel kernel, pallas_kernels.cpu: a decode step streams them at ~22 vs ~13 GB/s with XLA's
    # GEMM on the 2-core dev CPU), "xla", or "auto": panels on the CPU backend for float32 weights on
    # one device, where the kernel builds
    cpu_matmul: str = "auto"
    # run every compiled step once at start-up, on padding only, so that no request pays a step's first
    # run (a GPU loads a step's kernels on its first launch): "on", "off", or "auto" (on with a GPU in
    # one process)
    warm_up: str = "auto"
    # how a GPU step's CUDA graph orders its kernels (XLA's xla_gpu_command_buffer_scheduling_mode, given
    # to every step's compile): "concurrent" (kernels without data conflicts may run side by side, e.g. a
    # LoRA shrink beside its projection's GEMM), "serialize", "lhs", or "auto" (XLA's own default, LHS,
    # which runs them one after another). Ignored off the GPU. Not yet measured.
    command_buffer_scheduling: str = "auto"

    @property
    def max_lora_rank(self) -> int:
        return max(self.lora_rank_buckets)

    @property
    def max_prefill_tokens(self) -> int:
        return max(self.prefill_chunk_buckets)

    def pages_per_sequence(self) -> int:
        return -(-self.max_model_len // self.page_size)

    def resolved_page_buckets(self) -> tuple[int, ...]:
        top = self.pages_per_sequence()
        if self.page_buckets is not None:
            return tuple(sorted({min(p, top) for p in self.page_buckets} | {top}))
        buckets, p = [], 8
        while p < top:
            buckets.append(p)
            p *= 4
        return (*buckets, top)

    def resolved_mixed_decode_buckets(self) -> tuple[int, ...]:
        """The decode rows' buckets in mixed steps."""
        return self.mixed_decode_batch_buckets or self.decode_batch_buckets

    def validate(self) -> None:
        if max(self.decode_batch_buckets) < self.max_batch:
            raise ValueError("the largest decode batch bucket must hold max_batch")
        mixed = self.resolved_mixed_decode_buckets()
        if not self.max_batch <= max(mixed) <= max(self.decode_batch_buckets):
            raise ValueError(
                f"the largest mixed-step decode bucket ({max(mixed)}) must hold max_batch "
                f"({self.max_batch}) and be at most the largest decode bucket ({max(self.decode_batch_buckets)})"
            )
        if self.num_pages < 2:
            raise ValueError("num_pages must be >= 2 (page 0 is reserved)")
        if self.layer_loop not in ("scan", "unrolled", "auto"):
            raise ValueError(f"layer_loop must be 'scan', 'unrolled' or 'auto', not {self.layer_loop!r}")
        if self.prefill_attention not in ("kernel", "reference", "auto"):
            raise ValueError(
                f"prefill_attention must be 'kernel', 'reference' or 'auto', not {self.prefill_attention!r}"
            )
        if self.fuse_lora not in ("off", "on", "auto"):
            raise ValueError(f"fuse_lora must be 'off', 'on' or 'auto', not {self.fuse_lora!r}")
        if self.fuse_projections not in ("on", "off", "auto"):
            raise ValueError(f"fuse_projections must be 'on', 'off' or 'auto', not {self.fuse_projections!r}")
        if self.fuse_projections == "on" and self.resolved_layer_loop() != "unrolled":
            raise ValueError("fuse_projections='on' needs layer_loop='unrolled'")
        if self.pin_host_adapters not in ("on", "off", "auto"):
            raise ValueError(
                f"pin_host_adapters must be 'on', 'off' or 'auto', not {self.pin_host_adapters!r}"
            )
        if self.mixed_steps not in ("on", "off", "auto"):
            raise ValueError(f"mixed_steps must be 'on', 'off' or 'auto', not {self.mixed_steps!r}")
        if self.cpu_matmul not in ("panels", "xla", "auto"):
            raise ValueError(f"cpu_matmul must be 'panels', 'xla' or 'auto', not {self.cpu_matmul!r}")
        if self.rows_in_place not in ("mixed", "all", "off"):
            raise ValueError(f"rows_in_place must be 'mixed', 'all' or 'off', not {self.rows_in_place!r}")
        if self.warm_up not in ("on", "off", "auto"):
            raise ValueError(f"warm_up must be 'on', 'off' or 'auto', not {self.warm_up!r}")
        if self.command_buffer_scheduling not in ("concurrent", "serialize", "lhs", "auto"):
            raise ValueError(
                "command_buffer_scheduling must be 'concurrent', 'serialize', 'lhs' or 'auto', "
                f"not {self.command_buffer_scheduling!r}"
            )
        if self.kv_write not in ("end", "per_layer", "auto"):
            raise ValueError(f"kv_write must be 'end', 'per_layer' or 'auto', not {self.kv_write!r}")
        unknown = set(self.lora_modules) - set(ALL_LORA_MODULES)
        if unknown:
            raise ValueError(f"unknown lora_modules {sorted(unknown)}")

    def compiler_options(self, backend: str) -> dict[str, str]:
        """XLA options for every step's compile on this backend (jax.default_backend())."""
        if backend != "gpu" or self.command_buffer_scheduling == "auto":
            return {}
        return {"xla_gpu_command_buffer_scheduling_mode": self.command_buffer_scheduling.upper()}

    def lora_groups(self) -> tuple[tuple[str, ...], ...]:
        """The projection groups whose decode LoRA launches are shared (empty when not fused)."""
        if self.fuse_lora == "off" or (
            self.fuse_lora == "auto" and self.resolved_implementation() != "pallas"
        ):
            return ()
        groups = (tuple(m for m in g if m in self.lora_modules) for g in SHARED_INPUT_MODULES)
        return tuple(g for g in groups if len(g) >= 2)

    def materialized_norms(self) -> tuple[str, ...]:
        """With materialize_norms, the norms whose output feeds a projection adapters may target (the
        input norm: q/k/v; the post-attention norm: gate/up); else none."""
        if not self.materialize_norms:
            return ()
        norms = zip(("input_layernorm", "post_attention_layernorm"), SHARED_INPUT_MODULES, strict=True)
        return tuple(name for name, members in norms if set(members) & set(self.lora_modules))

    def prefill_kernel(self) -> bool | None:
        """paged_attention's prefill_kernel argument: None leaves the choice to the kernel package."""
        return {"kernel": True, "reference": False, "auto": None}[self.prefill_attention]

    def resolved_implementation(self) -> str:
        """The kernels' path in this process: "pallas", "interpret" or "reference"."""
        from pallas_kernels.backend import resolve

        return resolve(self.implementation)

    def resolved_layer_loop(self) -> str:
        if self.layer_loop != "auto":
            return self.layer_loop
        import jax

        return "unrolled" if jax.default_backend() == "gpu" else "scan"

    def resolved_fuse_projections(self) -> bool:
        if self.fuse_projections != "auto":
            return self.fuse_projections == "on"
        return self.resolved_implementation() == "pallas" and self.resolved_layer_loop() == "unrolled"

    def resolved_pin_host_adapters(self) -> bool:
        if self.pin_host_adapters != "auto":
            return self.pin_host_adapters == "on"
        import jax

        return jax.default_backend() == "gpu"

    def resolved_cpu_matmul(self, dtype: Any, mesh: object | None = None) -> str:
        """ "panels" or "xla" for weights of `dtype` (and a mesh, or None for one device)."""
        import jax
        import jax.numpy as jnp

        from pallas_kernels.cpu import kernel_available

        if self.cpu_matmul == "xla":
            return "xla"
        fits = jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and mesh is None
        if fits and kernel_available():
            return "panels"
        if self.cpu_matmul == "panels":
            raise ValueError(
                "cpu_matmul='panels' needs the CPU backend, float32 weights, one device and the "
                "C++ kernel built (pallas_kernels.cpu)"
            )
        return "xla"

    def resolved_kv_write(self) -> str:
        if self.kv_write != "auto":
            return self.kv_write
        import jax

        return "per_layer" if jax.default_backend() == "cpu" else "end"

    def resolved_mixed_steps(self) -> bool:
        if self.mixed_steps != "auto":
            return self.mixed_steps == "on"
        import jax

        return jax.default_backend() == "gpu"

    def resolved_warm_up(self) -> bool:
        if self.warm_up != "auto":
            return self.warm_up == "on"
        import jax

        return jax.default_backend() == "gpu" and jax.process_count() == 1
