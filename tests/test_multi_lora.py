"""Every request its own adapter in ONE batch equals HF PEFT running each request alone (float32)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

import jlora
from jlora.config import EngineConfig
from tests.helpers import tiny_hf_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def adapter_specs(num_layers: int) -> dict[str, dict]:
    last = num_layers - 1
    return {
        "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "all_r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN + MLP),
        "attn_r16_patterns": dict(
            r=16,
            lora_alpha=16,
            target_modules=ATTN,
            rank_pattern={"k_proj": 4, f"model.layers.{min(1, last)}.self_attn.q_proj": 32},
            alpha_pattern={"o_proj": 3},
        ),
        "mlp_r64": dict(r=64, lora_alpha=32, target_modules=MLP),
        "regex_r12": dict(r=12, lora_alpha=24, target_modules=r"model\.layers\.(0|2)\.self_attn\.(q|v)_proj"),
        "layers_r8": dict(
            r=8, lora_alpha=8, target_modules=["up_proj", "o_proj"], layers_to_transform=[0, last]
        ),
    }


def build_peft(base_model, specs: dict[str, dict], folder, seed: int = 0):
    """A PeftModel holding every adapter (random, init_lora_weights=False), each saved to its folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    names = list(specs)
    peft_model = get_peft_model(
        copy.deepcopy(base_model),
        LoraConfig(init_lora_weights=False, **specs[names[0]]),
        adapter_name=names[0],
    )
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(init_lora_weights=False, **specs[name]))
    paths = {}
    for name in names:
        peft_model.save_pretrained(str(folder), selected_adapters=[name])
        paths[name] = os.path.join(str(folder), name)
        assert os.path.isfile(os.path.join(paths[name], "adapter_model.safetensors"))
    return peft_model.eval(), paths


def peft_logprobs(peft_model, adapter: str | None, prompt: list[int], generated: list[int]) -> np.ndarray:
    import torch

    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids).logits[0].double()
        else:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    return logp[len(prompt) - 1 : -1]  # [G, V]: the distribution each generated token was drawn from


def check_mixed_batch(engine, peft_model, paths, prompts, tol=2e-4):
    for name, path in paths.items():
        engine.load_adapter(name, path)
    names = list(paths) + [None, None]
    prompts = [prompts[i % len(prompts)] for i in range(len(names))]
    params = jlora.SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)
    outs = engine.generate(prompts, params, adapters=names)  # ONE batch, every request its own adapter
    distinct = {tuple(o.token_ids) for o in outs}
    assert len(distinct) >= len(paths) // 2  # the adapters really change the output
    for name, prompt, out in zip(names, prompts, outs):
        ref = peft_logprobs(peft_model, name, prompt, out.token_ids)
        chosen = ref[np.arange(len(out.token_ids)), out.token_ids]
        assert np.abs(np.array(out.logprobs) - chosen).max() < tol, name
        assert (ref.argmax(-1) == np.array(out.token_ids)).all(), name  # greedy agrees with PEFT too
    return outs


@pytest.mark.parametrize("kind,gpu_shape", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_tiny_models_mixed_batch_equals_peft(tmp_path, kind, gpu_shape):
    """gpu_shape: the GPU's engine configuration run on CPU - the Pallas kernels in the interpreter,
    unrolled layers, shared LoRA launches, and q/k/v (with Qwen2's biases) and gate/up joined into one
    matmul each."""
    model = tiny_hf_model(kind, num_hidden_layers=3)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    peft_model, paths = build_peft(model, adapter_specs(3), tmp_path / "adapters")
    config = EngineConfig(
        implementation="interpret",
        layer_loop="unrolled",
        fuse_lora="on",
        fuse_projections="on",
        max_model_len=64,
        decode_batch_buckets=(4, 8),
        prefill_chunk_buckets=(32,),
    )
    kwargs = {"engine_config": config} if gpu_shape else {}
    engine = jlora.Engine.from_pretrained(str(tmp_path / "base"), progress=False, **kwargs)
    if gpu_shape:
        assert "qkv_proj" in engine.paged.params["layers"][0]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 384, n).tolist() for n in (5, 11, 3, 17)]
    check_mixed_batch(engine, peft_model, paths, prompts)


def test_smollm_mixed_batch_equals_peft(tmp_path, hf_smol):
    model, tok = hf_smol
    peft_model, paths = build_peft(model, adapter_specs(model.config.num_hidden_layers), tmp_path)
    import jlora as j

    engine = j.Engine.from_pretrained("smollm2-135m", progress=False)
    texts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    check_mixed_batch(engine, peft_model, paths, prompts)
    listed = engine.list_adapters()
    assert listed["mlp_r64"]["ranks"] == {"gate_proj": 64, "up_proj": 64, "down_proj": 64}
    assert listed["attn_r16_patterns"]["ranks"]["q_proj"] == 32  # layer 1's rank_pattern
    assert listed["attn_r16_patterns"]["ranks"]["k_proj"] == 4
