"""Bad input raises a clear jlora error and leaves the engine serving; sampling behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest

import jlora

GREEDY = jlora.SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _still_serves(engine, expected):
    assert engine.chat(PROMPT, GREEDY)[0].token_ids == expected


@pytest.fixture(scope="module")
def expected(smol_engine):
    return smol_engine.chat(PROMPT, GREEDY)[0].token_ids


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ("", GREEDY, "empty prompt"),
        ([], GREEDY, "empty prompt"),
        ([1, 2, 49152], GREEDY, "out of the vocabulary"),
        ([1, -3], GREEDY, "out of the vocabulary"),
        ([1, 2.0], GREEDY, "must be integers"),
        ([1, True], GREEDY, "must be integers"),
        ([1, 2, 3], jlora.SamplingParams(max_tokens=8190), "exceeds the context length"),
        ("hi", jlora.SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", jlora.SamplingParams(temperature=-1.0), "temperature"),
        ("hi", jlora.SamplingParams(temperature=float("nan")), "temperature"),
        ("hi", jlora.SamplingParams(top_p=0.0), "top_p"),
        ("hi", jlora.SamplingParams(top_p=1.5), "top_p"),
        ("hi", jlora.SamplingParams(top_k=-5), "top_k"),
        ("hi", jlora.SamplingParams(seed=-1), "seed"),
        ("hi", jlora.SamplingParams(stop=[""]), "stop"),
        ("hi", jlora.SamplingParams(stop_token_ids=[10**6]), "stop token"),
        (3.5, GREEDY, "prompt is a string"),
    ],
)
def test_bad_input_raises_and_engine_keeps_serving(smol_engine, expected, prompt, params, match):
    with pytest.raises(jlora.InvalidRequestError, match=match):
        smol_engine.generate([prompt], params)
    _still_serves(smol_engine, expected)


def test_numpy_token_ids_are_a_prompt(smol_engine):
    ids = smol_engine.tokenizer.encode("The capital of France is")
    want = smol_engine.generate([ids], GREEDY)[0].token_ids
    as_numpy = [np.asarray(ids, np.int64), [np.int32(t) for t in ids]]
    assert [o.token_ids for o in smol_engine.generate(as_numpy, GREEDY)] == [want, want]


def test_one_bad_prompt_in_a_batch_rejects_the_batch_cleanly(smol_engine, expected):
    with pytest.raises(jlora.InvalidRequestError):
        smol_engine.generate(["fine prompt", ""], GREEDY)
    _still_serves(smol_engine, expected)


def test_unknown_adapter_is_a_clear_error(smol_engine, expected):
    with pytest.raises(jlora.AdapterNotFoundError, match="unknown adapter"):
        smol_engine.generate(["hi"], GREEDY, adapters=["nope"])
    with pytest.raises(jlora.InvalidRequestError, match="bad adapter name"):
        smol_engine.generate(["hi"], GREEDY, adapters=["../etc"])
    _still_serves(smol_engine, expected)


def test_token_prompts_and_batches_agree(smol_engine):
    ids = smol_engine.tokenizer.encode("The capital of France is")
    alone = smol_engine.generate([ids], GREEDY)[0]
    batch = smol_engine.generate(["Once upon a time", ids, "1, 2, 3,"], GREEDY)
    assert batch[1].token_ids == alone.token_ids
    assert batch[1].prompt_token_ids == ids


def test_seeded_sampling_reproduces_and_seeds_differ(smol_engine):
    p = jlora.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, logprobs=True)
    a = smol_engine.generate(["Tell me a story"], p)[0]
    b = smol_engine.generate(["Tell me a story", "other"], [p, p])[0]  # batch position/size does not matter
    assert a.token_ids == b.token_ids
    outs = {
        tuple(
            smol_engine.generate(["Tell me a story"], jlora.SamplingParams(max_tokens=12, seed=s))[
                0
            ].token_ids
        )
        for s in range(4)
    }
    assert len(outs) > 1


def test_top_k_one_is_greedy_and_logprobs_are_raw(smol_engine):
    greedy = smol_engine.generate(
        ["The sky is"], jlora.SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)
    )[0]
    topk1 = smol_engine.generate(
        ["The sky is"], jlora.SamplingParams(max_tokens=8, temperature=5.0, top_k=1, seed=3, logprobs=True)
    )[0]
    assert topk1.token_ids == greedy.token_ids
    # logprobs are taken before temperature: identical tokens give identical log-probs
    assert topk1.logprobs == pytest.approx(greedy.logprobs, abs=1e-5)
    tiny_p = smol_engine.generate(["The sky is"], jlora.SamplingParams(max_tokens=8, top_p=1e-6, seed=9))[0]
    assert tiny_p.token_ids == greedy.token_ids


def test_stop_strings_tokens_and_length(smol_engine):
    full = smol_engine.chat(PROMPT, jlora.SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert full.text.startswith("The capital of France is Paris")
    cut = smol_engine.chat(PROMPT, jlora.SamplingParams(max_tokens=16, temperature=0.0, stop=[" Paris"]))[0]
    assert cut.text == "The capital of France is" and cut.finish_reason == "stop"
    by_token = smol_engine.chat(
        PROMPT, jlora.SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[full.token_ids[2]])
    )[0]
    assert by_token.token_ids == full.token_ids[:3] and by_token.finish_reason == "stop"
    short = smol_engine.chat(PROMPT, jlora.SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"
    assert full.token_ids[-1] == 2 and full.finish_reason == "stop"  # <|im_end|>
