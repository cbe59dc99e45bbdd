"""GGUF reader: metadata -> Hugging Face config dict, tensors dequantized into the HF layout.

llama.cpp stores q and k projections with their rows permuted (interleaved rope halves); this
module undoes it so every tensor comes out as Hugging Face's `model.safetensors` would hold it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SKIPPED = {"rope_freqs.weight"}  # derived from the rope scaling in the config
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclasses.dataclass
class GGUFTokenizerData:
    """What a GGUF file says about its tokenizer."""

    model: str  # 'gpt2' (byte-level BPE) or 'llama' (sentencepiece)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


class GGUFFile:
    """A GGUF file opened for reading (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]):
        import gguf

        self.path = os.fspath(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises assorted errors on bad files
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception:  # a field type this gguf version cannot decode is not needed
                continue
        self.architecture = self.metadata.get("general.architecture", "llama")

    def _get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """The model's Hugging Face config.json, rebuilt from the metadata."""
        arch = self.architecture
        if arch not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"{self.path}: unsupported GGUF architecture {arch!r}")
        heads = int(self._get("attention.head_count"))
        hidden = int(self._get("embedding_length"))
        names = {t.name for t in self._reader.tensors}
        vocab = self._get("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
        cfg: dict[str, Any] = {
            "model_type": "qwen2" if arch == "qwen2" else "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._get("feed_forward_length")),
            "num_hidden_layers": int(self._get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("attention.head_count_kv", heads)),
            "head_dim": int(self._get("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self._get("context_length", 2048)),
            "rms_norm_eps": float(self._get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._get("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
        }
        kind = self._get("rope.scaling.type")
        if kind == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(self._get("rope.scaling.factor"))}
        elif "rope_freqs.weight" in names and arch == "llama":
            # llama3-style scaling: llama.cpp keeps the factors in rope_freqs; the config keys are standard
            cfg["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": float(self._get("rope.scaling.factor", 8.0)),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": int(
                    self._get("rope.scaling.original_context_length", 8192)
                ),
            }
        return cfg

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array in HF layout) for every weight, one at a time."""
        import gguf

        cfg = self.hf_config()
        for t in self._reader.tensors:
            if t.name in _SKIPPED:
                continue
            name = _hf_name(t.name)
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ValueError(
                    f"{self.path}: tensor {t.name} has unsupported type {t.tensor_type.name}"
                ) from e
            array = np.asarray(array, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                array = unpermute_rope_rows(array, cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                array = unpermute_rope_rows(array, cfg["num_key_value_heads"])
            yield name, array

    @property
    def num_tensors(self) -> int:
        return sum(1 for t in self._reader.tensors if t.name not in _SKIPPED)

    def tokenizer_data(self) -> GGUFTokenizerData:
        m = self.metadata
        if "tokenizer.ggml.tokens" not in m:
            raise ValueError(f"{self.path}: no tokenizer in the GGUF metadata")
        return GGUFTokenizerData(
            model=m.get("tokenizer.ggml.model", "gpt2"),
            pre=m.get("tokenizer.ggml.pre"),
            tokens=list(m["tokenizer.ggml.tokens"]),
            token_types=[int(x) for x in m.get("tokenizer.ggml.token_type", [])],
            merges=list(m.get("tokenizer.ggml.merges", [])),
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=m.get("tokenizer.ggml.eos_token_id"),
            unk_token_id=m.get("tokenizer.ggml.unknown_token_id"),
            pad_token_id=m.get("tokenizer.ggml.padding_token_id"),
            add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=m.get("tokenizer.chat_template"),
        )


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"unknown GGUF tensor {name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (interleaved -> HF's rotate-half layout)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute` (HF -> GGUF layout); the inverse of unpermute_rope_rows."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
