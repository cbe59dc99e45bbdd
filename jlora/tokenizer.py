"""Tokenizer: encode/decode with the `tokenizers` library; chat templates in a sandboxed jinja2.

Built from a GGUF file's metadata (byte-level BPE: tokens, merges, special tokens, pre-tokenizer) or
from a Hugging Face folder's tokenizer.json + tokenizer_config.json.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from checkpoints.gguf import GGUFTokenizerData
from jlora.errors import InvalidRequestError, ModelLoadError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTROL_TOKEN_TYPE = 3
USER_DEFINED_TOKEN_TYPE = 4


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for this `tokenizer.ggml.pre` value."""
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class JloraTokenizer:
    """Text <-> token ids, special tokens, and the chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
    ):
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self._template = self._env.from_string(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> JloraTokenizer:
        if data.model != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer model {data.model!r} is not supported (byte-level BPE 'gpt2' is)"
            )
        vocab = {token: i for i, token in enumerate(data.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data.merges]
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(data.pre)
        tok.decoder = decoders.ByteLevel()
        types = data.token_types or [1] * len(data.tokens)
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(data.tokens, types)
            if kind == CONTROL_TOKEN_TYPE
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(data.tokens, types)
            if kind == USER_DEFINED_TOKEN_TYPE
        ]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        return cls(tok, data.bos_token_id, data.eos_token_id, data.add_bos_token, data.chat_template)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> JloraTokenizer | None:
        """From tokenizer.json (+ tokenizer_config.json); None when the folder has no tokenizer."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        tok = Tokenizer.from_file(path)
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        template_path = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(template_path):
            with open(template_path) as f:
                template = f.read()

        def token_id(key: str) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if value else cfg.get(f"{key}_id")

        return cls(
            tok, token_id("bos_token"), token_id("eos_token"), bool(cfg.get("add_bos_token", False)), template
        )

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (what from_folder reads)."""
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        cfg = {
            "bos_token": self.token_text(self.bos_token_id),
            "eos_token": self.token_text(self.eos_token_id),
            "add_bos_token": self.add_bos_token,
        }
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        if self.chat_template:
            with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
                f.write(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise InvalidRequestError("this model has no chat template")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id) or "",
                eos_token=self.token_text(self.eos_token_id) or "",
            )
        except TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}") from e
