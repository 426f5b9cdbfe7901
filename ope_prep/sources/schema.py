"""The config's `source` section: the mix of sources and the filters every prompt passes
(config.Config.source). A source's type is a named source or a generic kind (registry.py)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..strict import Strict
from .registry import GENERIC_KINDS, REGISTRY, FieldMap


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


class SourceSpec(Strict):
    """One source of the mix. `type` is a registry name (`python 01_prepare_data.py
    --list-sources`) or a generic kind: jsonl, json, parquet, csv (with data_files) or datasets
    (any `datasets` spec in `dataset`), which need `fields`."""

    type: str
    """A registry name (sharegpt, chatbot_arena, ...) or a generic kind (jsonl, json, parquet, csv, datasets)."""
    name: Optional[str] = None
    """Its label in prompt ids and reports (default: type); unique in the mix."""
    weight: float = Field(1.0, gt=0)
    """Share of the mix, relative to the other sources' weights."""
    group: Optional[str] = None
    """For --only / --exclude (default: its name)."""
    dataset: Optional[str] = None
    """A `datasets` spec (hub name or local path); default: the registry's."""
    subset: Optional[str] = None
    """The dataset's config name."""
    revision: Optional[str] = None
    """A hub revision (commit) to pin."""
    split: Optional[str] = None
    """Default: the registry's, else "train"."""
    data_files: Optional[list[str]] = None
    """Local files (glob patterns) in the source's schema, instead of the hub."""
    package: Optional[str] = None
    """data_files are paths inside this PyPI distribution (installed, or a data-only package of
    ope_prep/packages.py)."""
    fields: Optional[FieldMap] = None
    """The schema: required for generic kinds, overrides a named one's."""

    @model_validator(mode="after")
    def _known(self):
        problem = check_spec(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def row_fields(self) -> FieldMap:
        """Where its rows keep the prompt: its own `fields`, else its named source's."""
        return self.fields or REGISTRY[self.type].fields

    @property
    def label(self) -> str:
        return self.name or self.type

    @property
    def group_name(self) -> str:
        return self.group or self.label


class SourceConfig(Strict):
    """Stage 1: a weighted mix of sources, and the filters every prompt passes."""

    mix: list[SourceSpec] = Field(min_length=1)
    """The sources (see source.mix.*)."""
    language: Optional[str] = "en"
    """Keep prompts in this language (null: any language)."""
    min_prompt_chars: int = Field(1, ge=1)
    """Shortest prompt kept, in characters."""
    max_prompt_chars: int = Field(4000, ge=1)
    """Longest prompt kept, in characters."""
    max_prompt_tokens: Optional[int] = Field(None, ge=1)
    """In tokens of the base policy's model (the prompt text alone). Every prompt must also leave
    room for generation.max_tokens in every policy's context, and fit the judge's and oracle's,
    whatever this says."""
    dedup: Literal["exact", "normalized"] = "normalized"
    """exact: identical texts are duplicates; normalized: also texts equal after Unicode
    normalization, case folding and dropping punctuation and spacing. Across all sources."""
    drop_flagged: bool = True
    """Drop prompts the source flags as toxic or moderated."""

    @model_validator(mode="before")
    @classmethod
    def _old_layout(cls, data):
        if isinstance(data, dict) and "type" in data:
            raise ValueError("`source.type` is gone: list the sources under `source.mix`, "
                             "e.g. `mix: [{type: sharegpt}]` (see README, Prompt sources)")
        return data

    @model_validator(mode="after")
    def _sources(self):
        labels = [s.label for s in self.mix]
        for i, spec in enumerate(self.mix):
            if labels.count(spec.label) > 1:
                raise ValueError(f"mix.{i}.name: {spec.label!r} is used twice; give each source its own name")
        # Prompt ids are `<name>-<the source's own id>`: with names `a` and `a-b`, ids `b-c` of
        # the one and `c` of the other would both be `a-b-c`. No name followed by a dash may
        # begin another, and then no two sources can give the same id.
        for i, spec in enumerate(self.mix):
            for j, other in enumerate(self.mix):
                if i != j and other.label.startswith(spec.label + "-"):
                    raise ValueError(
                        f"mix.{j}.name: {other.label!r} begins with {spec.label + '-'!r}, the name of mix.{i} "
                        f"and a dash: prompt ids (`<name>-<id>`) of the two sources could be the same; "
                        f"rename one (e.g. {other.label.replace('-', '_')!r})")
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError("min_prompt_chars is above max_prompt_chars")
        return self
