"""docs/config.md, the configuration reference, made from the pydantic schema in config.py.

    python -m ope_prep.config_reference            # writes docs/config.md
    python -m ope_prep.config_reference --check    # exit 1 if docs/config.md is not current

Every key's type, default, limits and description come from its field (the description is the
field's docstring), so the reference cannot say what the code does not.
"""

from __future__ import annotations

import argparse
import sys
import typing

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config
from .files import PROJECT_DIR
from .rubrics import RUBRICS

REFERENCE = PROJECT_DIR / "docs" / "config.md"
# How a path shows a list item or a mapping value.
ITEM, KEY = "*", "<key>"
LIMITS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least", "pattern": "matches"}


def _models_in(annotation) -> list[tuple[str, type[BaseModel]]]:
    """The config sections an annotation holds: ("", M) for M itself or Optional[M], (".*", M) for
    list[M], (".<key>", M) for dict[str, M]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [(f".{ITEM}", m) for _, m in _models_in(args[0])]
    if origin is dict:
        return [(f".{KEY}", m) for _, m in _models_in(args[1])]
    if origin is typing.Union:
        return [found for a in args if a is not type(None) for found in _models_in(a)]
    return []


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, "section")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}"
    return str(annotation)


def _limits(field) -> str:
    found = []
    for meta in field.metadata:
        for attr, word in LIMITS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{word} {value}")
    return ", ".join(found)


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return ""
    return "`" + yaml.safe_dump(field.default, default_flow_style=True, width=10**6).strip().removesuffix("...").strip() + "`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _section(path: str, model: type[BaseModel], out: list[str]) -> None:
    doc = model.__doc__ if model.__doc__ and model.__doc__ is not BaseModel.__doc__ else ""
    out += [f"## `{path}`" if path else "## Top level", ""]
    if doc:
        out += [" ".join(doc.split()), ""]
    out += ["| key | type | default | limits | what it does |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        if name == "config_path":        # set by load_config, not by the YAML
            continue
        key = f"{path}.{name}" if path else name
        out.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {_limits(field)} | "
                   f"{_cell(field.description)} |")
        nested += [(key + suffix, m) for suffix, m in _models_in(field.annotation)]
    out.append("")
    for key, m in nested:
        _section(key, m, out)


def reference() -> str:
    out = ["# Configuration reference", "",
           "Made by `python -m ope_prep.config_reference` from the schema in `ope_prep/config.py`; "
           "tests/test_package.py fails when it is not current. Keys not listed are refused. Relative "
           "paths are relative to the config file's folder. `*` is any item of a list, `<key>` a key "
           "of your choosing. The embedded default is `config.yaml`; the production run "
           "`configs/arena_10k.yaml`.", ""]
    _section("", Config, out)
    out += ["## Rubrics (`judge.rubric`, `oracle.rubric`)", "",
            "| name | scale | worked examples |", "|---|---|---|"]
    out += [f"| `{name}` | {r.lo}–{r.hi} | {len(r.examples)} |" for name, r in RUBRICS.items()]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not current")
    args = p.parse_args(argv)
    text = reference()
    if args.check:
        current = REFERENCE.is_file() and REFERENCE.read_text() == text
        if not current:
            print(f"error: {REFERENCE} is not current: python -m ope_prep.config_reference", file=sys.stderr)
        return 0 if current else 1
    REFERENCE.parent.mkdir(exist_ok=True)
    tmp = REFERENCE.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(REFERENCE)
    print(f"{REFERENCE}: {text.count(chr(10))} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
