"""Every bad adapter is refused with a clear error, loads nothing, and the engine keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from tests.helpers import tiny_hf_model
from tests.test_multi_lora import build_peft

GREEDY = jlora.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 33, 2, 99]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rejections")
    model = tiny_hf_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp / "base", safe_serialization=True)
    specs = {"good": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])}
    _, paths = build_peft(model, specs, tmp / "adapters")
    engine = jlora.Engine.from_pretrained(str(tmp / "base"), progress=False)
    engine.load_adapter("good", paths["good"])
    expected = engine.generate([PROMPT], GREEDY, adapters=["good"])[0].token_ids
    base = engine.generate([PROMPT], GREEDY)[0].token_ids
    assert expected != base
    return engine, paths["good"], model, tmp, expected


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _first_key(tensors, suffix="lora_A.weight"):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _nan(t):
    k = _first_key(t)
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan


def _inf(t):
    k = _first_key(t, "lora_B.weight")
    t[k] = t[k].copy()
    t[k][1, 0] = np.inf


def _drop(t):
    del t[_first_key(t)]


def _extra(t):
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = np.zeros((8, 64), np.float32)


def _extra_unknown(t):
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 64), np.float32)


def _transpose(t):
    k = _first_key(t)
    t[k] = np.ascontiguousarray(t[k].T)


BAD_CASES = {
    "dora": (lambda f: _edit_config(f, use_dora=True), "DoRA"),
    "modules_to_save": (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    "rank_zero": (lambda f: _edit_config(f, r=0), "rank must be a positive integer"),
    "rank_negative_pattern": (lambda f: _edit_config(f, rank_pattern={"q_proj": -2}), "rank must be"),
    "unknown_target": (
        lambda f: _edit_config(f, target_modules=["q_proj", "lm_head"]),
        "unknown target modules",
    ),
    "rank_mismatch": (lambda f: _edit_config(f, r=4), "do not fit"),
    "nan": (lambda f: _edit_tensors(f, _nan), "NaN or Inf"),
    "inf": (lambda f: _edit_tensors(f, _inf), "NaN or Inf"),
    "missing_key": (lambda f: _edit_tensors(f, _drop), "missing tensors"),
    "unexpected_key": (lambda f: _edit_tensors(f, _extra), "not in the adapter's target modules"),
    "unexpected_module": (lambda f: _edit_tensors(f, _extra_unknown), "unexpected tensor"),
    "wrong_shape": (lambda f: _edit_tensors(f, _transpose), "do not fit"),
    "pickle": (
        lambda f: open(os.path.join(f, "adapter_model.bin"), "wb").write(b"\x80\x04evil"),
        "never unpickled",
    ),
    "bad_json": (
        lambda f: open(os.path.join(f, "adapter_config.json"), "w").write("{not json"),
        "unreadable",
    ),
    "bad_safetensors": (
        lambda f: open(os.path.join(f, "adapter_model.safetensors"), "wb").write(b"\x00" * 20),
        "unreadable",
    ),
    "no_config": (lambda f: os.remove(os.path.join(f, "adapter_config.json")), "no adapter_config.json"),
    "bad_regex": (lambda f: _edit_config(f, target_modules="(unclosed"), "not a valid regex"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_adapter_is_refused_and_engine_still_serves(setup, tmp_path, case):
    engine, good_path, _, _, expected = setup
    folder = _copy(good_path, tmp_path / case)
    mutate, message = BAD_CASES[case]
    mutate(str(folder))
    before = engine.list_adapters()
    with pytest.raises(jlora.AdapterLoadError, match=message):
        engine.load_adapter(f"bad_{case}", str(folder))
    assert engine.list_adapters() == before
    assert engine.generate([PROMPT], GREEDY, adapters=["good"])[0].token_ids == expected


def test_adapter_for_another_geometry_is_refused(setup, tmp_path):
    engine, _, _, _, expected = setup
    for i, overrides in enumerate([dict(hidden_size=96), dict(num_hidden_layers=5)]):
        other = tiny_hf_model("llama", **overrides)
        _, paths = build_peft(
            other, {"other": dict(r=8, lora_alpha=8, target_modules=["q_proj"])}, tmp_path / str(i)
        )
        with pytest.raises(jlora.AdapterLoadError, match="another model"):
            engine.load_adapter("other", paths["other"])
    assert engine.generate([PROMPT], GREEDY, adapters=["good"])[0].token_ids == expected


def test_names_missing_paths_and_duplicates(setup, tmp_path):
    engine, good_path, _, _, expected = setup
    for bad in ["../x", "a/b", "", "..", "a\\b", "x" * 200]:
        with pytest.raises(jlora.InvalidRequestError, match="bad adapter name"):
            engine.load_adapter(bad, good_path)
    with pytest.raises(jlora.AdapterLoadError, match="not a folder"):
        engine.load_adapter("missing", str(tmp_path / "does-not-exist"))
    with pytest.raises(jlora.AdapterLoadError, match="already loaded"):
        engine.load_adapter("good", good_path)
    with pytest.raises(jlora.AdapterNotFoundError):
        engine.unload_adapter("never-loaded")
    assert engine.generate([PROMPT], GREEDY, adapters=["good"])[0].token_ids == expected


def test_unload_reload_and_unload_while_in_use(setup):
    engine, good_path, _, _, expected = setup
    engine.load_adapter("second", good_path)
    assert engine.generate([PROMPT], GREEDY, adapters=["second"])[0].token_ids == expected
    long = jlora.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("out", engine.generate([PROMPT], long, adapters=["second"]))
    )
    worker.start()
    deadline = time.time() + 30
    while not engine._in_use.get("second") and time.time() < deadline:
        time.sleep(0.001)
    with pytest.raises(jlora.AdapterInUseError):
        engine.unload_adapter("second", wait=False)
    engine.unload_adapter("second")  # waits for the running batch
    worker.join()
    assert result["out"][0].token_ids[:6] == expected  # the running request was not disturbed
    assert "second" not in engine.list_adapters()
    with pytest.raises(jlora.AdapterNotFoundError):
        engine.generate([PROMPT], GREEDY, adapters=["second"])
    assert engine.generate([PROMPT], GREEDY, adapters=["good"])[0].token_ids == expected
