"""Tiny random Llama / Mistral / Qwen2 models written by transformers load and match it."""

from __future__ import annotations

import numpy as np
import pytest

import jlora
from tests.helpers import hf_logsoftmax, jlora_logsoftmax, tiny_hf_model

CASES = {
    "llama": dict(),
    "llama-rope3-tied": dict(
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    ),
    "mistral": dict(),
    "qwen2": dict(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_model_matches_transformers(tmp_path, case):
    kind = case.split("-")[0]
    model = tiny_hf_model(kind, seed=len(case), **CASES[case])
    # a sharded save for one case exercises model.safetensors.index.json
    model.save_pretrained(
        tmp_path, safe_serialization=True, max_shard_size="50KB" if kind == "mistral" else "1GB"
    )
    engine = jlora.Engine.from_pretrained(str(tmp_path), dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    for length in (5, 40):
        ids = rng.integers(0, model.config.vocab_size, length).tolist()
        diff = np.abs(
            jlora_logsoftmax(engine.model.params, engine.config, ids) - hf_logsoftmax(model, ids)
        ).max()
        assert diff < 5e-4, (case, length, diff)

    import torch

    prompt = rng.integers(0, model.config.vocab_size, 7).tolist()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 7:].tolist()
    out = engine.generate([prompt], jlora.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert out.text == ""  # no tokenizer in the folder: token ids only


def test_sharded_index_is_used(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    engine = jlora.Engine.from_pretrained(str(tmp_path), progress=False)
    assert engine.config.num_hidden_layers == 3


def test_pickle_only_folder_is_refused(tmp_path):
    model = tiny_hf_model("llama")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(jlora.ModelLoadError, match="safetensors"):
        jlora.Engine.from_pretrained(str(tmp_path), progress=False)
