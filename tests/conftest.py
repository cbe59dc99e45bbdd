"""Shared fixtures: the embedded SmolLM2 through jlora and through transformers (the peer)."""

from __future__ import annotations

import os

# four host devices for the sharding tests (must be set before jax starts its CPU backend)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_path() -> str:
    from jlora.loader import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def smol_engine():
    import jlora

    return jlora.Engine.from_pretrained("smollm2-135m", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smol(smol_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(smol_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_FILE)
    return model, tok


@pytest.fixture(scope="session")
def tiny_tp(tmp_path_factory):
    """A tiny Llama whose heads, KV heads and MLP split 4 ways, with its PEFT adapters (sharding tests)."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    from jlora import loader
    from tests.helpers import tiny_hf_model
    from tests.test_multi_lora import adapter_specs, build_peft

    tmp = tmp_path_factory.mktemp("tp")
    model = tiny_hf_model(
        "llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, intermediate_size=160
    )
    model.save_pretrained(tmp / "base", safe_serialization=True)
    _, paths = build_peft(model, adapter_specs(3), tmp / "adapters")
    return loader.load(str(tmp / "base"), progress=False), paths
