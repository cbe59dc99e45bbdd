"""Orbax save/restore is exact; a GGUF written from a tiny HF model reads back into the HF layout."""

from __future__ import annotations

import numpy as np
import pytest

import jlora
from checkpoints.gguf import GGUFFile, permute_rope_rows, unpermute_rope_rows
from tests.helpers import hf_logsoftmax, jlora_logsoftmax, tiny_hf_model


def test_orbax_round_trip_is_exact(tmp_path, smol_engine):
    import jax

    folder = tmp_path / "ckpt"
    smol_engine.save_checkpoint(str(folder))
    restored = jlora.Engine.from_pretrained(str(folder), dtype="float32", progress=False)
    a, b = jax.tree.leaves(smol_engine.model.params), jax.tree.leaves(restored.model.params)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    assert restored.config == smol_engine.config
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    p = jlora.SamplingParams(max_tokens=8, temperature=0.0)
    assert restored.chat(prompt, p)[0].token_ids == smol_engine.chat(prompt, p)[0].token_ids


def test_rope_permutation_inverts():
    w = np.random.default_rng(0).standard_normal((48, 10))
    assert np.array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    assert not np.array_equal(permute_rope_rows(w, 3), w)


def _write_gguf(path, model, qtype):
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        parts = name.split(".")
        if name == "lm_head.weight":
            out = "output.weight"
        elif parts[1] in names:
            out = f"{names[parts[1]]}.weight"
        else:
            sub = ".".join(parts[3:-1])
            out = f"blk.{parts[2]}.{layer_names[sub]}.weight"
            if sub == "self_attn.q_proj":
                w = permute_rope_rows(w, cfg.num_attention_heads)
            elif sub == "self_attn.k_proj":
                w = permute_rope_rows(w, cfg.num_key_value_heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(out, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(out, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qname,tol", [("F32", 5e-4), ("F16", 2e-2), ("Q8_0", 0.15)])
def test_gguf_written_from_hf_reads_back(tmp_path, qname, tol):
    import gguf

    model = tiny_hf_model("llama", hidden_size=64, intermediate_size=128)
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    path = tmp_path / f"tiny-{qname}.gguf"
    _write_gguf(path, model, qtype)
    g = GGUFFile(path)
    tensors = dict(g.tensors())
    for name, tensor in model.state_dict().items():
        ref = tensor.numpy()
        assert tensors[name].shape == ref.shape
        if qname == "F32":
            assert np.array_equal(tensors[name], ref), name
    from jlora.config import ModelConfig
    from jlora.model.params import params_from_tensors

    config = ModelConfig.from_hf_dict(g.hf_config())
    params = params_from_tensors(config, g.tensors(), np.float32, progress=False)
    ids = list(range(3, 40))
    diff = np.abs(jlora_logsoftmax(params, config, ids) - hf_logsoftmax(model, ids)).max()
    assert diff < tol
