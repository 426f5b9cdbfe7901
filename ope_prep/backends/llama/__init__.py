"""llama.cpp in process.

chat.py           templates and tokenizing (vocab-only loading for stage 2b)
sampling.py       the one log-softmax arithmetic, and the temperature-only sampler
engine.py         the model, its decode loop and cache cells, its one numeric path
generate.py       generation: slots refilled as sequences end
teacher_force.py  teacher forcing: sequences packed per batch, logits at response positions
"""

from .chat import ChatTokenizer, load_tokenizer, response_text
from .engine import PromptTooLong, numeric_identity
from .generate import Generation, Generator
from .sampling import Sampler, log_softmax, token_logprobs
from .teacher_force import TeacherForcer


class LlamaModel(Generator, TeacherForcer):
    """One GGUF model loaded once: generates (stage 2) and teacher-forces (stage 2b) on the
    same engine, so both take the same numeric path."""


__all__ = ["ChatTokenizer", "Generation", "LlamaModel", "PromptTooLong", "Sampler", "load_tokenizer",
           "log_softmax", "numeric_identity", "response_text", "token_logprobs"]
