"""The base of every config section (config.py, sources/schema.py): unknown keys and wrong types
are errors, and each field's docstring is its description."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # Each field's docstring is its description in the schema, from which docs/config.md is made
    # (python -m ope_prep.config_reference).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)
