"""The embedded SmolLM2 GGUF through jlora equals transformers' own GGUF loader (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

import jlora
from tests.helpers import hf_logsoftmax, jlora_logsoftmax

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, Neil Armstrong became the first person to walk on the",
    "Translate to French: good morning, my friend. ",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logsoftmax_whole_vocab_matches_transformers(smol_engine, hf_smol, prompt):
    model, tok = hf_smol
    ids = tok.encode(prompt, add_special_tokens=False)
    ours = jlora_logsoftmax(smol_engine.model.params, smol_engine.config, ids)
    ref = hf_logsoftmax(model, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 5e-4


def test_greedy_32_tokens_identical_to_transformers(smol_engine, hf_smol):
    import torch

    model, tok = hf_smol
    convo = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(convo, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)[
            0, len(ids) :
        ]
    params = jlora.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=True)
    out = smol_engine.generate([ids], params)[0]
    assert out.token_ids == ref.tolist()
    assert out.text.startswith("The capital of France is Paris.")
    # the returned log-probs are the raw log-softmax of each chosen token
    full = hf_logsoftmax(model, ids + out.token_ids)
    expected = [full[len(ids) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    assert np.abs(np.array(out.logprobs) - np.array(expected)).max() < 2e-4


def test_chat_answers_paris(smol_engine):
    out = smol_engine.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        jlora.SamplingParams(max_tokens=16, temperature=0.0),
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_tokenizer_matches_transformers_and_round_trips(smol_engine, hf_smol):
    _, hf_tok = hf_smol
    tok = smol_engine.tokenizer
    texts = [
        "Hello world",
        "The year 2024 had 366 days, costing $12.50!",
        "  two spaces\n\nnew lines\ttabs",
        "émojis 🎉 and ünïcödé 日本語",
        "<|im_start|>user\nhi<|im_end|>",
        "x=1234567890",
        "don't won't I'm",
        "",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "?"},
    ]
    assert tok.apply_chat_template(convo) == hf_tok.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=True
    )
