"""The one place that turns config into a model provider (stages never build one themselves)."""

from __future__ import annotations

from ..config import Config
from .llama import ChatTokenizer, LlamaModel, load_tokenizer


def local_model(config: Config, model_key: str, n_seq: int) -> LlamaModel:
    """A models.<key> GGUF in process, with up to n_seq sequences in flight."""
    m = config.models[model_key]
    return LlamaModel(config.model_path(model_key), n_ctx=m.n_ctx, n_seq=n_seq,
                      n_threads=config.generation.n_threads, chat_template=m.chat_template)


def local_tokenizer(config: Config, model_key: str) -> ChatTokenizer:
    """A models.<key> GGUF's tokenizer and chat template only (no weights)."""
    return load_tokenizer(str(config.model_path(model_key)), config.models[model_key].chat_template)
