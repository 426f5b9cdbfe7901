"""llama.cpp in process: chat.py (templates, tokenizing), sampling.py (the one log-softmax
arithmetic), engine.py (the model, its decode loop, generation and teacher forcing)."""

from .chat import ChatTokenizer, load_tokenizer, response_text
from .engine import Generation, LlamaModel, PromptTooLong, numeric_identity
from .sampling import Sampler, log_softmax, token_logprobs

__all__ = ["ChatTokenizer", "Generation", "LlamaModel", "PromptTooLong", "Sampler", "load_tokenizer",
           "log_softmax", "numeric_identity", "response_text", "token_logprobs"]
